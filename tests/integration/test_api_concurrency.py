"""8 clients x 5 jobs, mixing the UI (gradio_client), sync A1111 calls and the job API, on one queue.

All 40 complete, none lost or duplicated, the worker runs them in submission order (FIFO), nobody
deadlocks, and a job cancelled while queued never runs.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from webui.settings import Settings
from webui.types import GenerationRequest, JobState
from tests.fixtures.net import free_port

CLIENTS = 8
JOBS_PER_CLIENT = 5
SMALL = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def app(fixture_cache, tmp_path_factory):
    from tests.fixtures.factory import write_sd15_checkpoint
    from webui.app import start

    data = tmp_path_factory.mktemp("concurrency_data")
    settings = Settings.for_data_dir(data, port=free_port(), api=True)  # Gradio UI + API on one server
    target = settings.ckpt_dir / "tiny_sd15.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    source = fixture_cache.get(write_sd15_checkpoint)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    running = start(settings)
    try:
        yield SimpleNamespace(running=running, url=running.url.rstrip("/"), ctx=running.ctx)
    finally:
        running.close()


def ui_client(app, tag: str, results: list, errors: list) -> None:
    from gradio_client import Client

    client = Client(app.url + "/", verbose=False)
    try:
        for k in range(JOBS_PER_CLIENT):
            prompt = f"{tag}-{k}"
            outputs = client.predict(prompt=prompt, seed=1000 + k, api_name="/txt2img", **SMALL)
            infotext = outputs[3]
            assert infotext.startswith(prompt + "\n"), infotext
            results.append(prompt)
    except Exception as exc:  # reported by the test thread
        errors.append(f"{tag}: {exc!r}")
    finally:
        client.close()


def a1111_client(app, tag: str, results: list, errors: list) -> None:
    with httpx.Client(base_url=app.url, timeout=300, headers={"X-Client-Id": tag}) as http:
        try:
            for k in range(JOBS_PER_CLIENT):
                prompt = f"{tag}-{k}"
                response = http.post("/sdapi/v1/txt2img", json={"prompt": prompt, "seed": 2000 + k, **SMALL})
                assert response.status_code == 200, response.text
                info = json.loads(response.json()["info"])
                assert info["prompt"] == prompt and info["all_seeds"] == [2000 + k]
                results.append(prompt)
        except Exception as exc:
            errors.append(f"{tag}: {exc!r}")


def job_api_client(app, tag: str, results: list, errors: list) -> None:
    with httpx.Client(base_url=app.url, timeout=300, headers={"X-Client-Id": tag}) as http:
        try:
            for k in range(JOBS_PER_CLIENT):
                prompt = f"{tag}-{k}"
                submitted = http.post("/webui/v1/jobs", json={"prompt": prompt, "seed": 3000 + k, **SMALL})
                assert submitted.status_code == 202, submitted.text
                job_id = submitted.json()["id"]
                if k % 2:  # half follow the event stream, half poll
                    last = None
                    with http.stream("GET", f"/webui/v1/jobs/{job_id}/events") as stream:
                        for line in stream.iter_lines():
                            if line.startswith("data: "):
                                last = json.loads(line[6:])
                    state = last["state"]
                else:
                    while (state := http.get(f"/webui/v1/jobs/{job_id}", params={"images": "none"}).json()["state"]) \
                            in ("queued", "running"):
                        time.sleep(0.05)
                assert state == "done", state
                result = http.get(f"/webui/v1/jobs/{job_id}").json()["result"]
                assert result["images"][0]["infotext"].startswith(prompt + "\n")
                results.append(prompt)
        except Exception as exc:
            errors.append(f"{tag}: {exc!r}")


def canceller(app, outcome: dict) -> None:
    """Submit while others wait in the queue, cancel at once: the job must never run."""
    with httpx.Client(base_url=app.url, timeout=60) as http:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(http.get("/webui/v1/queue").json()["queued"]) < 3:
            time.sleep(0.01)
        job = http.post("/webui/v1/jobs", json={"prompt": "cancel-me", **SMALL}).json()
        outcome["submitted"] = job
        outcome["delete"] = http.delete(f"/webui/v1/jobs/{job['id']}")
        outcome["after"] = http.get("/webui/v1/queue").json()


def test_mixed_clients_all_complete_in_fifo_order(app):
    kinds = [ui_client, ui_client, ui_client, a1111_client, a1111_client, a1111_client, job_api_client,
             job_api_client]
    assert len(kinds) == CLIENTS
    results: list[str] = []
    errors: list[str] = []
    before = {job.id for job in app.ctx.worker.jobs()}
    threads = [threading.Thread(target=kind, args=(app, f"{kind.__name__}{i}", results, errors), daemon=True)
               for i, kind in enumerate(kinds)]
    cancel_outcome: dict = {}
    cancel_thread = threading.Thread(target=canceller, args=(app, cancel_outcome), daemon=True)
    started = time.monotonic()
    for thread in threads:
        thread.start()
    cancel_thread.start()
    for thread in [*threads, cancel_thread]:
        thread.join(timeout=600)
        assert not thread.is_alive(), "a client is stuck: deadlock"
    elapsed = time.monotonic() - started
    assert errors == []
    assert len(results) == CLIENTS * JOBS_PER_CLIENT and len(set(results)) == len(results)

    new_jobs = [job for job in app.ctx.worker.jobs() if job.id not in before]
    generated = [job for job in new_jobs if isinstance(job.request, GenerationRequest)
                 and job.request.prompt != "cancel-me"]
    prompts = [job.request.prompt for job in generated]
    assert sorted(prompts) == sorted(results), "each job ran exactly once: none lost, none duplicated"
    assert all(job.state is JobState.DONE for job in generated)
    assert len({job.request.prompt.split("-")[0] for job in generated}) == CLIENTS
    assert len({job.client for job in generated}) == CLIENTS, "each client is told apart"
    ordered = sorted(generated, key=lambda job: job.number)
    starts = [job.started_at for job in ordered]
    assert starts == sorted(starts), "the worker takes jobs in submission order (FIFO)"
    for earlier, later in zip(ordered, ordered[1:]):
        assert earlier.finished_at <= later.started_at, "one job at a time"

    response = cancel_outcome["delete"]
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    cancelled = app.ctx.worker.get(cancel_outcome["submitted"]["id"])
    assert cancelled.state is JobState.CANCELLED and cancelled.started_at is None
    assert cancelled.id not in [j["id"] for j in cancel_outcome["after"]["queued"]]
    busy = sum(job.finished_at - job.started_at for job in generated)
    print(f"\n{CLIENTS}x{JOBS_PER_CLIENT} mixed jobs in {elapsed:.1f}s (worker busy {busy:.1f}s)")
