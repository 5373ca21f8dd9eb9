"""GGUF-quantized DiT transformers (city96/ComfyUI-GGUF style files, ``tests.fixtures.gguf_factory``): they load
with quantized linear layers, compute what the dequantized weights compute, generate end to end through the app
with the split-layout text encoders and VAE, take LoRAs (restored to the very same quantized parameters), and a
truncated file is refused with a message while the app keeps serving."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures import dit_factory, gguf_factory
from tests.fixtures.dit_factory import DitModels
from tests.fixtures.gguf_factory import GgufModels
from tests.fixtures.lora_factory import make_dit_lora
from tests.fixtures.jobs import done, pixels
from webui.context import AppContext
from webui.io.metadata import parse_infotext
from webui.models.cache import module_bytes
from webui.models.detect import detect_path
from webui.models.dit.gguf_loader import dequantize, is_quantized, quantized_linear_count
from webui.models.dit.loaders import load_transformer_file
from webui.models.lora import LoraPatcher, lora_from_state_dict
from webui.types import Arch, GenerationRequest, JobState, LoraRef

SMALL = dict(width=64, height=64, steps=2, prompt="a lighthouse at dusk", sampler="Euler", schedule="Simple", seed=4)
# Same weights, dequantized: the GGUF model computes exactly what a dense model of those values computes
# (diffusers dequantizes Q8_0/Q4_0 blocks to fp16 values; the reference uses the same values).
DEQUANTIZED_ATOL = 1e-5
# Against the original float32 model: Q8_0 (and one Q4_0 layer) rounding.  Outputs are ~2 in magnitude.
ORIGINAL_ATOL = {"flux": 0.05, "sd3": 0.01}


def flux_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 96, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)


def sd3_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 96, generator=g),
                pooled_projections=torch.randn(1, 80, generator=g), timestep=torch.tensor([500.0]), return_dict=False)


FAMILIES = {"flux": (Arch.FLUX, dit_factory.flux_transformer, flux_inputs),
            "sd3": (Arch.SD3, dit_factory.sd3_transformer, sd3_inputs)}


@pytest.fixture
def gguf(fixture_cache, tmp_path):
    return GgufModels(DitModels(tmp_path / "data", fixture_cache))


def _load(path, arch):
    detection = detect_path(path)
    return load_transformer_file(path, arch=arch, details=detection.details, dtype=torch.float32)["transformer"]


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs())[0]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_gguf_transformer_stays_quantized_and_matches_the_dequantized_weights(gguf, family):
    arch, dense_factory, inputs = FAMILIES[family]
    model = _load(getattr(gguf, family)(), arch)
    original = dense_factory(0)
    reference = dense_factory(0)
    reference.load_state_dict(gguf_factory.dense_reference(family))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in linears if is_quantized(m.weight)]
    assert quantized and all(type(m).__name__ == "GGUFLinear" and m.weight.dtype == torch.uint8 for m in quantized)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if not is_quantized(p))  # norms, biases
    assert module_bytes(model) < 0.85 * module_bytes(original)  # flux: 98 KB vs 335 KB
    out = _forward(model, inputs)
    assert torch.allclose(out, _forward(reference, inputs), rtol=0, atol=DEQUANTIZED_ATOL)
    assert torch.allclose(out, _forward(original, inputs), rtol=0, atol=ORIGINAL_ATOL[family])
    assert not torch.equal(out, _forward(original, inputs))  # it really is the quantized model


def test_flux_gguf_has_the_expected_quant_types_per_layer(gguf):
    model = _load(gguf.flux(), Arch.FLUX)
    types = {n: m.weight.quant_type.name for n, m in model.named_modules() if is_quantized(getattr(m, "weight", None))}
    assert types["transformer_blocks.0.ff.net.0.proj"] == "Q4_0"  # double_blocks.0.img_mlp.0
    # fused qkv and linear1 were split by rows of quantized blocks
    assert {types[f"single_transformer_blocks.0.attn.to_{x}"] for x in "qkv"} == {"Q8_0"}
    assert types["single_transformer_blocks.0.proj_mlp"] == "Q8_0"
    assert "proj_out" not in types  # final_layer.linear: F16 in the file -> a plain float weight
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert quantized_linear_count(model) == len(types) == len(linears) - 1 == 29  # all but proj_out


def test_lora_on_gguf_matches_the_dense_model_and_restores_the_same_quantized_parameters(gguf):
    model = _load(gguf.flux(), Arch.FLUX)
    reference = dit_factory.flux_transformer(0)
    reference.load_state_dict(gguf_factory.dense_reference("flux"))
    made = make_dit_lora({"transformer": dit_factory.flux_transformer(0)}, "kohya_bfl", rank=2, amp=0.5, seed=3)
    lora = lora_from_state_dict(made.state_dict, name="tiny_flux_lora")
    before = {n: m.weight for n, m in model.named_modules() if is_quantized(getattr(m, "weight", None))}
    plain = _forward(model, flux_inputs)
    patcher, ref_patcher = LoraPatcher({"transformer": model}, arch=Arch.FLUX), LoraPatcher({"transformer": reference})
    report = patcher.apply([(lora, 1.0, 1.0)])
    ref_patcher.apply([(lora, 1.0, 1.0)])
    patched = [n for n in before if not is_quantized(model.get_submodule(n).weight)]
    assert report.layers_patched > 0 and patched  # quantized layers hold a dense merged weight while patched
    name = "transformer_blocks.0.attn.to_q"
    expected = dequantize(before[name]).float() + made.deltas[("transformer", name)]
    assert torch.allclose(model.get_submodule(name).weight, expected, rtol=0, atol=1e-6)
    styled = _forward(model, flux_inputs)
    assert torch.allclose(styled, _forward(reference, flux_inputs), rtol=0, atol=DEQUANTIZED_ATOL)
    assert not torch.allclose(styled, plain, atol=1e-3)
    patcher.restore()
    assert all(model.get_submodule(n).weight is p for n, p in before.items())  # the same quantized objects
    assert torch.equal(_forward(model, flux_inputs), plain)


def test_incomplete_gguf_is_refused_naming_the_file_and_the_missing_tensor(tmp_path):
    from webui.models.dit.components import DitLoadError

    state = gguf_factory.flux_original()
    del state["double_blocks.0.txt_mlp.2.weight"]
    path = gguf_factory._write(state, tmp_path / "partial-Q8_0.gguf", "flux")
    with pytest.raises(DitLoadError, match=r"partial-Q8_0\.gguf: .*1 missing \(e\.g\. transformer_blocks\.0\."
                                           r"ff_context\.net\.2\.weight\).*incomplete"):
        _load(path, Arch.FLUX)


# ---------------------------------------------------------------------------------------------- through the app
@pytest.fixture(scope="module")
def ctx(fixture_cache, tmp_path_factory):
    dit = DitModels(tmp_path_factory.mktemp("gguf_e2e"), fixture_cache)
    files = GgufModels(dit)
    dit.text_encoders(), dit.vae(), files.flux(), files.sd3(), files.truncated_flux(), files.text_encoder()
    context = AppContext.create(dit.settings())
    yield context
    context.close()


def test_catalog_lists_gguf_files_with_their_quantization(ctx):
    records = {r.filename: r for r in ctx.catalog.list("checkpoint")}
    flux, sd3 = records["flux1-dev-tiny-Q8_0.gguf"], records["sd3.5-tiny-Q8_0.gguf"]
    assert (flux.format, flux.arch, flux.family, flux.usable) == ("gguf", Arch.FLUX, "Flux.1 dev", True)
    assert (sd3.format, sd3.arch, sd3.family, sd3.usable) == ("gguf", Arch.SD3, "SD3.5", True)
    assert flux.detection.details["quantization"] == "Q4_0, Q8_0" and sd3.detection.details["quantization"] == "Q8_0"
    truncated = records["truncated-flux1-dev-tiny-Q8_0.gguf"]
    assert "truncated" in truncated.error and "re-download" in truncated.error
    encoder = next(r for r in ctx.catalog.list("text_encoder") if r.filename.endswith(".gguf"))
    assert "not supported: GGUF text encoders" in encoder.error and "t5encoder" in encoder.error


def test_gguf_flux_and_sd3_generate_end_to_end(ctx):
    a = done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny-Q8_0"), timeout=300))
    assert quantized_linear_count(ctx.manager.current.pipe.transformer) == 29
    b = done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny-Q8_0"), timeout=300))
    assert a.images[0].image.size == (64, 64) and np.array_equal(pixels(a), pixels(b))
    assert parse_infotext(a.images[0].infotext)["Model"].startswith("flux1-dev-tiny-Q8_0")
    sd3 = done(ctx.run(GenerationRequest(**SMALL, checkpoint="sd3.5-tiny-Q8_0", negative_prompt="blurry"), timeout=300))
    assert sd3.images[0].image.size == (64, 64)
    assert quantized_linear_count(ctx.manager.current.pipe.transformer) > 0


def test_lora_through_the_app_changes_the_gguf_image_and_is_restored(ctx):
    made = make_dit_lora({"transformer": dit_factory.flux_transformer(0)}, "kohya_bfl", rank=2, amp=0.5, seed=3)
    save_file({k: v.contiguous() for k, v in made.state_dict.items()},
              str(ctx.settings.lora_dir / "gguf_lora.safetensors"))
    ctx.refresh_models("lora")
    plain = done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny-Q8_0"), timeout=300))
    styled = done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny-Q8_0",
                                            loras=(LoraRef(name="gguf_lora", weight=1.0),)), timeout=300))
    assert not np.array_equal(pixels(plain), pixels(styled))
    assert "gguf_lora" in parse_infotext(styled.images[0].infotext).get("Lora hashes", "")
    again = done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny-Q8_0"), timeout=300))
    assert np.array_equal(pixels(plain), pixels(again))
    assert quantized_linear_count(ctx.manager.current.pipe.transformer) == 29


def test_truncated_gguf_is_refused_and_the_app_keeps_serving(ctx):
    job = ctx.run(GenerationRequest(**SMALL, checkpoint="truncated-flux1-dev-tiny-Q8_0"), timeout=300)
    assert job.state is JobState.FAILED
    assert "truncated-flux1-dev-tiny-Q8_0" in job.error and "truncated" in job.error
    done(ctx.run(GenerationRequest(**SMALL, checkpoint="flux1-dev-tiny-Q8_0"), timeout=300))
