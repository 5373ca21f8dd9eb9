"""GGUF headers (``webui.models.gguf_header``) and GGUF detection: names, torch-order logical shapes, GGML types
and metadata without decoding tensors; Flux / SD3 transformers detected like their safetensors twins; GGUF text
encoders, truncated and non-GGUF files refused with a reason; memory estimates count GGUF files at their size."""
from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures import gguf_factory
from webui.models.detect import detect_path
from webui.models.gguf_header import quantization_summary, read_gguf_header
from webui.models.safetensors_header import BrokenModelFile
from webui.runtime.memory import estimate_from_files
from webui.types import Arch, ModelKind, Variant


@pytest.fixture(scope="module")
def files(fixture_cache):
    get = lambda writer, **kw: fixture_cache.get(writer, v=gguf_factory.GGUF_FACTORY_VERSION, **kw)  # noqa: E731
    flux = get(gguf_factory.write_flux_gguf)
    return {"flux": flux, "sd3": get(gguf_factory.write_sd3_gguf), "te": get(gguf_factory.write_text_encoder_gguf),
            "truncated": get(gguf_factory.write_truncated_gguf, source=str(flux))}


def test_header_has_names_logical_shapes_types_and_metadata(files):
    header = read_gguf_header(files["flux"])
    original = gguf_factory.flux_original()
    assert set(header.tensors) == set(original)
    assert {k: info.shape for k, info in header.tensors.items()} == {k: tuple(t.shape) for k, t in original.items()}
    t = header.tensors
    assert (t["img_in.weight"].dtype, t["img_in.weight"].shape) == ("Q8_0", (32, 64))  # torch order: out, in
    assert t["double_blocks.0.img_mlp.0.weight"].dtype == "Q4_0"
    assert t["final_layer.linear.weight"].dtype == "F16" and t["img_in.bias"].dtype == "F32"
    assert t["double_blocks.0.img_attn.norm.query_norm.scale"].dtype == "F32"
    assert header.metadata["general.architecture"] == "flux" and header.metadata["general.quantization_version"] == "2"
    assert quantization_summary(header.tensors) == "Q4_0, Q8_0"
    assert header.has_prefix("double_blocks.0.") and header.path == files["flux"]


def test_comfy_orig_shape_metadata_gives_the_logical_shape(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "reshaped.gguf"), "flux")
    writer.add_array("comfy.gguf.orig_shape.pos", [1, 2, 3, 4, 5])  # > 4 dims: stored flattened
    writer.add_tensor("pos", np.zeros((6, 20), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    header = read_gguf_header(tmp_path / "reshaped.gguf")
    assert header.tensors["pos"].shape == (1, 2, 3, 4, 5) and "comfy.gguf.orig_shape.pos" not in header.metadata


@pytest.mark.parametrize("name, arch, family, layout, quantization", [
    ("flux", Arch.FLUX, "Flux.1 dev", "bfl", "Q4_0, Q8_0"), ("sd3", Arch.SD3, "SD3.5", "sd3", "Q8_0")])
def test_gguf_transformers_are_detected_like_their_safetensors_twins(files, name, arch, family, layout, quantization):
    found = detect_path(files[name])
    assert (found.kind, found.arch, found.variant, found.family) == (ModelKind.CHECKPOINT, arch, Variant.NORMAL, family)
    assert found.details["file_format"] == "gguf" and found.details["quantization"] == quantization
    assert found.details["format"] == layout and found.unsupported is None
    assert found.details["needs"] == (["clip_l", "t5xxl", "vae"] if arch is Arch.FLUX else ["clip_l", "clip_g", "vae"])


def test_gguf_text_encoder_is_refused_with_a_clear_message(files):
    found = detect_path(files["te"])
    assert found.kind is ModelKind.UNKNOWN
    assert found.message.startswith("not supported: GGUF text encoders (t5encoder)")
    assert "models/text_encoders" in found.message and found.details["quantization"] == "Q8_0"


def test_broken_files_name_the_problem(files, tmp_path):
    with pytest.raises(BrokenModelFile, match="truncated") as exc:
        read_gguf_header(files["truncated"])
    assert exc.value.path == files["truncated"] and "re-download" in exc.value.reason
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(BrokenModelFile, match=r"not a GGUF file \(starts with b'PK"):
        detect_path(tmp_path / "fake.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(BrokenModelFile, match="empty"):
        read_gguf_header(tmp_path / "empty.gguf")
    data = files["flux"].read_bytes()
    (tmp_path / "cut_in_header.gguf").write_bytes(data[:200])
    with pytest.raises(BrokenModelFile, match="truncated or corrupted"):
        read_gguf_header(tmp_path / "cut_in_header.gguf")


def test_memory_estimate_counts_gguf_at_its_file_size():
    estimate = estimate_from_files("flux Q4", {"unet/flux1-dev-Q4_K_S.gguf": 6_800_000_000, "VAE/ae.safetensors":
                                               335_000_000}, run_dtype_bytes=4)
    assert estimate.weights == 6_800_000_000 + 670_000_000 and estimate.largest == 6_800_000_000
    dense = estimate_from_files("flux", {"flux1-dev.safetensors": 23_800_000_000}, run_dtype_bytes=2)
    assert dense.weights == 23_800_000_000
