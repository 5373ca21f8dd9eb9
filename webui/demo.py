"""``launch.py --demo``: tiny random-weight models so the whole UI can be tried offline.

The files are real single-file checkpoints in A1111 layout (same loader, detector and pipeline as a 7 GB
file), but their weights are random: every image they make is noise.  Their names say so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from webui.settings import Settings

NOTICE = (
    "These are tiny RANDOM-WEIGHT demo models written by `python launch.py --demo`.\n"
    "They exercise the real loading and generation code but every image they make is noise.\n"
    "Put real checkpoints (.safetensors) into this folder to make real images.\n"
)


def _writers() -> dict[str, tuple[str, Callable[..., Path]]]:
    from webui.models import tiny

    return {
        "sd15": ("Stable-diffusion", lambda d: tiny.write_sd15_checkpoint(d, "demo_sd15_NOISE.safetensors")),
        "sdxl": ("Stable-diffusion", lambda d: tiny.write_sdxl_checkpoint(d, "demo_sdxl_NOISE.safetensors")),
        "vae": ("VAE", lambda d: tiny.write_vae(d, "demo_vae_NOISE.safetensors")),
    }


def write_demo_models(settings: Settings, kinds: Sequence[str] = ("sd15", "sdxl", "vae")) -> list[Path]:
    """Write the demo models into the settings' model folders (skipping ones already there)."""
    folders = {"Stable-diffusion": settings.ckpt_dir, "VAE": settings.vae_dir}
    written = []
    for kind in kinds:
        folder_name, write = _writers()[kind]
        folder = folders[folder_name]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "DEMO_MODELS_MAKE_NOISE.txt").write_text(NOTICE, encoding="utf-8")
        existing = sorted(folder.glob(f"demo_{kind}_NOISE.safetensors"))
        written.append(existing[0] if existing else write(folder))
    return written
