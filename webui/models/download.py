"""The "Download a starter model" feature: a short curated list and a resumable, verified, atomic download.

How: the URL comes from ``huggingface_hub.hf_hub_url`` (``<endpoint>/<repo>/resolve/<revision>/<file>``; the
endpoint is the ``endpoint`` argument, else ``$HF_ENDPOINT`` read at call time, else huggingface.co) and the
bytes are streamed with ``httpx``, not ``hf_hub_download``: huggingface_hub reads ``HF_HUB_OFFLINE`` once at
import and then refuses every request, and the app sets it globally (``settings.apply_offline_env``), yet an
explicit click must work without flipping global state. Streaming ourselves also writes straight into
``models/Stable-diffusion`` (no 7 GB cache copy), hashes while streaming and reports progress per chunk.

* A HEAD (relative redirects only, like huggingface_hub) reads the hub's LFS headers: ``X-Linked-Etag``
  (= sha256) and ``X-Linked-Size``.
* Bytes go to ``dest_dir/.<file>.part``. A retry after a dropped connection, or a later call, hashes the
  partial and asks for ``Range: bytes=<size>-``; a server that ignores Range (200) makes us start over.
* Verification: the sha256 pinned in ``STARTER_MODELS`` (all three are pinned: the hub's LFS sha256, as
  repeated by several public manifests that pin the same revisions); an entry with ``sha256=None`` is
  checked against the hub's ``X-Linked-Etag``/``ETag``; with neither the download is refused. A mismatch
  deletes the partial and raises ``DownloadError("checksum mismatch ...")``.
* Success: ``fsync`` + ``os.replace`` onto ``dest_dir/<file>``: the final name never holds a half file.

``webui.models.starter_downloads.StarterDownloads`` runs downloads in background threads for the UI to poll.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

import httpx
from huggingface_hub import hf_hub_url

from webui.types import Arch

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_BLOCK = 8 * 1024 * 1024

ProgressFn = Callable[[int, int], None]


class DownloadError(RuntimeError):
    """A download could not finish; the message says why and what the user can do."""


class DownloadCancelled(DownloadError):
    """The user cancelled; the partial file is kept so the next attempt resumes."""


@dataclass(frozen=True, kw_only=True)
class StarterModel:
    key: str
    label: str
    repo_id: str
    filename: str
    revision: str  # a commit hash pins the exact bytes that sha256 describes
    size_bytes: int | None
    sha256: str | None  # None: trust the hub's LFS sha256 at download time
    arch: Arch
    arch_note: str
    license: str
    license_note: str

    @property
    def local_name(self) -> str:
        return Path(self.filename).name

    def page_url(self, endpoint: str | None = None) -> str:
        return f"{resolve_endpoint(endpoint)}/{self.repo_id}"

    def file_url(self, endpoint: str | None = None) -> str:
        return hf_hub_url(self.repo_id, self.filename, revision=self.revision, endpoint=resolve_endpoint(endpoint))


STARTER_MODELS: tuple[StarterModel, ...] = (
    StarterModel(
        key="sd15", label="Stable Diffusion 1.5 (4.3 GB)", arch=Arch.SD1,
        repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5", filename="v1-5-pruned-emaonly.safetensors",
        revision="451f4fe16113bff5a5d2269ed5ad43b0592e9a14", size_bytes=4_265_146_304,
        sha256="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
        arch_note="SD 1.5, 512x512, the largest LoRA/embedding ecosystem; runs on 4 GB VRAM",
        license="CreativeML Open RAIL-M", license_note="use restrictions apply; read them on the model page",
    ),
    StarterModel(
        key="sdxl", label="Stable Diffusion XL base 1.0 (6.9 GB)", arch=Arch.SDXL,
        repo_id="stabilityai/stable-diffusion-xl-base-1.0", filename="sd_xl_base_1.0.safetensors",
        revision="462165984030d82259a11f4367a4eed129e94a7b", size_bytes=6_938_078_334,
        sha256="31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
        arch_note="SDXL base, 1024x1024; 8 GB VRAM recommended",
        license="CreativeML Open RAIL++-M", license_note="use restrictions apply; read them on the model page",
    ),
    StarterModel(
        key="noobai_xl", label="NoobAI-XL 1.1, anime (7.1 GB)", arch=Arch.SDXL,
        repo_id="Laxhar/noobai-XL-1.1", filename="NoobAI-XL-v1.1.safetensors",
        revision="814a274af2b8097c0828819d561ec74c7d0c6cea", size_bytes=7_105_349_958,
        sha256="6681e8e4b134c81f16533acedb0d406d7e5e366e1624b4105178c64d00b05d51",
        arch_note="SDXL architecture (Illustrious-XL derivative), epsilon prediction so plain samplers work; "
        "prompt with Danbooru tags",
        license="Fair AI Public License 1.0-SD",
        license_note="derivatives must be shared under the same license; read it on the model page",
    ),
)


def starter_model(key: str, models: tuple[StarterModel, ...] = STARTER_MODELS) -> StarterModel:
    for model in models:
        if model.key == key:
            return model
    raise KeyError(f"unknown starter model {key!r}; known: {', '.join(m.key for m in models)}")


def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint`` argument, else ``$HF_ENDPOINT`` (read now, not at import), else huggingface.co."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def manual_instructions(model: StarterModel, dest_dir: Path, endpoint: str | None = None) -> str:
    """What the UI shows when it cannot download: where to get the file and where to put it."""
    return (
        f"Download {model.local_name} yourself from {model.file_url(endpoint)} and put it in {dest_dir}, "
        "then press Refresh."
    )


def partial_path(model: StarterModel, dest_dir: Path) -> Path:
    return Path(dest_dir) / f".{model.local_name}.part"


@dataclass(frozen=True)
class _Remote:
    size: int | None
    sha256: str | None


def _sha_from_etag(value: str | None) -> str | None:
    value = (value or "").strip().removeprefix("W/").strip('"').lower()
    return value if _SHA256_RE.match(value) else None  # a 40-hex git sha1 ETag is not a content sha256


def _head(client: httpx.Client, url: str) -> _Remote:
    """HEAD like huggingface_hub: follow only relative redirects (renamed repos), read the hub headers."""
    for _ in range(5):
        r = client.head(url, follow_redirects=False)
        location = r.headers.get("location")
        if not (r.is_redirect and location and not urlsplit(location).netloc):
            break
        url = urljoin(url, location)
    _raise_for_status(r, url)
    size = r.headers.get("x-linked-size") or (None if r.is_redirect else r.headers.get("content-length"))
    sha = _sha_from_etag(r.headers.get("x-linked-etag")) or _sha_from_etag(r.headers.get("etag"))
    return _Remote(size=int(size) if size else None, sha256=sha)


def _raise_for_status(r: httpx.Response, url: str) -> None:
    if r.status_code < 400:
        return
    if r.status_code in (401, 403):
        raise DownloadError(
            f"{url} answered {r.status_code}: this model needs a Hugging Face login or accepting its license. "
            "Accept it on the model page, set HF_TOKEN (or run `hf auth login`) and try again."
        )
    if r.status_code == 404:
        raise DownloadError(f"{url} was not found (404): the file or revision is gone from the hub.")
    raise httpx.HTTPStatusError(f"{url} answered {r.status_code}", request=r.request, response=r)


def _hash_file(path: Path, hasher, cancel: threading.Event | None) -> int:
    done = 0
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled(f"cancelled while checking {path.name}")
            hasher.update(block)
            done += len(block)
    return done


class _Sink:
    """The ``.part`` file plus the running hash and byte count of what it holds."""

    def __init__(self, part: Path, name: str, cancel: threading.Event | None):
        self.part = part
        self.name = name
        self.hasher = hashlib.sha256()
        self.done = _hash_file(part, self.hasher, cancel) if part.exists() else 0
        self.fh = part.open("ab")

    def restart(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.hasher = hashlib.sha256()
        self.done = 0

    def write(self, chunk: bytes) -> None:
        self.fh.write(chunk)
        self.hasher.update(chunk)
        self.done += len(chunk)

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def _stream_once(client, url, sink: _Sink, total, on_progress, cancel) -> None:
    headers = {"Range": f"bytes={sink.done}-"} if sink.done else {}
    with client.stream("GET", url, headers=headers, follow_redirects=True) as r:
        if r.status_code == 416 and total is not None and sink.done == total:
            return  # the partial is already complete
        _raise_for_status(r, url)
        if sink.done and r.status_code == 200:
            sink.restart()  # the server ignored Range: start over
        elif r.status_code == 206:
            start = int(re.match(r"bytes (\d+)-", r.headers.get("content-range", "bytes 0-")).group(1))
            if start != sink.done:
                raise DownloadError(f"{url} resumed at byte {start} instead of {sink.done}")
        for chunk in r.iter_bytes():
            sink.write(chunk)
            if total is not None and sink.done > total:
                raise DownloadError(f"{url} sent more than the {total} bytes the hub announced")
            if on_progress is not None:
                on_progress(sink.done, total or 0)
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled(
                    f"Download of {sink.name} cancelled at {sink.done} bytes; the next attempt resumes."
                )


def download_starter(
    model: StarterModel,
    dest_dir: Path,
    *,
    endpoint: str | None = None,
    on_progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    token: str | None = None,
    retries: int = 3,
    retry_delay_s: float = 0.5,
) -> Path:
    """Download ``model`` into ``dest_dir`` (resuming, verifying, atomically) and return the final path.

    ``on_progress(done, total)`` is called on the calling thread after every chunk (total is 0 when the hub
    does not say). ``cancel`` stops after the current chunk with ``DownloadCancelled`` and keeps the
    partial. A dropped connection is retried ``retries`` times with exponential back-off, each retry
    resuming with a Range request. ``token`` defaults to ``huggingface_hub.get_token()`` (HF_TOKEN or the
    saved login). An existing final file is verified and returned. Raises ``DownloadError`` (user-facing
    message) on any failure.
    """
    dest_dir = Path(dest_dir)
    base = resolve_endpoint(endpoint)
    url = model.file_url(base)
    final, part = dest_dir / model.local_name, partial_path(model, dest_dir)
    if final.exists() and model.sha256:  # pinned: no need to ask the hub (works offline)
        return _check_existing(final, model.sha256, cancel)
    with _client(token) as client:
        try:
            remote = _head(client, url)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise DownloadError(
                f"Could not reach {base}: this machine seems offline ({exc.__class__.__name__}). "
                + manual_instructions(model, dest_dir, base)
            ) from exc
        except httpx.HTTPError as exc:
            raise DownloadError(
                f"Could not ask {base} about {model.local_name} ({exc}). " + manual_instructions(model, dest_dir, base)
            ) from exc
        expected = _expected_sha(model, remote, url)
        total = remote.size if remote.size is not None else model.size_bytes
        if final.exists():
            return _check_existing(final, expected, cancel)
        dest_dir.mkdir(parents=True, exist_ok=True)
        _check_space(dest_dir, total, part)
        sink = _Sink(part, model.local_name, cancel)
        try:
            if total is not None and sink.done > total:
                sink.restart()  # not a prefix of this file
            if on_progress is not None and sink.done:
                on_progress(sink.done, total or 0)
            _stream_with_retries(client, url, sink, total, on_progress, cancel, retries, retry_delay_s)
        finally:
            sink.close()
    _finish(sink, part, final, expected, total, url)
    return final


def _client(token: str | None) -> httpx.Client:
    if token is None:
        from huggingface_hub import get_token  # reads HF_TOKEN or the saved login; no network

        token = get_token()
    auth = {"Authorization": f"Bearer {token}"} if token else {}  # httpx drops it on cross-host redirects
    return httpx.Client(
        timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        headers={"Accept-Encoding": "identity", "User-Agent": "webui-starter-download/1", **auth},
    )


def _expected_sha(model: StarterModel, remote: _Remote, url: str) -> str:
    if model.sha256 and remote.sha256 and model.sha256 != remote.sha256:
        raise DownloadError(
            f"{url} now serves a different file (sha256 {remote.sha256[:12]}...) than the pinned "
            f"{model.sha256[:12]}...; not downloading it."
        )
    expected = model.sha256 or remote.sha256
    if not expected:
        raise DownloadError(f"{url}: the hub reported no sha256 for this file, so it cannot be verified.")
    return expected


def _check_existing(final: Path, expected: str, cancel) -> Path:
    hasher = hashlib.sha256()
    _hash_file(final, hasher, cancel)
    if hasher.hexdigest() == expected:
        return final
    raise DownloadError(f"{final} already exists but is a different file; move or delete it, then try again.")


def _check_space(dest_dir: Path, total: int | None, part: Path) -> None:
    need = (total or 0) - (part.stat().st_size if part.exists() else 0)
    if need > (free := shutil.disk_usage(dest_dir).free):
        raise DownloadError(
            f"Not enough disk space in {dest_dir}: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free."
        )


def _stream_with_retries(client, url, sink, total, on_progress, cancel, retries, delay) -> None:
    for attempt in range(retries + 1):
        try:
            _stream_once(client, url, sink, total, on_progress, cancel)
            if total is None or sink.done >= total:
                return
            error: Exception = DownloadError(f"connection closed at {sink.done} of {total} bytes")
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            error = exc
        if attempt < retries:
            if cancel is not None and cancel.wait(delay * 2**attempt):
                raise DownloadCancelled(f"Download of {url} cancelled; the next attempt resumes.")
            if cancel is None:
                time.sleep(delay * 2**attempt)
    raise DownloadError(
        f"Download of {url} was interrupted ({error}) after {retries + 1} attempts; "
        f"{sink.done} bytes are kept in {sink.part} and the next attempt resumes from there."
    )


def _finish(sink: _Sink, part: Path, final: Path, expected: str, total: int | None, url: str) -> None:
    got = sink.hasher.hexdigest()
    if got != expected or (total is not None and sink.done != total):
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {final.name} from {url}: expected sha256 {expected}, got {got} "
            f"({sink.done} bytes). The damaged download was deleted; try again."
        )
    os.replace(part, final)
