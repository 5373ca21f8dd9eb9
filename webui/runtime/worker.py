"""The one thread that owns the accelerator.

Clients (UI events, API requests, plugins) never touch torch: they ``submit`` a frozen request and get a
``Job`` back at once.  The worker thread takes jobs in submission order (FIFO) and hands each to the
handler registered for the request's type.  A handler receives a ``JobControl`` through which it reports
progress and learns about Interrupt/Skip; both are plain flags checked once per sampling step.

Nothing here knows about diffusion: handlers are registered by the composition root.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

from webui.types import JobState, Progress

log = logging.getLogger(__name__)

Handler = Callable[["Job", "JobControl"], Any]


class JobInterrupted(Exception):
    """Raised by a handler (or JobControl.raise_if_interrupted) to stop a job early."""


@dataclass(eq=False)
class Job:
    """A unit of work on the worker. Mutable only by the worker thread (under ``Worker._lock``)."""

    id: str
    request: Any
    client: str | None
    number: int
    submitted_at: float
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress = field(default_factory=Progress)
    result: Any = None
    error: str | None = None
    version: int = 0
    _changed: threading.Condition = field(default_factory=lambda: threading.Condition(threading.Lock()), repr=False)

    @property
    def kind(self) -> str:
        return getattr(self.request, "job_kind", type(self.request).__name__)

    def _bump(self) -> None:
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def wait_for_change(self, seen_version: int, timeout: float | None = None) -> int:
        """Block until ``version`` moves past ``seen_version`` (or timeout); returns the current version."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != seen_version, timeout=timeout)
            return self.version

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is finished; True if it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self.state.finished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def summary(self) -> dict[str, Any]:
        """Plain-data view for APIs and UIs."""
        p = self.progress
        return {
            "id": self.id,
            "kind": self.kind,
            "client": self.client,
            "state": self.state.value,
            "number": self.number,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": p.fraction if self.state is JobState.RUNNING else (1.0 if self.state is JobState.DONE else 0.0),
            "step": p.step,
            "total_steps": p.total_steps,
            "batch_index": p.batch_index,
            "batch_count": p.batch_count,
            "eta_seconds": p.eta_seconds,
            "text": p.text,
            "error": self.error,
        }


class JobControl:
    """What a handler sees of its job: report progress, check Interrupt/Skip."""

    def __init__(self, worker: "Worker", job: Job):
        self._worker = worker
        self.job = job
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def request_interrupt(self) -> None:
        self._interrupt.set()

    def request_skip(self) -> None:
        self._skip.set()

    def consume_skip(self) -> bool:
        """True once per Skip press: the handler drops the current batch and moves on."""
        if self._skip.is_set():
            self._skip.clear()
            return True
        return False

    @property
    def skip_requested(self) -> bool:
        return self._skip.is_set()

    def raise_if_interrupted(self) -> None:
        if self.interrupted:
            raise JobInterrupted()

    def report(self, progress: Progress) -> None:
        self._worker._set_progress(self.job, progress)

    def update(self, **changes: Any) -> None:
        self._worker._set_progress(self.job, replace(self.job.progress, **changes))


class Worker:
    """FIFO job queue served by exactly one thread."""

    def __init__(self, handlers: Mapping[type, Handler], *, history: int = 500, name: str = "webui-worker"):
        self._handlers = dict(handlers)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._history = history
        self._counter = itertools.count(1)
        self._current: tuple[Job, JobControl] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread_ident: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Worker":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            for job in list(self._queue):
                self._finish_locked(job, JobState.CANCELLED, error="server is shutting down")
            self._queue.clear()
            if self._current:
                self._current[1].request_interrupt()
            self._wakeup.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def register(self, request_type: type, handler: Handler) -> None:
        with self._lock:
            self._handlers[request_type] = handler

    # ---- client side ------------------------------------------------------------------------
    def submit(self, request: Any, *, client: str | None = None) -> Job:
        if self._find_handler(request) is None:
            raise TypeError(f"no handler registered for {type(request).__name__}")
        job = Job(
            id=uuid.uuid4().hex[:16],
            request=request,
            client=client,
            number=next(self._counter),
            submitted_at=time.time(),
        )
        with self._lock:
            if self._stopping:
                raise RuntimeError("the worker is shutting down")
            self._jobs[job.id] = job
            self._queue.append(job)
            self._wakeup.notify_all()
        return job

    def run_sync(self, request: Any, *, client: str | None = None, timeout: float | None = None) -> Job:
        job = self.submit(request, client=client)
        job.wait(timeout)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def queued(self) -> list[Job]:
        with self._lock:
            return list(self._queue)

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.number)

    def current(self) -> Job | None:
        with self._lock:
            return self._current[0] if self._current else None

    def queue_position(self, job: Job) -> int | None:
        """0 = running now, 1 = next, ...; None when finished."""
        with self._lock:
            if self._current and self._current[0] is job:
                return 0
            for i, queued in enumerate(self._queue, start=1):
                if queued is job:
                    return i
        return None

    def cancel(self, job_id: str) -> bool:
        """Remove a queued job, or interrupt it if it is running. False if unknown or already finished."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state.finished:
                return False
            if job.state is JobState.QUEUED:
                self._queue.remove(job)
                self._finish_locked(job, JobState.CANCELLED, error="cancelled before it started")
                return True
            if self._current and self._current[0] is job:
                self._current[1].request_interrupt()
                return True
        return False

    def interrupt(self, job_id: str | None = None) -> bool:
        """Interrupt the running job (optionally only if it is ``job_id``)."""
        with self._lock:
            if not self._current or (job_id and self._current[0].id != job_id):
                return False
            self._current[1].request_interrupt()
            return True

    def skip(self, job_id: str | None = None) -> bool:
        with self._lock:
            if not self._current or (job_id and self._current[0].id != job_id):
                return False
            self._current[1].request_skip()
            return True

    @property
    def on_worker_thread(self) -> bool:
        return threading.get_ident() == self.thread_ident

    # ---- worker side ------------------------------------------------------------------------
    def _find_handler(self, request: Any) -> Handler | None:
        for cls in type(request).__mro__:
            if cls in self._handlers:
                return self._handlers[cls]
        return None

    def _run(self) -> None:
        self.thread_ident = threading.get_ident()
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                control = JobControl(self, job)
                self._current = (job, control)
                job.state = JobState.RUNNING
                job.started_at = time.time()
            job._bump()
            self._execute(job, control)
            with self._lock:
                self._current = None

    def _execute(self, job: Job, control: JobControl) -> None:
        handler = self._find_handler(job.request)
        try:
            result = handler(job, control)
        except JobInterrupted:
            self._finish(job, JobState.INTERRUPTED, result=None)
        except Exception as exc:  # a job must never take the worker down
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            self._finish(job, JobState.FAILED, error=_user_message(exc))
        else:
            interrupted = control.interrupted or bool(getattr(result, "interrupted", False))
            self._finish(job, JobState.INTERRUPTED if interrupted else JobState.DONE, result=result)

    def _set_progress(self, job: Job, progress: Progress) -> None:
        job.progress = progress
        job._bump()

    def _finish(self, job: Job, state: JobState, *, result: Any = None, error: str | None = None) -> None:
        with self._lock:
            self._finish_locked(job, state, result=result, error=error)

    def _finish_locked(self, job: Job, state: JobState, *, result: Any = None, error: str | None = None) -> None:
        job.result = result
        job.error = error
        job.finished_at = time.time()
        job.state = state
        self._finished.append(job.id)
        while len(self._finished) > self._history:
            self._jobs.pop(self._finished.popleft(), None)
        job._bump()


def _user_message(exc: BaseException) -> str:
    """One line a user can act on: the exception's own message, typed."""
    text = str(exc).strip() or type(exc).__name__
    if type(exc).__name__ in ("OutOfMemoryError",) or "out of memory" in text.lower():
        return f"Out of memory: {text}. Try a smaller size or batch, or a lower-memory mode."
    return text if isinstance(exc, (ValueError, LookupError, OSError)) else f"{type(exc).__name__}: {text}"
