"""Overhead of our worker path vs calling the plain diffusers pipeline directly, in one run.

Same tiny SD1.5-layout model (loaded by the same loader), same prompt, seed, 64x64, 8 steps, Euler.
Baseline: ``pipe(prompt=..., output_type="pil")`` on this thread.  Ours: ``ctx.run(GenerationRequest)``
through the worker thread (prompt encoder, fresh scheduler, step callback, VAE decode, infotext, PNG save).
Runs are interleaved A/B so machine noise hits both alike; medians are compared.

    python bench/overhead.py [--jobs 20] [--steps 8] [--size 64]

Goal (issue #3): ratio <= 1.05 and <= 10 ms/job; with previews on every step <= 1.10.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from webui.settings import Settings, apply_offline_env  # noqa: E402

apply_offline_env()

import torch  # noqa: E402

from webui.context import AppContext  # noqa: E402
from webui.demo import write_demo_models  # noqa: E402
from webui.generation.samplers import make_scheduler  # noqa: E402
from webui.models import loaders  # noqa: E402
from webui.types import Arch, GenerationRequest, JobState, LoadModelRequest  # noqa: E402

PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk", "blurry"


def baseline_pipeline(path: Path):
    components = loaders.load_checkpoint(path, arch=Arch.SD1)
    pipe = loaders.build_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, components.scheduler_config


def run_baseline(pipe, scheduler_config, *, seed: int, steps: int, size: int) -> float:
    started = time.perf_counter()
    pipe.scheduler = make_scheduler(scheduler_config, "Euler", "Automatic")
    pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, width=size,
         height=size, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil")
    return time.perf_counter() - started


def run_ours(ctx, *, seed: int, steps: int, size: int, previews: int) -> float:
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg_scale=7.0,
                                sampler="Euler", width=size, height=size, seed=seed, preview_every=previews)
    started = time.perf_counter()
    job = ctx.run(request, timeout=600)
    elapsed = time.perf_counter() - started
    assert job.state is JobState.DONE, job.error
    return elapsed


def compare(label: str, ctx, pipe, sched_cfg, args, previews: int) -> None:
    base, ours = [], []
    for i in range(args.jobs):
        base.append(run_baseline(pipe, sched_cfg, seed=i, steps=args.steps, size=args.size))
        ours.append(run_ours(ctx, seed=i, steps=args.steps, size=args.size, previews=previews))
    b, o = statistics.median(base), statistics.median(ours)
    print(f"{label:<28} baseline {b * 1000:8.1f} ms  ours {o * 1000:8.1f} ms  "
          f"ratio {o / b:5.3f}  overhead {(o - b) * 1000:+7.1f} ms/job  (medians of {args.jobs})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="webui-bench-") as tmp:
        settings = Settings.for_data_dir(tmp, demo=True)
        written = write_demo_models(settings, kinds=("sd15",))
        ctx = AppContext.create(settings)
        try:
            assert ctx.run(LoadModelRequest(checkpoint=written[0].stem), timeout=600).state is JobState.DONE
            pipe, sched_cfg = baseline_pipeline(written[0])
            for warm in range(2):  # warm both paths (allocator, first-call costs)
                run_baseline(pipe, sched_cfg, seed=warm, steps=args.steps, size=args.size)
                run_ours(ctx, seed=warm, steps=args.steps, size=args.size, previews=0)
            print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {ctx.manager.plan.describe()}")
            compare("worker path, no previews", ctx, pipe, sched_cfg, args, previews=0)
            compare("worker path, preview/step", ctx, pipe, sched_cfg, args, previews=1)
        finally:
            ctx.close()


if __name__ == "__main__":
    main()
