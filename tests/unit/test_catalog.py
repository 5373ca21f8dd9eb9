"""Catalog: scanning, misplaced/broken files, lookup, lazy cached hashes, incremental refresh, threads."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path

import pytest

import webui.models.catalog as catalog_module
from webui.models.catalog import Catalog, ModelNotFound, ModelRecord
from webui.types import Arch, ModelKind, Variant

HEADERS = Path(__file__).resolve().parents[1] / "fixtures" / "headers"
spec = importlib.util.spec_from_file_location("header_corpus", HEADERS / "build_corpus.py")
bc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bc)


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    dirs = {kind: tmp_path / "models" / folder for kind, folder in (
        ("checkpoint", "Stable-diffusion"), ("vae", "VAE"), ("lora", "Lora"), ("embedding", "embeddings"),
        ("controlnet", "ControlNet"), ("esrgan", "ESRGAN"))}
    for d in dirs.values():
        d.mkdir(parents=True)
    ckpt = dirs["checkpoint"]
    (ckpt / "sdxl").mkdir()
    bc.write_safetensors(ckpt / "tiny_sd1.safetensors", bc.tiny_sd1_checkpoint(), sparse=False)
    bc.write_safetensors(ckpt / "sdxl" / "Illustrious_v1.safetensors", bc.tiny_sdxl_checkpoint(),
                         {"modelspec.title": "Illustrious XL"})
    bc.write_safetensors(ckpt / "b_inpaint.safetensors", bc.tiny_sd1_checkpoint(9))
    bc.write_safetensors(ckpt / "oops_lora.safetensors", bc.load_entry("lora_sd15_kohya")["tensors"])
    bc.write_safetensors(ckpt / "some_vae.safetensors", bc.ldm_vae("", ch=32))
    (ckpt / "old.ckpt").write_bytes(b"\x80\x04not really a pickle")
    cut = bc.write_safetensors(ckpt / "cut.safetensors", bc.tiny_sd1_checkpoint(), sparse=False)
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size - 10)
    (ckpt / ".hidden.safetensors").write_bytes(b"")
    (ckpt / "notes.txt").write_text("not a model")
    diffusers = ckpt / "my-diffusers"
    (diffusers / "unet").mkdir(parents=True)
    (diffusers / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (diffusers / "unet" / "config.json").write_text(json.dumps({"in_channels": 4}))
    bc.write_safetensors(diffusers / "unet" / "diffusion_pytorch_model.safetensors",
                         {"conv_in.weight": ("F32", [4, 4])})
    bc.write_safetensors(dirs["lora"] / "style.safetensors", bc.load_entry("lora_sd15_kohya")["tensors"])
    bc.write_safetensors(dirs["vae"] / "vae-ft-mse.safetensors", bc.ldm_vae("", ch=32))
    (dirs["esrgan"] / "4x-UltraSharp.pth").write_bytes(b"pickle")
    return dirs


def make(models, tmp_path, **kw) -> Catalog:
    catalog = Catalog({k: [v] for k, v in models.items()}, hash_cache_file=tmp_path / "cache" / "hashes.json", **kw)
    catalog.refresh()
    return catalog


def by_name(catalog: Catalog, kind: str) -> dict[str, ModelRecord]:
    return {r.name: r for r in catalog.list(kind)}


def test_scan_records_and_sorting(models, tmp_path):
    catalog = make(models, tmp_path)
    names = [r.name for r in catalog.list("checkpoint")]
    assert names == ["b_inpaint", "cut", "my-diffusers", "old", "oops_lora", "sdxl/Illustrious_v1", "some_vae",
                     "tiny_sd1"]
    recs = by_name(catalog, "checkpoint")
    sd1 = recs["tiny_sd1"]
    assert (sd1.kind, sd1.arch, sd1.variant, sd1.family, sd1.format, sd1.error) == (
        ModelKind.CHECKPOINT, Arch.SD1, Variant.NORMAL, "SD 1.5", "safetensors", None)
    assert sd1.filename == "tiny_sd1.safetensors" and sd1.size == sd1.path.stat().st_size and sd1.mtime > 0
    xl = recs["sdxl/Illustrious_v1"]
    assert (xl.arch, xl.family, xl.relative_filename) == (Arch.SDXL, "Illustrious", "sdxl/Illustrious_v1.safetensors")
    assert recs["b_inpaint"].variant is Variant.INPAINT
    assert recs["my-diffusers"].format == "diffusers" and recs["my-diffusers"].usable
    assert catalog.list(ModelKind.LORA)[0].name == "style"
    assert catalog.list("esrgan")[0].kind is ModelKind.UPSCALER


def test_unusable_files_stay_listed_with_a_reason(models, tmp_path):
    recs = by_name(make(models, tmp_path), "checkpoint")
    assert recs["oops_lora"].kind is ModelKind.LORA
    assert recs["oops_lora"].error == "this is a LoRA, not a checkpoint: move it to models/Lora"
    assert recs["some_vae"].error == "this is a VAE, not a checkpoint: move it to models/VAE"
    assert "file is truncated" in recs["cut"].error and "re-download" in recs["cut"].error
    assert recs["old"].format == "pickle" and "--allow-pickle" in recs["old"].error
    assert by_name(make(models, tmp_path, allow_pickle=True), "checkpoint")["old"].error is None


def test_diffusers_folder_is_one_record_not_descended(models, tmp_path):
    catalog = make(models, tmp_path)
    paths = [r.path for r in catalog.list("checkpoint")]
    assert models["checkpoint"] / "my-diffusers" in paths
    assert not any("unet" in p.parts for p in paths)


def test_get_by_every_form(models, tmp_path):
    catalog = make(models, tmp_path)
    record = catalog.get("checkpoint", "sdxl/Illustrious_v1")
    for query in ("sdxl/Illustrious_v1.safetensors", "Illustrious_v1.safetensors", "Illustrious_v1",
                  "sdxl/illustrious_v1", record.title):
        assert catalog.get("checkpoint", query).path == record.path
    digest = catalog.sha256(record)
    fresh = catalog.get("checkpoint", "sdxl/Illustrious_v1")
    assert fresh.title == f"sdxl/Illustrious_v1.safetensors [{digest[:10]}]" and fresh.short_hash == digest[:10]
    assert catalog.get("checkpoint", digest[:10]).path == record.path
    assert catalog.get("checkpoint", digest).path == record.path
    assert catalog.get("checkpoint", fresh.title).path == record.path
    # an infotext title with a stale hash still finds the file by its name
    assert catalog.get("checkpoint", "tiny_sd1.safetensors [0123456789]").name == "tiny_sd1"


def test_not_found_suggests_close_names(models, tmp_path):
    catalog = make(models, tmp_path)
    with pytest.raises(ModelNotFound) as err:
        catalog.get("checkpoint", "tiny_sd2")
    assert isinstance(err.value, LookupError)
    assert "tiny_sd1" in err.value.suggestions and "tiny_sd1" in str(err.value)


def test_sha256_streams_and_is_cached_by_path_size_mtime(models, tmp_path):
    catalog = make(models, tmp_path)
    record = catalog.get("checkpoint", "tiny_sd1")
    assert record.sha256 is None and record.title == "tiny_sd1.safetensors"
    expected = hashlib.sha256(record.path.read_bytes()).hexdigest()
    assert catalog.sha256(record) == expected
    cache_file = tmp_path / "cache" / "hashes.json"
    assert json.loads(cache_file.read_text())["files"][str(record.path)]["sha256"] == expected
    assert not list(cache_file.parent.glob("*.tmp"))  # written atomically, temp file gone
    # Same size and mtime, different bytes: a new catalog trusts the cache (proves it was used) ...
    st = record.path.stat()
    data = bytearray(record.path.read_bytes())
    data[-1] ^= 0xFF
    record.path.write_bytes(bytes(data))
    os.utime(record.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = make(models, tmp_path)
    assert again.get("checkpoint", "tiny_sd1").sha256 == expected  # known at refresh time, from the cache
    # ... and a changed mtime invalidates it.
    os.utime(record.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again.refresh()
    fresh = again.get("checkpoint", "tiny_sd1")
    assert fresh.sha256 is None
    assert again.sha256(fresh) == hashlib.sha256(bytes(data)).hexdigest()


def test_diffusers_folder_hash_is_stable(models, tmp_path):
    catalog = make(models, tmp_path)
    record = catalog.get("checkpoint", "my-diffusers")
    first = catalog.sha256(record)
    assert len(first) == 64 and make(models, tmp_path).sha256(record) == first


def test_corrupt_hash_cache_is_ignored(models, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "hashes.json").write_text("{broken")
    catalog = make(models, tmp_path)
    record = catalog.get("checkpoint", "tiny_sd1")
    assert catalog.sha256(record) == hashlib.sha256(record.path.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "cache" / "hashes.json").read_text())["version"] == 1


def test_refresh_is_incremental(models, tmp_path, monkeypatch):
    calls = []
    real = catalog_module.detect_path
    monkeypatch.setattr(catalog_module, "detect_path", lambda path, **kw: calls.append(Path(path)) or real(path, **kw))
    catalog = make(models, tmp_path)
    first = len(calls)
    assert first >= 9
    calls.clear()
    catalog.refresh()
    assert calls == []  # nothing changed: no header was read again
    target = models["checkpoint"] / "tiny_sd1.safetensors"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    (models["checkpoint"] / "b_inpaint.safetensors").unlink()
    bc.write_safetensors(models["checkpoint"] / "new.safetensors", bc.tiny_sd1_checkpoint())
    catalog.refresh("checkpoint")
    assert sorted(p.name for p in calls) == ["new.safetensors", "tiny_sd1.safetensors"]
    names = [r.name for r in catalog.list("checkpoint")]
    assert "new" in names and "b_inpaint" not in names


def test_refresh_one_kind_leaves_others(models, tmp_path):
    catalog = make(models, tmp_path)
    bc.write_safetensors(models["lora"] / "another.safetensors", bc.load_entry("lora_sd15_kohya")["tensors"])
    bc.write_safetensors(models["checkpoint"] / "zzz.safetensors", bc.tiny_sd1_checkpoint())
    catalog.refresh("lora")
    assert [r.name for r in catalog.list("lora")] == ["another", "style"]
    assert "zzz" not in [r.name for r in catalog.list("checkpoint")]


def test_symlink_loops_do_not_hang(models, tmp_path):
    (models["lora"] / "loop").symlink_to(models["lora"], target_is_directory=True)
    catalog = make(models, tmp_path)
    assert [r.name for r in catalog.list("lora")] == ["style"]


def test_unknown_root_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown model folder kind"):
        Catalog({"checkpoints": [tmp_path]})
    with pytest.raises(ValueError, match="unknown model kind"):
        Catalog({"checkpoint": [tmp_path]}).list("loras")


def test_missing_root_folder_is_empty(tmp_path):
    catalog = Catalog({"checkpoint": [tmp_path / "nope"]})
    catalog.refresh()
    assert catalog.list("checkpoint") == []


def test_from_settings(tmp_path):
    from webui.settings import Settings

    settings = Settings.for_data_dir(tmp_path, extra_ckpt_dirs=(tmp_path / "extra",))
    (tmp_path / "extra").mkdir()
    bc.write_safetensors(tmp_path / "extra" / "x.safetensors", bc.tiny_sd1_checkpoint())
    catalog = Catalog.from_settings(settings)
    catalog.refresh()
    assert [r.name for r in catalog.list("checkpoint")] == ["x"]
    assert catalog.roots("checkpoint")[-1] == tmp_path / "extra"


def test_lists_are_consistent_while_refreshing(models, tmp_path):
    catalog = make(models, tmp_path)
    expected = {r.name for r in catalog.list("checkpoint")}
    stop, errors = threading.Event(), []

    def reader() -> None:
        while not stop.is_set():
            try:
                names = [r.name for r in catalog.list("checkpoint")]
                assert names == sorted(names, key=str.casefold)
                assert expected <= set(names) <= expected | {f"extra{i}" for i in range(20)}
                catalog.get("checkpoint", "tiny_sd1")
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    for i in range(20):
        bc.write_safetensors(models["checkpoint"] / f"extra{i}.safetensors", bc.tiny_sd1_checkpoint())
        catalog.refresh("checkpoint")
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert len(catalog.list("checkpoint")) == len(expected) + 20


def test_comfyui_folder_names_are_extra_roots_only_when_they_are_other_folders(tmp_path):
    """models/diffusion_models, models/clip and models/vae join unet / text_encoder / vae when present; a lower
    case models/vae that *is* models/VAE (case-insensitive file system) is not listed twice."""
    from webui.settings import Settings

    settings = Settings.for_data_dir(tmp_path)
    models = tmp_path / "models"
    for name in ("diffusion_models", "clip", "vae"):
        (models / name).mkdir(parents=True, exist_ok=True)
    catalog = Catalog.from_settings(settings)
    vae_roots = catalog.roots(ModelKind.VAE.value)
    assert [p.name for p in catalog.roots(ModelKind.TEXT_ENCODER.value)][-1] == "clip"
    assert "diffusion_models" in [p.name for p in catalog.roots("unet")]
    assert settings.vae_dir in vae_roots
    case_insensitive = (models / "VAE").is_dir() and (models / "VAE").samefile(models / "vae")
    assert len(vae_roots) == (1 if case_insensitive else 2)
