"""Install an extension from a local folder or a git URL into the user's extensions dir.

Refused unless ``settings.extension_install_allowed`` (localhost, or ``--enable-insecure-extension-access``):
an extension runs arbitrary code with the app's rights.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

from webui.plugins.discovery import MANIFEST, ManifestError, parse_manifest

GIT_PREFIXES = ("https://", "http://", "ssh://", "git://", "file://", "git@")
REFUSED = ("Installing extensions is turned off because the app listens on a public address (--listen, "
           "--share or --server-name). Extensions run code on this machine; restart with "
           "--enable-insecure-extension-access only if you trust everyone who can reach it.")


class InstallError(ValueError):
    """The source is not an extension or could not be fetched; the message says what to do."""


def _manifest_name(folder: Path) -> str:
    try:
        return parse_manifest((folder / MANIFEST).read_text(encoding="utf-8"), where=str(folder / MANIFEST)).name
    except FileNotFoundError:
        raise InstallError(f"{folder} has no {MANIFEST}; an extension folder needs one (name, version, api)") from None
    except ManifestError as exc:
        raise InstallError(str(exc)) from None


def install(source: str, *, target_root: Path, allowed: bool, git: str = "git", timeout: float = 300) -> Path:
    """Copy a folder or ``git clone`` a repository to ``target_root/<name>``; returns the new folder."""
    if not allowed:
        raise PermissionError(REFUSED)
    source = (source or "").strip()
    if not source or source.startswith("-"):
        raise InstallError("enter a git URL (https://...) or the path of a local extension folder")
    target_root.mkdir(parents=True, exist_ok=True)
    local = Path(source).expanduser()
    if local.is_dir() and (local / MANIFEST).is_file():
        name = _manifest_name(local)
        target = target_root / name
        if target.exists():
            raise InstallError(f"an extension named {name!r} is already installed at {target}")
        shutil.copytree(local, target, ignore=shutil.ignore_patterns(".git", "__pycache__"))
        return target
    if not (source.startswith(GIT_PREFIXES) or local.is_dir()):
        raise InstallError(f"{source!r} is neither an extension folder (with {MANIFEST}) nor a git URL")
    staging = target_root / f".install-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        try:
            done = subprocess.run([git, "clone", "--depth", "1", "--", source, str(staging)], capture_output=True,
                                  text=True, timeout=timeout, env=env, check=False)
        except FileNotFoundError:
            raise InstallError("git is not installed; install it or copy the extension folder by hand") from None
        except subprocess.TimeoutExpired:
            raise InstallError(f"git clone of {source} took longer than {timeout:.0f} s") from None
        if done.returncode != 0:
            raise InstallError(f"git clone {source} failed: {done.stderr.strip()[-500:]}")
        name = _manifest_name(staging)
        target = target_root / name
        if target.exists():
            raise InstallError(f"an extension named {name!r} is already installed at {target}")
        os.replace(staging, target)
        return target
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
