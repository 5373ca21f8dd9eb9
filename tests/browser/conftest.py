"""Browser tests: the real app in a real Chromium (Playwright, sync API), selected by elem_id.

Chromium is the system one (``/usr/bin/chromium``, or ``$WEBUI_CHROMIUM``); nothing is downloaded.  The
tests skip when Playwright or the browser is missing.  Screenshots go to ``$WEBUI_SCREENSHOTS`` (default
``/tmp/webui-screenshots``) so a person can look at the layout.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.fixtures.net import free_port

CHROMIUM = os.environ.get("WEBUI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(os.environ.get("WEBUI_SCREENSHOTS", "/tmp/webui-screenshots"))


def start_app(data_dir: Path):
    from webui.app import start
    from webui.settings import Settings

    return start(Settings.for_data_dir(data_dir, port=free_port()))


@pytest.fixture(scope="session")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


@pytest.fixture
def phone(chromium):
    context = chromium.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                                   is_mobile=True, has_touch=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="module")
def ui_app(tiny_models, tmp_path_factory):
    """The app on one tiny SD1.5 checkpoint plus a truncated (unusable) file."""
    data = tmp_path_factory.mktemp("ui_browser")
    ckpt_dir = data / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    source = tiny_models.sd15.read_bytes()
    (ckpt_dir / "tiny_sd15.safetensors").write_bytes(source)
    (ckpt_dir / "broken.safetensors").write_bytes(source[: len(source) // 2])
    running = start_app(data)
    yield running
    running.close()


@pytest.fixture(scope="module")
def empty_app(tmp_path_factory):
    running = start_app(tmp_path_factory.mktemp("ui_empty"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def starter_app(tiny_models, tmp_path_factory):
    """An empty models folder whose "Download a starter model" list holds one tiny model on a local fake hub."""
    import hashlib

    from tests.fixtures.fake_hub import FakeHub
    from webui.context import AppContext
    from webui.models.download import StarterModel
    from webui.models.starter_downloads import StarterDownloads
    from webui.settings import Settings
    from webui.types import Arch
    from webui.ui import build_ui

    data = tiny_models.sd15.read_bytes()
    model = StarterModel(
        key="tiny", label="Tiny SD 1.5 (test)", repo_id="test-org/tiny-sd", filename="tiny_starter.safetensors",
        revision="main", size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), arch=Arch.SD1,
        arch_note="a tiny random SD 1.5", license="test", license_note="test only",
    )
    settings = Settings.for_data_dir(tmp_path_factory.mktemp("ui_starter"), port=free_port())
    with FakeHub() as hub:
        hub.add_file(model.repo_id, model.filename, data)
        ctx = AppContext.create(settings)
        ctx.downloads = StarterDownloads(settings.ckpt_dir, models=(model,), endpoint=hub.endpoint,
                                         on_done=lambda _path: ctx.catalog.refresh("checkpoint"))
        blocks = build_ui(ctx)
        _, url, _ = blocks.launch(server_name="127.0.0.1", server_port=settings.port, prevent_thread_lock=True,
                                  quiet=True, allowed_paths=[str(settings.outdir)],
                                  **blocks.webui_launch_kwargs)
        try:
            yield type("StarterApp", (), {"url": url, "ctx": ctx})()
        finally:
            blocks.close()
            ctx.close()
