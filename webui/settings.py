"""Launch-time settings: A1111-compatible command-line flags -> one frozen ``Settings``.

Runtime, user-editable options (saved in ``config.json``) live in ``webui.options``; these are the
things fixed for the life of a process: where files are, how the server listens, who may log in.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
}

# A1111 folder names under models/, keyed by what lives there.
MODEL_FOLDERS = {
    "checkpoint": "Stable-diffusion",
    "vae": "VAE",
    "lora": "Lora",
    "embedding": "embeddings",
    "esrgan": "ESRGAN",
    "controlnet": "ControlNet",
    "ip_adapter": "ipadapter",
    "clip_vision": "clip_vision",
    "unet": "unet",  # DiT transformer-only files (Flux, SD3, ...), listed as checkpoints
    "text_encoder": "text_encoders",  # split CLIP-L / CLIP-G / T5-XXL / Qwen2.5-VL files
}
# ComfyUI's other names for those two folders: scanned when they exist, never created.
MODEL_FOLDER_ALIASES = {"unet": ("diffusion_models",), "text_encoder": ("clip",), "vae": ("vae",)}


class SettingsError(ValueError):
    """The command line asks for something unsafe or impossible; the message says what to do."""


def apply_offline_env() -> None:
    """Make sure no library phones home or downloads weights behind our back."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def parse_auth(text: str | None) -> tuple[tuple[str, str], ...]:
    """``"u:p,u2:p2"`` -> ``(("u","p"), ("u2","p2"))``; passwords may contain ':'."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise SettingsError(f"credentials {item!r} must look like user:password")
        pairs.append((user, password))
    return tuple(pairs)


@dataclass(frozen=True, kw_only=True)
class Settings:
    data_dir: Path
    ckpt_dir: Path
    vae_dir: Path
    lora_dir: Path
    embeddings_dir: Path
    esrgan_dir: Path
    controlnet_dir: Path
    ipadapter_dir: Path
    clip_vision_dir: Path
    unet_dir: Path
    text_encoders_dir: Path
    outdir: Path
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    gradio_auth: tuple[tuple[str, str], ...] = ()
    api_auth: tuple[tuple[str, str], ...] = ()
    api: bool = False
    nowebui: bool = False
    insecure: bool = False
    enable_insecure_extension_access: bool = False
    allow_pickle: bool = False
    demo: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    extra_ckpt_dirs: tuple[Path, ...] = field(default=())
    extensions_dir: Path | None = None  # None: <data_dir>/extensions (webui.plugins.manager.default_folders)

    @property
    def listens_publicly(self) -> bool:
        return self.host not in ("127.0.0.1", "localhost", "::1") or self.share

    @property
    def config_file(self) -> Path:
        return self.data_dir / "config.json"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def api_enabled(self) -> bool:
        return self.api or self.nowebui

    def model_dirs(self) -> dict[str, Path]:
        return {
            "checkpoint": self.ckpt_dir,
            "vae": self.vae_dir,
            "lora": self.lora_dir,
            "embedding": self.embeddings_dir,
            "esrgan": self.esrgan_dir,
            "controlnet": self.controlnet_dir,
            "ip_adapter": self.ipadapter_dir,
            "clip_vision": self.clip_vision_dir,
            "unet": self.unet_dir,
            "text_encoder": self.text_encoders_dir,
        }

    def alias_model_dirs(self) -> dict[str, tuple[Path, ...]]:
        """``models/diffusion_models``, ``models/clip`` and ``models/vae`` (ComfyUI names), by ``model_dirs`` key."""
        models = self.data_dir / "models"
        return {key: tuple(models / name for name in names) for key, names in MODEL_FOLDER_ALIASES.items()}

    def check_safe(self) -> None:
        """Refuse a public listen or share link without credentials unless --insecure is given."""
        if self.listens_publicly and not (self.gradio_auth or self.api_auth) and not self.insecure:
            where = "--share" if self.share else f"--listen ({self.host})"
            raise SettingsError(
                f"{where} exposes this machine to other people, but no credentials are set. "
                "Add --gradio-auth user:password (and --api-auth for the API), "
                "or pass --insecure if you really want an open server."
            )

    @property
    def extension_install_allowed(self) -> bool:
        return not self.listens_publicly or self.enable_insecure_extension_access

    def with_changes(self, **changes) -> "Settings":
        return replace(self, **changes)

    @classmethod
    def for_data_dir(cls, data_dir: Path | str, **overrides) -> "Settings":
        """Default A1111 layout under one folder; handy for tests and --demo."""
        data_dir = Path(data_dir).resolve()
        models = data_dir / "models"
        dirs = {
            "ckpt_dir": models / MODEL_FOLDERS["checkpoint"],
            "vae_dir": models / MODEL_FOLDERS["vae"],
            "lora_dir": models / MODEL_FOLDERS["lora"],
            "embeddings_dir": models / MODEL_FOLDERS["embedding"],
            "esrgan_dir": models / MODEL_FOLDERS["esrgan"],
            "controlnet_dir": models / MODEL_FOLDERS["controlnet"],
            "ipadapter_dir": models / MODEL_FOLDERS["ip_adapter"],
            "clip_vision_dir": models / MODEL_FOLDERS["clip_vision"],
            "unet_dir": models / MODEL_FOLDERS["unet"],
            "text_encoders_dir": models / MODEL_FOLDERS["text_encoder"],
        }
        values = {"data_dir": data_dir, "outdir": data_dir / "outputs", "extensions_dir": data_dir / "extensions",
                  **dirs}
        values.update(overrides)
        return cls(**values)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description="The WebUI: local image generation workbench")
    p.add_argument("--data-dir", default=None, help="base folder for models/, outputs/, config.json (default: this folder)")
    p.add_argument("--ckpt-dir", help="checkpoint folder (default: <data-dir>/models/Stable-diffusion)")
    p.add_argument("--vae-dir", help="VAE folder (default: <data-dir>/models/VAE)")
    p.add_argument("--lora-dir", help="LoRA folder (default: <data-dir>/models/Lora)")
    p.add_argument("--embeddings-dir", help="textual inversion folder (default: <data-dir>/models/embeddings)")
    p.add_argument("--esrgan-models-path", help="ESRGAN/upscaler folder (default: <data-dir>/models/ESRGAN)")
    p.add_argument("--controlnet-dir", help="ControlNet folder (default: <data-dir>/models/ControlNet)")
    p.add_argument("--ipadapter-dir", help="IP-Adapter folder (default: <data-dir>/models/ipadapter)")
    p.add_argument("--clip-vision-dir", help="CLIP vision encoder folder (default: <data-dir>/models/clip_vision)")
    p.add_argument("--unet-dir", help="DiT transformer files (default: <data-dir>/models/unet)")
    p.add_argument("--text-encoders-dir", help="CLIP/T5 text encoder files (default: <data-dir>/models/text_encoders)")
    p.add_argument("--outdir", help="output folder (default: <data-dir>/outputs)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="listen on 0.0.0.0 (needs --gradio-auth or --insecure)")
    p.add_argument("--server-name", default=None, help="explicit address to listen on")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public share link (needs auth)")
    p.add_argument("--gradio-auth", default=None, help="user:password[,user2:password2] for the UI")
    p.add_argument("--api-auth", default=None, help="user:password[,...] for every API route")
    p.add_argument("--api", action="store_true", help="serve the A1111-compatible /sdapi/v1 API")
    p.add_argument("--nowebui", action="store_true", help="serve only the API")
    p.add_argument("--insecure", action="store_true", help="allow --listen/--share without credentials")
    p.add_argument("--enable-insecure-extension-access", action="store_true")
    p.add_argument("--extensions-dir", help="folder of installed extensions (default: <data-dir>/extensions)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt files (loaded with weights_only)")
    p.add_argument("--demo", action="store_true", help="create tiny random-weight demo models (they make noise)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    return p


def settings_from_args(args: argparse.Namespace, *, default_data_dir: Path) -> Settings:
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir
    overrides: dict = {}
    for flag, key in (
        ("ckpt_dir", "ckpt_dir"),
        ("vae_dir", "vae_dir"),
        ("lora_dir", "lora_dir"),
        ("embeddings_dir", "embeddings_dir"),
        ("esrgan_models_path", "esrgan_dir"),
        ("controlnet_dir", "controlnet_dir"),
        ("ipadapter_dir", "ipadapter_dir"),
        ("clip_vision_dir", "clip_vision_dir"),
        ("unet_dir", "unet_dir"),
        ("text_encoders_dir", "text_encoders_dir"),
        ("outdir", "outdir"),
        ("extensions_dir", "extensions_dir"),
    ):
        value = getattr(args, flag)
        if value:
            overrides[key] = Path(value).expanduser().resolve()
    host = args.server_name or ("0.0.0.0" if args.listen else "127.0.0.1")
    return Settings.for_data_dir(
        data_dir,
        host=host,
        port=args.port,
        share=args.share,
        gradio_auth=parse_auth(args.gradio_auth),
        api_auth=parse_auth(args.api_auth),
        api=args.api,
        nowebui=args.nowebui,
        insecure=args.insecure,
        enable_insecure_extension_access=args.enable_insecure_extension_access,
        allow_pickle=args.allow_pickle,
        demo=args.demo,
        device=args.device,
        precision=args.precision,
        **overrides,
    )
