"""LoRA stack swap (issue #5): our patcher vs one UNet forward vs diffusers' adapters, in one run.

Tiny SD1.5-layout checkpoint (``webui.models.tiny``) loaded through our loader, fp32 on the CPU.  LoRA files:
kohya-named LoRAs for the UNet attention layers (rank 8), written once to a temp folder.  Measured:

* ``unet``: one UNet forward at 64x64 (latent 8x8), batch 1 -- the yardstick;
* ``ours``: ``LoraPatcher.apply(stack B)`` with stack A applied (3 LoRAs -> 3 others), LoRAs already parsed
  (the manager keeps parsed LoRAs in its RAM cache); also ``ours cold`` = parse 3 files + apply;
* ``diffusers set_adapters``: ``pipe.set_adapters(B, weights)`` with every previously used adapter loaded;
* ``diffusers load+set``: ``delete_adapters(A)`` + ``load_lora_weights`` x3 + ``set_adapters(B)``;
* the UNet forward with the 3 unfused diffusers adapters active (their per-step cost).

Each is measured after 1 and after N (default 200) LoRA files were previously used.  Medians over repeats.

    python bench/lora_swap.py [--used 200] [--repeats 7] [--diffusers-used 30]

Goal: swap <= one UNet forward, flat in the number of LoRAs used before, faster than the diffusers path.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from webui.settings import apply_offline_env  # noqa: E402

apply_offline_env()
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

diffusers_logging.set_verbosity_error()

from tests.fixtures.lora_factory import make_lora, write_lora  # noqa: E402
from webui.models import loaders  # noqa: E402
from webui.models.lora import LoraPatcher, StackEntry, load_lora  # noqa: E402
from webui.models.tiny import write_sd15_checkpoint  # noqa: E402
from webui.types import Arch, Prediction, Variant  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_pipe(tmp: Path):
    path = write_sd15_checkpoint(tmp, dtype=torch.float32)
    comps = loaders.load_checkpoint(path, arch=Arch.SD1, variant=Variant.NORMAL, prediction=Prediction.EPSILON,
                                    dtype=torch.float32, allow_pickle=False)
    pipe = loaders.build_pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_forward(pipe):
    unet = pipe.unet
    sample = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    t = torch.tensor([500])

    def run():
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=ctx)
    run()
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--used", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--diffusers-used", type=int, default=30,
                    help="previously used adapters for the diffusers rows (peft loads ~0.7 s per adapter on 2 cores)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = Path(tempfile.mkdtemp(prefix="lora_swap_"))
    pipe = build_pipe(tmp)
    total = args.used + 6
    files = []
    for i in range(total):
        sd = make_lora({"unet": pipe.unet}, rank=8, alpha=8.0, seed=i, components=("unet",), amp=0.05)
        files.append(write_lora(tmp / f"l{i:04d}.safetensors", sd))
    a_files, b_files, history = files[:3], files[3:6], files[6:]
    forward = unet_forward(pipe)
    t_unet = median_time(forward, args.repeats * 2)
    print(f"UNet forward 64x64 batch 1: {t_unet * 1000:.1f} ms  ({sum(p.numel() for p in pipe.unet.parameters()):,}"
          f" UNet parameters, {len(files[0].read_bytes()) // 1024} KiB per LoRA)")

    # ---- ours
    patcher = LoraPatcher({"unet": pipe.unet, "te1": pipe.text_encoder}, arch=Arch.SD1)
    parsed = {f: load_lora(f) for f in a_files + b_files}
    stack_a = [StackEntry(parsed[f], 0.8, 0.8) for f in a_files]
    stack_b = [StackEntry(parsed[f], 0.7, 0.7) for f in b_files]
    results = {}

    def ours_swap() -> float:
        times = []
        for _ in range(args.repeats):
            patcher.apply(stack_a)
            t = time.perf_counter()
            patcher.apply(stack_b)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def ours_cold() -> float:
        times = []
        for _ in range(args.repeats):
            patcher.apply(stack_a)
            t = time.perf_counter()
            patcher.apply([StackEntry(load_lora(f), 0.7, 0.7) for f in b_files])
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    results[("ours", 1)] = ours_swap()
    results[("ours cold", 1)] = ours_cold()
    started = time.perf_counter()
    for i in range(0, len(history), 3):  # use N other LoRAs, 3 at a time
        patcher.apply([StackEntry(load_lora(f), 1.0, 1.0) for f in history[i:i + 3]])
    print(f"(ours: used {len(history)} more LoRAs in {time.perf_counter() - started:.1f}s)")
    results[("ours", args.used)] = ours_swap()
    results[("ours cold", args.used)] = ours_cold()
    patcher.restore()

    # ---- diffusers / peft
    def names(fs):
        return [f.stem for f in fs]

    def load(fs):
        for f in fs:
            pipe.load_lora_weights(str(f), adapter_name=f.stem)

    diffusers_ok = True
    try:
        load(a_files + b_files)
    except Exception as exc:  # report, keep our numbers
        diffusers_ok = False
        print(f"diffusers load_lora_weights failed: {exc.__class__.__name__}: {str(exc)[:200]}")

    def d_set() -> float:
        times = []
        for _ in range(args.repeats):
            pipe.set_adapters(names(a_files), [0.8] * 3)
            t = time.perf_counter()
            pipe.set_adapters(names(b_files), [0.7] * 3)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def d_load_set() -> float:
        times = []
        for _ in range(max(3, args.repeats // 2)):
            pipe.set_adapters(names(a_files), [0.8] * 3)
            t = time.perf_counter()
            pipe.delete_adapters(names(b_files))
            load(b_files)
            pipe.set_adapters(names(b_files), [0.7] * 3)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    if diffusers_ok:
        results[("diffusers set_adapters", 1)] = d_set()
        results[("diffusers load+set", 1)] = d_load_set()
        pipe.set_adapters(names(b_files), [0.7] * 3)
        results[("unet with 3 unfused adapters", 1)] = median_time(forward, args.repeats * 2)
        started = time.perf_counter()
        d_used = args.used if args.diffusers_used is None else min(args.used, args.diffusers_used)
        load(history[:d_used])
        print(f"(diffusers: loaded {d_used} more adapters in {time.perf_counter() - started:.1f}s; its 'used=' "
              f"column below is used={d_used})")
        results[("diffusers set_adapters", args.used)] = d_set()
        results[("diffusers load+set", args.used)] = d_load_set()
        pipe.set_adapters(names(b_files), [0.7] * 3)
        results[("unet with 3 unfused adapters", args.used)] = median_time(forward, args.repeats * 2)

    print(f"\n{'path':32s} {'used=1':>12s} {'used=' + str(args.used):>12s}   (x UNet forward)")
    for label in dict.fromkeys(k for k, _ in results):
        row = [results.get((label, n)) for n in (1, args.used)]
        cells = " ".join(f"{v * 1000:9.1f} ms" if v is not None else f"{'-':>12s}" for v in row)
        ratio = " / ".join(f"{v / t_unet:.2f}" for v in row if v is not None)
        print(f"{label:32s} {cells}   ({ratio})")
    ours = results[("ours", args.used)]
    print(f"\nswap <= UNet forward: {ours <= t_unet}; flat (used {args.used} / used 1): "
          f"{results[('ours', args.used)] / results[('ours', 1)]:.2f}x")
    if diffusers_ok:
        print(f"ours vs diffusers set_adapters: {results[('diffusers set_adapters', args.used)] / ours:.1f}x faster; "
              f"vs load+set: {results[('diffusers load+set', args.used)] / ours:.1f}x faster")


if __name__ == "__main__":
    main()
