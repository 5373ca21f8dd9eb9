"""Memory and switch time of the txt2img / img2img / inpaint pipelines over one checkpoint (issue #7).

Loads one checkpoint through the real AppContext (catalog -> manager -> worker), runs a txt2img job, then an
img2img and an inpaint job (the tabs' jobs), and reports:

* memory: unique parameter/buffer bytes reachable from all task pipelines vs the txt2img pipeline alone
  (exact: tensors are counted once by storage pointer), and process RSS growth over the same steps;
* tab switch: the extra time of the first img2img/inpaint job over a txt2img job (view creation with
  ``from_pipe``), the same for later switches (cached views), against a cold checkpoint load.

    python bench/pipelines.py [--arch sd15|sdxl] [--size 64] [--steps 4] [--rounds 5]

Goal (issue #7): all three pipelines < 5% more memory than txt2img alone; switching tabs never reloads.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def unique_bytes(pipes) -> int:
    seen, total = set(), 0
    for pipe in pipes:
        for component in pipe.components.values():
            if not hasattr(component, "parameters"):
                continue
            for tensor in [*component.parameters(), *component.buffers()]:
                key = tensor.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += tensor.untyped_storage().nbytes()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import psutil
    from PIL import Image, ImageDraw

    from webui.context import AppContext
    from webui.image_requests import Img2ImgRequest
    from webui.models import tiny
    from webui.settings import Settings
    from webui.types import GenerationRequest, JobState

    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        writer = tiny.write_sd15_checkpoint if args.arch == "sd15" else tiny.write_sdxl_checkpoint
        writer(root / "models" / "Stable-diffusion")
        ctx = AppContext.create(Settings.for_data_dir(root))
        common = dict(width=args.size, height=args.size, steps=args.steps, seed=1, prompt="a lighthouse",
                      save_images=False, preview_every=0)
        source = Image.new("RGB", (args.size, args.size), (120, 90, 60))
        mask = Image.new("L", source.size, 0)
        ImageDraw.Draw(mask).rectangle((args.size // 4, args.size // 4, args.size // 2, args.size // 2), fill=255)
        jobs = {
            "txt2img": lambda: GenerationRequest(**common),
            "img2img": lambda: Img2ImgRequest(**common, init_images=[source], denoising_strength=1.0),
            "inpaint": lambda: Img2ImgRequest(**common, init_images=[source], mask=mask, denoising_strength=1.0),
        }

        def run(kind: str) -> float:
            started = time.perf_counter()
            job = ctx.run(jobs[kind](), timeout=600)
            if job.state is not JobState.DONE:
                raise SystemExit(f"{kind} failed: {job.error}")
            return time.perf_counter() - started

        rss0 = proc.memory_info().rss
        cold = run("txt2img")
        model = ctx.manager.current
        load_seconds = model.load_seconds
        rss_txt = proc.memory_info().rss
        bytes_txt = unique_bytes([model.pipe])
        first = {kind: run(kind) for kind in ("img2img", "inpaint")}
        rss_all = proc.memory_info().rss
        bytes_all = unique_bytes([model.pipe, *model.task_pipes.values()])
        assert ctx.manager.current is model, "a task switch reloaded the checkpoint"
        samples: dict[str, list[float]] = {k: [] for k in jobs}
        for _ in range(args.rounds):  # interleaved: txt2img, img2img, inpaint, txt2img, ...
            for kind in jobs:
                samples[kind].append(run(kind))
        assert ctx.manager.current is model, "a task switch reloaded the checkpoint"
        from webui.generation.pipeline_tasks import task_pipeline

        view_ms: dict[str, list[float]] = {"img2img": [], "inpaint": []}
        for _ in range(args.rounds * 4):  # what a first switch costs: building the view (from_pipe)
            for task in view_ms:
                model.task_pipes.clear()
                started = time.perf_counter()
                task_pipeline(model, task)
                view_ms[task].append((time.perf_counter() - started) * 1000)
        ctx.close()

    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"checkpoint: tiny {args.arch}, {args.size}x{args.size}, {args.steps} steps, {args.rounds} rounds")
    print(f"weights reachable: txt2img alone {bytes_txt / 2**20:.1f} MiB, all three pipelines "
          f"{bytes_all / 2**20:.1f} MiB -> ratio {bytes_all / bytes_txt:.3f} (goal < 1.05)")
    print(f"process RSS growth: load+txt2img {(rss_txt - rss0) / 2**20:.1f} MiB, +img2img+inpaint "
          f"{(rss_all - rss_txt) / 2**20:.1f} MiB")
    print(f"cold load {load_seconds * 1000:.0f} ms (first txt2img job {cold * 1000:.0f} ms)")
    for kind in ("img2img", "inpaint"):
        print(f"first {kind} job {first[kind] * 1000:.0f} ms; later median {med[kind] * 1000:.0f} ms "
              f"(txt2img median {med['txt2img'] * 1000:.0f} ms); no checkpoint reload")
    for task, values in view_ms.items():
        ms = statistics.median(values)
        print(f"tab switch to {task}: building its pipeline view {ms:.2f} ms (median) = "
              f"{ms / 1000 / load_seconds:.4f}x a cold checkpoint load")


if __name__ == "__main__":
    main()
