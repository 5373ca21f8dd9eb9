"""Starter-model download against a local fake hub: atomic, resumable, verified, offline-friendly."""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.fixtures.fake_hub import FakeHub
from webui.models.download import (
    STARTER_MODELS,
    DownloadCancelled,
    DownloadError,
    StarterModel,
    download_starter,
    partial_path,
    starter_model,
)
from webui.models.starter_downloads import StarterDownloads
from webui.types import Arch

REPO = "test-org/tiny-sd"
FILE = "tiny-model.safetensors"


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(32, 4, 3, 3, generator=g),
        "model.diffusion_model.out.2.weight": torch.randn(4, 32, 3, 3, generator=g),
        "first_stage_model.decoder.conv_in.weight": torch.randn(64, 4, 3, 3, generator=g),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(64, 48, generator=g),
    }
    path = tmp_path_factory.mktemp("fixture") / FILE
    save_file(tensors, str(path))
    data = path.read_bytes()
    assert len(data) > 20_000
    return data


@pytest.fixture(autouse=True)
def _no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved login either
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as the app runs: an explicit download must still work


@pytest.fixture
def hub(tiny_bytes):
    with FakeHub() as h:
        h.add_file(REPO, FILE, tiny_bytes)
        yield h


@pytest.fixture
def model(tiny_bytes) -> StarterModel:
    return StarterModel(
        key="tiny", label="Tiny", repo_id=REPO, filename=FILE, revision="main",
        size_bytes=len(tiny_bytes), sha256=hashlib.sha256(tiny_bytes).hexdigest(),
        arch=Arch.SD1, arch_note="tiny", license="test", license_note="",
    )


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "models" / "Stable-diffusion"


def _gets(hub: FakeHub) -> list:
    return [r for r in hub.requests if r[0] == "GET"]


@pytest.mark.parametrize("redirect", [False, True], ids=["direct", "cdn-redirect"])
def test_full_download_lands_atomically(hub, model, dest, tiny_bytes, redirect):
    hub.redirect = redirect
    hub.chunk_size, hub.delay_s = 4096, 0.005  # several network reads -> several progress calls
    final = dest / FILE
    seen: list[tuple[int, int]] = []

    def progress(done, total):
        assert not final.exists(), "the final name must never hold a half-written file"
        seen.append((done, total))

    path = download_starter(model, dest, endpoint=hub.endpoint, on_progress=progress)

    assert path == final and path.read_bytes() == tiny_bytes
    assert sorted(p.name for p in dest.iterdir()) == [FILE]  # no partial left behind
    dones = [d for d, _ in seen]
    assert len(seen) >= 2 and dones == sorted(dones)
    assert seen[-1] == (len(tiny_bytes), len(tiny_bytes))
    assert {t for _, t in seen} == {len(tiny_bytes)}
    if redirect:
        assert any(p.startswith("/cdn/") for _, p, _ in _gets(hub))


def test_dropped_connection_resumes_with_range(hub, model, dest, tiny_bytes):
    hub.cut_after_once(7000)
    seen = []
    path = download_starter(model, dest, endpoint=hub.endpoint, retry_delay_s=0.01,
                            on_progress=lambda d, t: seen.append(d))
    assert path.read_bytes() == tiny_bytes
    assert hub.range_starts() == [7000]
    assert seen == sorted(seen) and seen[-1] == len(tiny_bytes)
    assert not partial_path(model, dest).exists()


def test_interrupted_download_keeps_partial_and_next_call_resumes(hub, model, dest, tiny_bytes):
    hub.cut_after_once(9000)
    with pytest.raises(DownloadError, match="interrupted") as err:
        download_starter(model, dest, endpoint=hub.endpoint, retries=0)
    part = partial_path(model, dest)
    assert "next attempt resumes" in str(err.value)
    assert part.stat().st_size == 9000 and not (dest / FILE).exists()

    seen = []
    path = download_starter(model, dest, endpoint=hub.endpoint, on_progress=lambda d, t: seen.append(d))
    assert path.read_bytes() == tiny_bytes
    assert hub.range_starts() == [9000]
    assert seen[0] == 9000 and seen[-1] == len(tiny_bytes)
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(hub, model, dest, tiny_bytes):
    dest.mkdir(parents=True)
    partial_path(model, dest).write_bytes(tiny_bytes[:5000])
    hub.ignore_range = True
    path = download_starter(model, dest, endpoint=hub.endpoint)
    assert path.read_bytes() == tiny_bytes
    assert hub.range_starts() == [5000]


@pytest.mark.parametrize("extra", [0, 100], ids=["partial-complete", "partial-too-long"])
def test_odd_partials_end_verified(hub, model, dest, tiny_bytes, extra):
    dest.mkdir(parents=True)
    partial_path(model, dest).write_bytes(tiny_bytes + b"x" * extra)
    assert download_starter(model, dest, endpoint=hub.endpoint).read_bytes() == tiny_bytes
    assert hub.range_starts() == ([len(tiny_bytes)] if extra == 0 else [])  # too long: restart from 0
    assert not partial_path(model, dest).exists()


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned-sha", "hub-sha"])
def test_corrupt_content_raises_and_leaves_nothing(hub, model, dest, pinned):
    hub.corrupt = True
    if not pinned:
        model = replace(model, sha256=None)  # verified against the hub's X-Linked-Etag instead
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_starter(model, dest, endpoint=hub.endpoint)
    assert not (dest / FILE).exists()
    assert not partial_path(model, dest).exists()


def test_pinned_sha_differing_from_hub_refuses_before_downloading(hub, model, dest):
    with pytest.raises(DownloadError, match="different file"):
        download_starter(replace(model, sha256="0" * 64), dest, endpoint=hub.endpoint)
    assert _gets(hub) == []


def test_missing_file_says_not_found(hub, model, dest):
    with pytest.raises(DownloadError, match="not found"):
        download_starter(replace(model, filename="nope.safetensors"), dest, endpoint=hub.endpoint)


def test_existing_verified_file_is_returned_without_download(hub, model, dest, tiny_bytes):
    dest.mkdir(parents=True)
    (dest / FILE).write_bytes(tiny_bytes)
    assert download_starter(model, dest, endpoint=hub.endpoint) == dest / FILE
    assert _gets(hub) == []
    (dest / FILE).write_bytes(b"something else")
    with pytest.raises(DownloadError, match="already exists"):
        download_starter(model, dest, endpoint=hub.endpoint)


def _closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_endpoint_says_offline_quickly(model, dest):
    endpoint = _closed_port_endpoint()
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download_starter(model, dest, endpoint=endpoint)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert f"Could not reach {endpoint}" in msg and "offline" in msg
    assert f"{endpoint}/{REPO}/resolve/main/{FILE}" in msg
    assert str(dest) in msg and "Refresh" in msg
    assert not dest.exists() or not any(dest.iterdir())


def test_endpoint_comes_from_hf_endpoint_env(hub, model, dest, tiny_bytes, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint + "/")
    assert download_starter(model, dest).read_bytes() == tiny_bytes
    assert _gets(hub)


def test_cancel_keeps_partial_and_resume_finishes(hub, model, dest, tiny_bytes):
    hub.chunk_size, hub.delay_s = 512, 0.01
    cancel = threading.Event()

    def progress(done, total):
        if done >= 2048:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        download_starter(model, dest, endpoint=hub.endpoint, on_progress=progress, cancel=cancel)
    part = partial_path(model, dest)
    kept = part.stat().st_size
    assert 2048 <= kept < len(tiny_bytes) and not (dest / FILE).exists()

    hub.delay_s = 0.0
    assert download_starter(model, dest, endpoint=hub.endpoint).read_bytes() == tiny_bytes
    assert hub.range_starts() == [kept]


# -- the tracker the UI polls ------------------------------------------------------------------------


def test_tracker_runs_in_background_and_reports(hub, model, dest, tiny_bytes):
    finished = []
    downloads = StarterDownloads(dest, models=(model,), endpoint=hub.endpoint, on_done=finished.append)
    assert downloads.status("tiny").state == "idle"
    first = downloads.start("tiny")
    assert first.state in ("running", "done")
    status = downloads.wait("tiny", timeout=30)
    assert status.state == "done", status.message
    assert status.path == dest / FILE and status.fraction == 1.0 and not status.active
    assert status.done == status.total == len(tiny_bytes)
    assert finished == [dest / FILE]
    with pytest.raises(KeyError):
        downloads.status("sd15")


def test_tracker_cancel_and_failure(hub, model, dest):
    hub.chunk_size, hub.delay_s = 256, 0.02
    downloads = StarterDownloads(dest, models=(model,), endpoint=hub.endpoint)
    downloads.start("tiny")
    deadline = time.monotonic() + 10
    while downloads.status("tiny").done == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert downloads.start("tiny").state == "running"  # a second click does not start a second thread
    downloads.cancel("tiny")
    status = downloads.wait("tiny", timeout=10)
    assert status.state == "cancelled" and "cancelled" in status.message

    offline = StarterDownloads(dest, models=(model,), endpoint=_closed_port_endpoint())
    offline.start("tiny")
    status = offline.wait("tiny", timeout=10)
    assert status.state == "failed" and "offline" in status.message


def test_curated_list_is_well_formed():
    keys = [m.key for m in STARTER_MODELS]
    assert len(set(keys)) == len(keys) == 3
    assert {m.arch for m in STARTER_MODELS} == {Arch.SD1, Arch.SDXL}
    for m in STARTER_MODELS:
        assert m.filename.endswith(".safetensors")
        assert m.sha256 is None or (len(m.sha256) == 64 and int(m.sha256, 16) >= 0)
        assert len(m.revision) == 40 and m.size_bytes and m.size_bytes > 1e9
        assert m.file_url("https://huggingface.co") == (
            f"https://huggingface.co/{m.repo_id}/resolve/{m.revision}/{m.filename}")
    assert starter_model("sdxl").filename == "sd_xl_base_1.0.safetensors"
    with pytest.raises(KeyError):
        starter_model("nope")
