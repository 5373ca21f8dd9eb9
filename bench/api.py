"""HTTP API overhead vs calling the worker in-process, and throughput with 8 concurrent clients, in one run.

Same tiny SD1.5-layout model, 64x64, 2 steps.  Baseline: ``ctx.run(GenerationRequest)`` on this process
(submit + wait on the worker).  Ours: ``POST /sdapi/v1/txt2img`` over HTTP to a ``--nowebui`` server in
this process (JSON parsing, conversion, queue, wait, PNG+infotext encoding, base64, JSON response), and
the job API (``POST /webui/v1/jobs`` + SSE until ``end`` + ``GET`` the result).  Runs are interleaved so
machine noise hits both alike; medians are compared.  The overhead per request is measured directly as
client wall time minus the job's own time on the worker (submitted -> finished), which does not depend
on how long sampling takes.

    python bench/api.py [--jobs 30] [--steps 2] [--size 64] [--clients 8] [--per-client 5]

Goal (issue #4): API overhead <= 15 ms per request; throughput ratio (API / in-process) close to 1.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from webui.settings import Settings, apply_offline_env  # noqa: E402

apply_offline_env()

import httpx  # noqa: E402

from webui.types import GenerationRequest, JobState  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_seconds(job) -> float:
    return job.finished_at - job.submitted_at


def in_process(ctx, args, seed: int) -> tuple[float, float]:
    request = GenerationRequest(prompt=PROMPT, steps=args.steps, width=args.size, height=args.size, seed=seed,
                                sampler="Euler", save_images=False)
    started = time.perf_counter()
    job = ctx.run(request, timeout=600)
    wall = time.perf_counter() - started
    assert job.state is JobState.DONE, job.error
    return wall, wall - job_seconds(job)


def sdapi(client: httpx.Client, ctx, args, seed: int) -> tuple[float, float]:
    started = time.perf_counter()
    response = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": args.steps, "width": args.size,
                                                      "height": args.size, "seed": seed, "sampler_name": "Euler"})
    response.json()
    wall = time.perf_counter() - started
    assert response.status_code == 200, response.text
    job = ctx.worker.get(json.loads(response.json()["info"])["job_id"])
    return wall, wall - job_seconds(job)


def job_api(client: httpx.Client, ctx, args, seed: int) -> tuple[float, float]:
    started = time.perf_counter()
    job_id = client.post("/webui/v1/jobs", json={"prompt": PROMPT, "steps": args.steps, "width": args.size,
                                                 "height": args.size, "seed": seed,
                                                 "sampler_name": "Euler"}).json()["id"]
    with client.stream("GET", f"/webui/v1/jobs/{job_id}/events", params={"previews": False}) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: end"):
                break
    result = client.get(f"/webui/v1/jobs/{job_id}").json()
    wall = time.perf_counter() - started
    assert result["state"] == "done", result
    return wall, wall - job_seconds(ctx.worker.get(job_id))


def latency(ctx, client, args) -> None:
    samples: dict[str, list[tuple[float, float]]] = {"in-process": [], "sdapi": [], "job api": []}
    for i in range(args.jobs):
        samples["in-process"].append(in_process(ctx, args, seed=i))
        samples["sdapi"].append(sdapi(client, ctx, args, seed=i))
        samples["job api"].append(job_api(client, ctx, args, seed=i))
    base_wall = statistics.median(w for w, _ in samples["in-process"])
    base_over = statistics.median(o for _, o in samples["in-process"])
    print(f"latency, {args.size}x{args.size}, {args.steps} steps (medians of {args.jobs}, interleaved)")
    for name, values in samples.items():
        wall = statistics.median(w for w, _ in values)
        over = statistics.median(o for _, o in values)
        print(f"  {name:<11} {wall * 1000:8.1f} ms/request  ratio {wall / base_wall:5.3f}  "
              f"outside the worker {over * 1000:6.1f} ms  vs in-process {(over - base_over) * 1000:+6.1f} ms")


def throughput(ctx, url: str, args) -> None:
    def run_clients(target) -> float:
        threads = [threading.Thread(target=target, args=(c,)) for c in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return args.clients * args.per_client / (time.perf_counter() - started)

    def local(c: int) -> None:
        for k in range(args.per_client):
            in_process(ctx, args, seed=c * 100 + k)

    def remote(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600, headers={"X-Client-Id": f"bench{c}"}) as client:
            for k in range(args.per_client):
                sdapi(client, ctx, args, seed=c * 100 + k)

    rates = {"in-process": [], "sdapi": []}
    for _ in range(args.rounds):  # alternate so load changes on the machine hit both
        rates["in-process"].append(run_clients(local))
        rates["sdapi"].append(run_clients(remote))
    base = statistics.median(rates["in-process"])
    api = statistics.median(rates["sdapi"])
    print(f"throughput, {args.clients} clients x {args.per_client} jobs (median of {args.rounds} rounds)")
    print(f"  in-process  {base:6.2f} jobs/s")
    print(f"  sdapi       {api:6.2f} jobs/s  ratio {api / base:5.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from tests.fixtures.factory import write_sd15_checkpoint
    from webui.app import start

    with tempfile.TemporaryDirectory(prefix="webui-bench-api-") as tmp:
        settings = Settings.for_data_dir(tmp, port=free_port(), api=True, nowebui=True)
        write_sd15_checkpoint(settings.ckpt_dir)
        running = start(settings)
        ctx, url = running.ctx, running.url.rstrip("/")
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                for warm in range(3):
                    in_process(ctx, args, seed=warm)
                    sdapi(client, ctx, args, seed=warm)
                    job_api(client, ctx, args, seed=warm)
                latency(ctx, client, args)
            throughput(ctx, url, args)
        finally:
            running.close()


if __name__ == "__main__":
    main()
