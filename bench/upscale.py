"""Tiled vs untiled upscaling: time ratio and peak memory on a 1024x1024 input, compact (SRVGG) model.

Both modes run the same spandrel model (built in-process through the same loader as user files) through
``webui.generation.upscale.model_upscale``.  Each mode runs in its own child process so that the peak
memory of one does not hide the other's (CPU: peak RSS of the child; CUDA: ``max_memory_allocated``).

    python bench/upscale.py [--size 1024] [--feat 16] [--convs 4] [--tile 256] [--overlap 16] [--repeat 2] [--rounds 3]

Real realesr-general-x4v3 is ``--feat 64 --convs 32`` (minutes per image on 2 CPU cores: use a GPU).
Goal (issue #8): tiled time <= 1.3x untiled at bounded memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(args: argparse.Namespace) -> None:
    import resource

    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    from webui.generation.upscale import model_upscale
    from webui.generation.upscalers import load_descriptor

    torch.manual_seed(0)
    net = Compact(num_feat=args.feat, num_conv=args.convs, upscale=4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "compact.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        descriptor = load_descriptor(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (args.size, args.size, 3), dtype=np.uint8))
    tile = args.tile if args.mode == "tiled" else 0
    warm = image.crop((0, 0, 64, 64))
    model_upscale(descriptor, warm, tile=0, overlap=0, device=device)
    import psutil

    baseline = psutil.Process().memory_info().rss  # after imports, model, input image and warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        out = model_upscale(descriptor, image, tile=tile, overlap=args.overlap, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"mode": args.mode, "seconds": min(times), "peak_bytes": peak - baseline, "device": device.type,
                      "out": list(out.size)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--feat", type=int, default=16)
    parser.add_argument("--convs", type=int, default=4)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=["tiled", "untiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    runs: dict[str, list[dict]] = {"untiled": [], "tiled": []}
    for _ in range(args.rounds):  # interleaved A/B child processes: machine noise hits both alike
        for mode in ("untiled", "tiled"):
            cmd = [sys.executable, __file__, "--mode", mode] + [f"--{k}={getattr(args, k)}" for k in
                                                                ("size", "feat", "convs", "tile", "overlap", "repeat")]
            output = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs[mode].append(json.loads(output))

    def median(items: list[dict]) -> dict:
        ordered = sorted(items, key=lambda r: r["seconds"])
        return {**ordered[len(ordered) // 2], "peak_bytes": max(r["peak_bytes"] for r in items)}

    u, t = median(runs["untiled"]), median(runs["tiled"])
    ratio = t["seconds"] / u["seconds"]
    print(f"device {u['device']}, input {args.size}x{args.size} -> {u['out'][0]}x{u['out'][1]}, compact "
          f"feat={args.feat} convs={args.convs}, tile {args.tile} overlap {args.overlap}")
    print(f"untiled: {u['seconds']:.2f}s  peak above baseline {u['peak_bytes'] / 2**20:.0f} MiB")
    print(f"tiled:   {t['seconds']:.2f}s  peak above baseline {t['peak_bytes'] / 2**20:.0f} MiB")
    print(f"time ratio tiled/untiled: {ratio:.2f} (goal <= 1.3)   memory ratio: "
          f"{t['peak_bytes'] / u['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
