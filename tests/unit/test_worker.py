"""Worker: FIFO order, one thread, cancel/interrupt/skip, failures do not kill the worker."""
import threading
from dataclasses import dataclass

import pytest

from webui.runtime.worker import JobInterrupted, Worker
from webui.types import JobState, Progress


@dataclass(frozen=True)
class Sleep:
    label: str
    steps: int = 1
    fail: bool = False


def make_worker(log, gate=None):
    def handler(job, control):
        log.append((job.request.label, threading.get_ident()))
        for step in range(job.request.steps):
            if gate is not None:
                gate.wait(5)
            if job.request.fail:
                raise ValueError(f"{job.request.label} exploded")
            control.report(Progress(step=step + 1, total_steps=job.request.steps, batch_count=1))
            if control.consume_skip():
                return "skipped"
            control.raise_if_interrupted()
        return job.request.label.upper()

    return Worker({Sleep: handler}).start()


def test_jobs_run_in_submission_order_on_one_thread():
    log = []
    worker = make_worker(log)
    try:
        jobs = [worker.submit(Sleep(f"j{i}"), client=f"c{i % 3}") for i in range(12)]
        assert all(job.wait(10) for job in jobs)
        assert [label for label, _ in log] == [f"j{i}" for i in range(12)]
        assert len({ident for _, ident in log}) == 1
        assert log[0][1] != threading.get_ident()
        assert [job.result for job in jobs] == [f"J{i}" for i in range(12)]
        assert all(job.state is JobState.DONE for job in jobs)
        assert [job.number for job in jobs] == sorted(job.number for job in jobs)
    finally:
        worker.stop()


def test_failure_is_reported_and_next_job_runs():
    worker = make_worker([])
    try:
        bad = worker.submit(Sleep("bad", fail=True))
        good = worker.submit(Sleep("good"))
        assert good.wait(10) and bad.wait(10)
        assert bad.state is JobState.FAILED
        assert bad.error == "bad exploded"
        assert good.state is JobState.DONE and good.result == "GOOD"
    finally:
        worker.stop()


def test_cancel_queued_job_removes_it_and_interrupt_stops_running_job():
    gate = threading.Event()
    log = []
    worker = make_worker(log, gate)
    try:
        running = worker.submit(Sleep("long", steps=50))
        queued = worker.submit(Sleep("queued"))
        after = worker.submit(Sleep("after"))
        seen = running.wait_for_change(0, timeout=5)
        assert running.state is JobState.RUNNING
        assert worker.queue_position(queued) == 1 and worker.queue_position(after) == 2
        assert worker.cancel(queued.id)
        assert queued.state is JobState.CANCELLED
        assert worker.queue_position(after) == 1
        assert worker.cancel(running.id)
        gate.set()
        assert running.wait(10) and after.wait(10)
        assert running.state is JobState.INTERRUPTED
        assert running.progress.step < 50
        assert [label for label, _ in log] == ["long", "after"]
        assert not worker.cancel(running.id), "finished jobs cannot be cancelled"
        assert seen >= 1
    finally:
        gate.set()
        worker.stop()


def test_skip_reaches_the_running_job_once():
    gate = threading.Event()
    worker = make_worker([], gate)
    try:
        job = worker.submit(Sleep("s", steps=20))
        job.wait_for_change(0, timeout=5)
        assert worker.skip(job.id)
        gate.set()
        assert job.wait(10)
        assert job.result == "skipped" and job.state is JobState.DONE
    finally:
        gate.set()
        worker.stop()


def test_unknown_request_type_is_refused_at_submit():
    worker = make_worker([])
    try:
        with pytest.raises(TypeError, match="no handler"):
            worker.submit(object())
    finally:
        worker.stop()


def test_stop_cancels_queued_jobs():
    gate = threading.Event()
    worker = make_worker([], gate)
    running = worker.submit(Sleep("r", steps=3))
    queued = worker.submit(Sleep("q"))
    running.wait_for_change(0, timeout=5)
    gate.set()
    worker.stop()
    assert queued.state in (JobState.CANCELLED, JobState.DONE)
    assert running.state.finished


def test_interrupted_exception_maps_to_interrupted_state():
    def handler(job, control):
        raise JobInterrupted()

    worker = Worker({Sleep: handler}).start()
    try:
        job = worker.run_sync(Sleep("x"), timeout=5)
        assert job.state is JobState.INTERRUPTED
    finally:
        worker.stop()
