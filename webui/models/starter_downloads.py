"""Background starter-model downloads for the UI to poll (one thread per model, no module state)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from webui.models.download import (
    STARTER_MODELS,
    DownloadCancelled,
    DownloadError,
    StarterModel,
    download_starter,
    resolve_endpoint,
    starter_model,
)

@dataclass(frozen=True)
class DownloadStatus:
    """``state``: idle | running | done | failed | cancelled. ``done``/``total`` in bytes (total 0 = unknown)."""

    state: str = "idle"
    done: int = 0
    total: int = 0
    message: str = ""
    path: Path | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0

    @property
    def active(self) -> bool:
        return self.state == "running"


class StarterDownloads:
    """Starts starter-model downloads in background threads and answers polls; lives on ``AppContext``.

    API for the UI (all methods are thread-safe and return immediately):

    * ``models`` -- the curated ``StarterModel`` tuple to show (label, arch_note, license, page_url()).
    * ``start(key) -> DownloadStatus`` -- starts (or resumes) that download; a running one is left alone.
    * ``status(key) -> DownloadStatus`` -- poll it (e.g. from a ``gr.Timer``); ``fraction`` drives a bar.
    * ``cancel(key)`` -- stop after the current chunk; the partial is kept and ``start`` resumes it.
    * ``wait(key, timeout)`` -- block until it is no longer running (tests, API).
    ``on_done(path)`` (constructor) runs on the download thread after a success, e.g. ``catalog.refresh``.
    """

    def __init__(
        self,
        dest_dir: Path,
        *,
        models: tuple[StarterModel, ...] = STARTER_MODELS,
        endpoint: str | None = None,
        on_done: Callable[[Path], None] | None = None,
    ):
        self.dest_dir = Path(dest_dir)
        self.models = models
        self.endpoint = endpoint
        self._on_done = on_done
        self._lock = threading.Lock()
        self._status: dict[str, DownloadStatus] = {}
        self._jobs: dict[str, tuple[threading.Thread, threading.Event]] = {}

    def status(self, key: str) -> DownloadStatus:
        starter_model(key, self.models)
        with self._lock:
            return self._status.get(key, DownloadStatus())

    def start(self, key: str) -> DownloadStatus:
        model = starter_model(key, self.models)
        with self._lock:
            if key in self._jobs and self._jobs[key][0].is_alive():
                return self._status[key]
            cancel = threading.Event()
            thread = threading.Thread(target=self._run, args=(model, cancel), name=f"download-{key}", daemon=True)
            self._jobs[key] = (thread, cancel)
            self._status[key] = DownloadStatus("running", 0, model.size_bytes or 0,
                                               f"Connecting to {resolve_endpoint(self.endpoint)}...")
            thread.start()
            return self._status[key]

    def cancel(self, key: str) -> None:
        starter_model(key, self.models)
        with self._lock:
            if key in self._jobs:
                self._jobs[key][1].set()

    def wait(self, key: str, timeout: float | None = None) -> DownloadStatus:
        with self._lock:
            job = self._jobs.get(key)
        if job is not None:
            job[0].join(timeout)
        return self.status(key)

    def _set(self, key: str, **changes) -> None:
        with self._lock:
            self._status[key] = replace(self._status.get(key, DownloadStatus()), **changes)

    def _run(self, model: StarterModel, cancel: threading.Event) -> None:
        key = model.key

        def progress(done: int, total: int) -> None:
            of = f" of {total / 1e6:.1f} MB ({done * 100 // total}%)" if total else " MB"
            self._set(key, done=done, total=total, message=f"Downloading {model.local_name}: {done / 1e6:.1f}{of}")

        try:
            path = download_starter(model, self.dest_dir, endpoint=self.endpoint, on_progress=progress,
                                    cancel=cancel)
        except DownloadCancelled as exc:
            self._set(key, state="cancelled", message=str(exc))
        except DownloadError as exc:
            self._set(key, state="failed", message=str(exc))
        except Exception as exc:  # noqa: BLE001 - a background thread must report, not die silently
            self._set(key, state="failed", message=f"Download of {model.local_name} failed: {exc!r}")
        else:
            size = path.stat().st_size
            self._set(key, state="done", done=size, total=size, path=path,
                      message=f"{model.local_name} is ready in {self.dest_dir}.")
            if self._on_done is not None:
                try:
                    self._on_done(path)
                except Exception as exc:  # noqa: BLE001
                    self._set(key, message=f"Downloaded, but refreshing the model list failed: {exc!r}")
