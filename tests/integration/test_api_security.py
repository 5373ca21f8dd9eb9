"""Safe by default: credentials on every API route, no path traversal, size limits, refusing open listens."""
from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from webui.api import install_routes
from webui.api.auth import BasicAuth, basic_header, parse_basic_header
from webui.api.files import output_url, resolve_file
from webui.api.routing import ApiError
from webui.settings import Settings
from tests.fixtures.net import free_port

USERS = "alice:s3cret,bob:pa:ss:word"


def raw_get(base_url: str, raw_path: str, headers: dict | None = None) -> int:
    """GET with the path sent exactly as written (httpx would normalise '..' away)."""
    host, port = base_url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("GET", raw_path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# ------------------------------------------------------------------------ pure: file resolution and auth
@pytest.fixture()
def roots(tmp_path):
    outputs, models, secret = tmp_path / "outputs", tmp_path / "models", tmp_path / "secret"
    for folder in (outputs / "txt2img", models, secret):
        folder.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(outputs / "txt2img" / "00001-1.png")
    Image.new("RGB", (4, 4)).save(secret / "private.png")
    (outputs / "notes.txt").write_text("not an image")
    (outputs / ".hidden.png").write_bytes((outputs / "txt2img" / "00001-1.png").read_bytes())
    (models / "model.safetensors").write_bytes(b"weights")
    Image.new("RGB", (4, 4)).save(models / "model.preview.png")
    os.symlink(secret / "private.png", outputs / "escape.png")
    os.symlink(secret, outputs / "linkdir")
    os.symlink(outputs / "txt2img" / "00001-1.png", outputs / "inside.png")
    return {"outputs": outputs, "models/checkpoint": models}


@pytest.mark.parametrize("path, status", [
    ("outputs/../secret/private.png", 403),
    ("outputs/txt2img/../../secret/private.png", 403),
    ("../secret/private.png", 403),
    ("/etc/passwd", 403),
    ("outputs//etc/passwd", 404),
    ("C:/Windows/win.ini", 403),
    ("outputs\\..\\secret\\private.png", 403),
    ("outputs/escape.png", 403),
    ("outputs/linkdir/private.png", 403),
    ("outputs/x\x00.png", 403),
    ("outputs/./txt2img/00001-1.png", 403),
    ("outputs/notes.txt", 404),
    ("outputs/.hidden.png", 404),
    ("outputs/missing.png", 404),
    ("models/checkpoint/model.safetensors", 404),
    ("secret/private.png", 404),
    ("outputs", 404),
])
def test_resolve_file_refuses(roots, path, status):
    with pytest.raises(ApiError) as info:
        resolve_file(path, roots)
    assert info.value.status == status


def test_resolve_file_serves_outputs_previews_and_inner_links(roots):
    assert resolve_file("outputs/txt2img/00001-1.png", roots).name == "00001-1.png"
    assert resolve_file("models/checkpoint/model.preview.png", roots).name == "model.preview.png"
    assert resolve_file("outputs/inside.png", roots).name == "00001-1.png"
    outdir = roots["outputs"]
    assert output_url(outdir / "txt2img" / "00001-1.png", outdir) == "/webui/v1/files/outputs/txt2img/00001-1.png"
    assert output_url(outdir.parent / "secret" / "private.png", outdir) is None
    assert output_url(None, outdir) is None


def test_basic_auth_checks():
    auth = BasicAuth((("alice", "s3cret"), ("bob", "pa:ss")))
    assert auth.check_header(basic_header("alice", "s3cret")) == "alice"
    assert auth.check_header(basic_header("bob", "pa:ss")) == "bob"
    for header in (None, "", basic_header("alice", "wrong"), basic_header("eve", "s3cret"), "Bearer abc",
                   "Basic !!!notbase64", "Basic " + base64.b64encode(b"no-colon").decode(), basic_header("alice", "")):
        assert auth.check_header(header) is None, header
    assert parse_basic_header(basic_header("ü", "p:w")) == ("ü", "p:w")
    settings = SimpleNamespace(api_auth=(), gradio_auth=(("ui", "pw"),))
    assert BasicAuth.from_settings(settings).credentials == (("ui", "pw"),), "API falls back to the UI login"
    assert not BasicAuth.from_settings(SimpleNamespace(api_auth=(), gradio_auth=())).enabled


# ------------------------------------------------------------------------ launched app with --api-auth
@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    from webui.app import start
    from webui.settings import parse_auth

    data = tmp_path_factory.mktemp("secure_data")
    settings = Settings.for_data_dir(data, port=free_port(), api=True, nowebui=True, api_auth=parse_auth(USERS))
    outside = data / "outside"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    settings.outdir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(settings.outdir / "ok.png")
    os.symlink(outside / "secret.png", settings.outdir / "link.png")
    running = start(settings)
    try:
        yield SimpleNamespace(running=running, url=running.url.rstrip("/"), settings=settings)
    finally:
        running.close()


ALICE = {"Authorization": basic_header("alice", "s3cret")}
ROUTES = [("GET", "/sdapi/v1/options"), ("POST", "/sdapi/v1/options"), ("POST", "/sdapi/v1/txt2img"),
          ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"), ("GET", "/sdapi/v1/sd-models"),
          ("POST", "/sdapi/v1/img2img"), ("GET", "/sdapi/v1/cmd-flags"), ("POST", "/sdapi/v1/png-info"),
          ("GET", "/webui/v1/queue"), ("POST", "/webui/v1/jobs"), ("GET", "/webui/v1/jobs/x/events"),
          ("DELETE", "/webui/v1/jobs/x"), ("GET", "/webui/v1/files/outputs/ok.png"), ("GET", "/docs"),
          ("GET", "/openapi.json")]


@pytest.mark.parametrize("method, path", ROUTES)
def test_every_route_needs_credentials(secured, method, path):
    response = httpx.request(method, secured.url + path, content=b"{broken json", timeout=30,
                             headers={"content-type": "application/json"})
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Basic")
    wrong = httpx.request(method, secured.url + path, timeout=30,
                          headers={"Authorization": basic_header("alice", "nope")})
    assert wrong.status_code == 401


def test_valid_credentials_work(secured):
    assert httpx.get(secured.url + "/sdapi/v1/options", headers=ALICE, timeout=30).status_code == 200
    bob = {"Authorization": basic_header("bob", "pa:ss:word")}
    assert httpx.get(secured.url + "/webui/v1/queue", headers=bob, timeout=30).status_code == 200
    flags = httpx.get(secured.url + "/sdapi/v1/cmd-flags", headers=ALICE, timeout=30).json()
    assert flags["api_auth"] == "<set>" and "s3cret" not in json.dumps(flags)
    ok = httpx.get(secured.url + "/webui/v1/files/outputs/ok.png", headers=ALICE, timeout=30)
    assert ok.status_code == 200 and ok.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("raw_path", [
    "/webui/v1/files/outputs/../outside/secret.png",
    "/webui/v1/files/outputs/%2e%2e/outside/secret.png",
    "/webui/v1/files/outputs/%2E%2E%2Foutside%2Fsecret.png",
    "/webui/v1/files/outputs/..%5coutside%5csecret.png",
    "/webui/v1/files/outputs/%252e%252e/outside/secret.png",
    "/webui/v1/files//etc/passwd",
    "/webui/v1/files/%2fetc%2fpasswd",
    "/webui/v1/files/outputs/link.png",
    "/webui/v1/files/outputs/../../../../../../etc/passwd",
    "/webui/v1/files/models/checkpoint/../../outside/secret.png",
    "/webui/v1/files/outputs/ok.png%00.txt",
    "/webui/v1/files/config.json",
])
def test_traversal_attempts_are_refused(secured, raw_path):
    assert raw_get(secured.url, raw_path, ALICE) in (403, 404)
    assert raw_get(secured.url, raw_path) == 401


def test_declared_oversized_body_is_refused(secured):
    host, port = secured.url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/sdapi/v1/png-info")
        conn.putheader("Authorization", ALICE["Authorization"])
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(200 * 1024 * 1024))
        conn.endheaders()
        conn.send(b"{}")
        response = conn.getresponse()
        assert response.status == 413 and b"limit" in response.read()
    finally:
        conn.close()


def test_streamed_body_over_the_limit_is_refused(secured):
    ctx = dataclasses.replace(secured.running.ctx)
    app = FastAPI()
    install_routes(app, ctx, max_body=4096)
    client = TestClient(app, headers=ALICE)
    big = base64.b64encode(os.urandom(8192)).decode()
    assert client.post("/sdapi/v1/png-info", json={"image": big}).status_code == 413
    small = client.post("/sdapi/v1/png-info", json={"image": "aGVsbG8="})
    assert small.status_code == 422 and "not a PNG" in small.json()["detail"]


def test_gradio_auth_also_protects_the_api(tmp_path):
    from webui.app import start

    settings = Settings.for_data_dir(tmp_path, port=free_port(), nowebui=True, gradio_auth=(("ui", "pw"),))
    running = start(settings)
    try:
        url = running.url.rstrip("/")
        assert httpx.get(url + "/sdapi/v1/options", timeout=30).status_code == 401
        auth = {"Authorization": basic_header("ui", "pw")}
        assert httpx.get(url + "/sdapi/v1/options", headers=auth, timeout=30).status_code == 200
    finally:
        running.close()


def test_sdapi_only_with_api_flag(secured):
    ctx = dataclasses.replace(secured.running.ctx,
                              settings=secured.settings.with_changes(api=False, nowebui=False, api_auth=()))
    app = FastAPI()
    install_routes(app, ctx)
    client = TestClient(app)
    assert client.get("/sdapi/v1/options").status_code == 404
    assert client.get("/webui/v1/queue").status_code == 200


# ------------------------------------------------------------------------ launch.py refuses open listens
@pytest.mark.parametrize("flags, needle", [
    (["--listen"], "--listen (0.0.0.0)"),
    (["--share"], "--share"),
    (["--server-name", "192.168.1.5"], "--listen (192.168.1.5)"),
])
def test_public_listen_without_credentials_refuses_to_start(tmp_path, capsys, flags, needle):
    import launch

    code = launch.main([*flags, "--nowebui", "--no-browser", "--data-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "--insecure" in err and "--gradio-auth" in err


def test_malformed_credentials_refuse_to_start(tmp_path, capsys):
    import launch

    assert launch.main(["--api-auth", "just-a-name", "--nowebui", "--data-dir", str(tmp_path)]) == 2
    assert "user:password" in capsys.readouterr().err


def test_public_listen_is_allowed_with_credentials_or_insecure(tmp_path):
    base = Settings.for_data_dir(tmp_path, host="0.0.0.0")
    base.with_changes(api_auth=(("u", "p"),)).check_safe()
    base.with_changes(gradio_auth=(("u", "p"),)).check_safe()
    base.with_changes(insecure=True).check_safe()
    Settings.for_data_dir(tmp_path).check_safe()
    assert Path(tmp_path).exists()
