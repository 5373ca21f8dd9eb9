"""Shared pytest setup: offline environment and session-wide tiny model fixtures.

Keep additions here additive; fixtures that build models live in ``tests/fixtures/factory.py``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def fixture_cache(request, tmp_path_factory):
    """Cross-session cache of built fixtures (``.pytest_cache/d/webui_tiny_models``; override with
    ``WEBUI_FIXTURE_CACHE``; per-session temp folder when the cache plugin is off)."""
    from tests.fixtures.factory import FixtureCache

    root = os.environ.get("WEBUI_FIXTURE_CACHE")
    if root is None:
        cache = getattr(request.config, "cache", None)
        root = cache.mkdir("webui_tiny_models") if cache is not None else tmp_path_factory.mktemp("tiny_cache")
    return FixtureCache(Path(root))


@pytest.fixture(scope="session")
def tiny_models(fixture_cache, tmp_path_factory):
    """``TinyModels``: A1111-style ``models/`` tree of tiny checkpoints, VAEs and a diffusers folder.

    ``tiny_models.sd15`` / ``.sd15_inpaint`` / ``.sd2v`` / ``.sdxl`` / ``.sdxl_inpaint`` / ``.sdxl_vpred`` /
    ``.sdxl_refiner`` / ``.diffusers_sd15`` / ``.vae`` / ``.sdxl_vae`` are paths (built on first use);
    ``tiny_models.models_dir`` builds them all.  Files are hard links into the cache: copy before editing.
    """
    from tests.fixtures.factory import TinyModels

    return TinyModels(tmp_path_factory.mktemp("webui_data"), fixture_cache)
