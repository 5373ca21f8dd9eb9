"""LoRAs for the DiT families (Flux.1, SD3/3.5, Qwen-Image) through the same LoraPatcher.

Tiny diffusers transformers with the real block types (tests/fixtures/lora_factory.py); LoRA files in each
real layout with known random A/B.  References: the fixture's hand-computed ``W + mult * scale * B @ A`` (fused
BFL/SAI layers split by rows, shift/scale swapped), float32 atol 1e-6; diffusers' own
``load_lora_into_transformer`` + ``fuse_lora`` for the formats diffusers reads (Flux ai-toolkit/peft, a file
saved by ``FluxPipeline.save_lora_weights``, SD3 peft, Qwen-Image ComfyUI and kohya), atol 1e-5.  Restore is
checked bit-exactly with ``torch.equal``.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.fixtures.lora_factory import (
    make_dit_lora, make_lora, tiny_flux, tiny_qwen_image, tiny_sd3, tiny_sdxl, write_lora,
)
from webui.models import detect
from webui.models.lora import (
    DIT_ARCHES, LoraArchMismatch, LoraFormatError, LoraPatcher, StackEntry, dit_lora_arch, load_lora,
    lora_from_state_dict, model_arch,
)
from webui.types import Arch, ModelKind

ATOL = 1e-6
FAMILIES = {"flux": (tiny_flux, Arch.FLUX), "sd3": (tiny_sd3, Arch.SD3), "qwen": (tiny_qwen_image, Arch.QWEN_IMAGE)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def snapshot(models):
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in models.items()}


def assert_pristine(models, snap):
    for comp, model in models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, snap[comp][key]), f"{comp}.{key} differs from pristine"


def assert_merged(models, snap, deltas, mult):
    """Every module the fixture targets holds ``pristine + mult(component) * delta``; nothing else changed."""
    touched = {f"{c}.{m}.weight" for c, m in deltas}
    for (comp, module), delta in deltas.items():
        got = models[comp].get_submodule(module).weight
        want = snap[comp][module + ".weight"] + mult[comp] * delta
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"{comp}.{module}")
        assert not torch.equal(got, snap[comp][module + ".weight"])
    for comp, model in models.items():
        for key, value in model.state_dict().items():
            if f"{comp}.{key}" not in touched:
                assert torch.equal(value, snap[comp][key]), f"{comp}.{key} changed but the LoRA has no such layer"


@pytest.fixture(scope="module")
def flux():
    models = tiny_flux()
    return models, snapshot(models)


# ----------------------------------------------------------------------------- (1) formats vs hand reference
def test_kohya_flux_bfl_names_split_fused_layers_and_reach_both_text_encoders(flux, tmp_path):
    """kohya's Flux file: BFL names with fused qkv / linear1 (-> to_q/to_k/to_v/proj_mlp by rows), the
    final layer's [shift; scale] swapped, CLIP-L as lora_te1_ and T5 as lora_te3_ (the pipeline's
    text_encoder_2); the transformer gets the UNet weight, the text encoders the TE weight."""
    models, snap = flux
    made = make_dit_lora(models, "kohya_bfl", rank=4, alpha=2.0, seed=1, text_encoders=True)
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in made.state_dict
    assert any(k.startswith("lora_te3_encoder_block_0") for k in made.state_dict)
    lora = load_lora(write_lora(tmp_path / "flux_kohya.safetensors", made.state_dict))
    assert lora.arch is Arch.FLUX
    patcher = LoraPatcher(models)
    assert patcher.arch is Arch.FLUX
    report = patcher.apply([(lora, 0.7, 0.4)])
    assert report.matches[0].unmatched == () and report.layers_written == len(made.deltas)
    assert {c for c, _ in made.deltas} == {"transformer", "te1", "te2"}
    assert_merged(models, snap, made.deltas, {"transformer": 0.7, "te1": 0.4, "te2": 0.4})
    patcher.restore()
    assert_pristine(models, snap)


@pytest.mark.parametrize("family,naming", [
    ("flux", "comfy_bfl"), ("flux", "ai-toolkit"), ("flux", "kohya"),
    ("sd3", "peft"), ("sd3", "kohya_sai"),
    ("qwen", "peft"), ("qwen", "comfy"), ("qwen", "kohya"),
])
def test_each_layout_merges_the_hand_computed_delta(family, naming, tmp_path):
    build, arch = FAMILIES[family]
    models = build(0) if family != "flux" else build(0, text_encoders=False)
    snap = snapshot(models)
    made = make_dit_lora(models, naming, rank=3, alpha=6.0, seed=2)
    path = write_lora(tmp_path / f"{family}_{naming}.safetensors", made.state_dict)
    found = detect.detect_path(path)
    assert (found.kind, found.arch) == (ModelKind.LORA, arch)
    lora = load_lora(path)
    assert lora.arch is arch
    patcher = LoraPatcher(models)
    assert patcher.arch is arch
    report = patcher.apply([StackEntry(lora, 1.3)])
    assert report.matches[0].unmatched == ()
    assert report.layers_written == len(made.deltas)
    assert_merged(models, snap, made.deltas, {"transformer": 1.3})
    patcher.apply([])
    assert_pristine(models, snap)


def test_fused_loha_layer_is_split_as_a_full_delta():
    """A LyCORIS LoHa on a fused qkv: the Hadamard product is materialised and split by rows."""
    models = tiny_flux(text_encoders=False)
    snap = snapshot(models)
    g = torch.Generator().manual_seed(4)
    dim, r = 16, 2
    shapes = {"hada_w1_a": (3 * dim, r), "hada_w1_b": (r, dim), "hada_w2_a": (3 * dim, r), "hada_w2_b": (r, dim)}
    parts = {k: torch.randn(*shape, generator=g) * 0.3 for k, shape in shapes.items()}
    sd = {f"lora_unet_double_blocks_1_txt_attn_qkv.{k}": v for k, v in parts.items()}
    sd["lora_unet_double_blocks_1_txt_attn_qkv.alpha"] = torch.tensor(1.0)
    full = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * (1.0 / r)
    lora = lora_from_state_dict(sd, name="loha_qkv")
    assert lora.arch is Arch.FLUX and lora.format == "loha"
    patcher = LoraPatcher(models)
    patcher.apply([(lora, 1.0, 1.0)])
    deltas = {("transformer", f"transformer_blocks.1.attn.{m}"): full[i * dim:(i + 1) * dim]
              for i, m in enumerate(("add_q_proj", "add_k_proj", "add_v_proj"))}
    assert_merged(models, snap, deltas, {"transformer": 1.0})
    patcher.restore()
    assert_pristine(models, snap)


def test_fused_layer_with_the_wrong_row_count_is_a_format_error():
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 16),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(40, 2)}
    with pytest.raises(LoraFormatError, match=r"bad\.safetensors|bad.*qkv.*40 output rows"):
        lora_from_state_dict(sd, name="bad")


# ----------------------------------------------------------------------------- (2) diffusers reference
@pytest.mark.parametrize("family,naming,pipeline", [
    ("flux", "ai-toolkit", "FluxPipeline"), ("sd3", "peft", "StableDiffusion3Pipeline"),
    ("qwen", "comfy", "QwenImagePipeline"), ("qwen", "kohya", "QwenImagePipeline"),
])
def test_matches_diffusers_load_lora_and_fuse(family, naming, pipeline, tmp_path):
    pytest.importorskip("peft")
    import diffusers

    pipe_cls = getattr(diffusers, pipeline)
    build, _arch = FAMILIES[family]
    models = build(0) if family != "flux" else build(0, text_encoders=False)
    snap = snapshot(models)
    ref = copy.deepcopy(models["transformer"])
    path = write_lora(tmp_path / "l.safetensors", make_dit_lora(models, naming, rank=4, alpha=2.0, seed=5).state_dict)
    state = pipe_cls.lora_state_dict(str(path))
    state = state[0] if isinstance(state, tuple) else state
    pipe_cls.load_lora_into_transformer(state, transformer=ref, adapter_name="a", **(
        {"network_alphas": None} if pipeline == "FluxPipeline" else {}))
    ref.fuse_lora(lora_scale=0.8)
    ref.unload_lora()
    patcher = LoraPatcher(models)
    patcher.apply([(load_lora(path), 0.8, 0.8)])
    ours, theirs = models["transformer"].state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    changed = [k for k in ours if not torch.equal(ours[k], snap["transformer"][k])]
    assert len(changed) > 20
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0, msg=key)
    patcher.restore()
    assert_pristine(models, snap)


def test_file_saved_by_flux_pipeline_save_lora_weights(tmp_path):
    """diffusers' own Flux LoRA file: peft names, lora_alpha != r and an alpha_pattern in the metadata."""
    pytest.importorskip("peft")
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    models = tiny_flux(text_encoders=False)
    snap = snapshot(models)
    ref = copy.deepcopy(models["transformer"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "proj_mlp", "add_v_proj"],
                        alpha_pattern={"proj_mlp": 2}, init_lora_weights=False)
    torch.manual_seed(6)
    ref.add_adapter(config, adapter_name="default")
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref),
                                   transformer_lora_adapter_metadata=config.to_dict())
    lora = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.arch is Arch.FLUX
    assert {p.scale for p in lora.patches.values()} == {2.0, 0.5}
    ref.fuse_lora(lora_scale=1.0)
    ref.unload_lora()
    patcher = LoraPatcher(models)
    patcher.apply([(lora, 1.0, 1.0)])
    for key, value in models["transformer"].state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[key], atol=1e-5, rtol=0, msg=key)
    patcher.restore()
    assert_pristine(models, snap)


# ----------------------------------------------------------------------------- (3) architecture checks
def test_sdxl_lora_on_flux_names_both_families(flux):
    models, snap = flux
    xl = lora_from_state_dict(make_lora(tiny_sdxl(), rank=2, seed=7, components=("unet",),
                                        select=lambda c, n: n.endswith("attn1.to_q")), name="xl_style")
    assert xl.arch is Arch.SDXL
    with pytest.raises(LoraArchMismatch) as err:
        LoraPatcher(models).apply([(xl, 1.0, 1.0)])
    assert "xl_style" in str(err.value) and "SDXL" in str(err.value) and "Flux.1" in str(err.value)
    assert_pristine(models, snap)


@pytest.mark.parametrize("lora_family,model_family,names", [
    ("flux", "sd3", ("Flux.1", "SD3")), ("sd3", "qwen", ("SD3", "Qwen-Image")),
    ("qwen", "flux", ("Qwen-Image", "Flux.1")),
])
def test_dit_lora_on_another_dit_family_is_refused(lora_family, model_family, names):
    build_l, arch_l = FAMILIES[lora_family]
    build_m, _ = FAMILIES[model_family]
    src = build_l(0) if lora_family != "flux" else build_l(0, text_encoders=False)
    lora = lora_from_state_dict(make_dit_lora(src, "peft", seed=8).state_dict, name=f"{lora_family}_lora")
    assert lora.arch is arch_l
    models = build_m(1) if model_family != "flux" else build_m(1, text_encoders=False)
    snap = snapshot(models)
    with pytest.raises(LoraArchMismatch) as err:
        LoraPatcher(models).apply([(lora, 1.0, 1.0)])
    assert all(n in str(err.value) for n in names), str(err.value)
    assert_pristine(models, snap)


def test_flux_lora_on_an_sdxl_unet_is_refused():
    models = tiny_sdxl()
    lora = lora_from_state_dict(make_dit_lora(tiny_flux(text_encoders=False), "kohya_bfl", seed=9).state_dict,
                                name="flux_kohya")
    with pytest.raises(LoraArchMismatch, match=r"flux_kohya.*Flux\.1.*SDXL"):
        LoraPatcher(models).apply([(lora, 1.0, 1.0)])


def test_family_from_keys_and_real_widths():
    def attn(block: int, width: int, prefix: str = "transformer.") -> dict:
        base = f"{prefix}transformer_blocks.{block}.attn.to_q"
        return {f"{base}.lora_A.weight": (4, width), f"{base}.lora_B.weight": (width, 4)}

    assert dit_lora_arch(attn(0, 1536)) is Arch.SD3 and dit_lora_arch(attn(30, 2432)) is Arch.SD3
    assert dit_lora_arch(attn(40, 3072)) is Arch.QWEN_IMAGE  # Flux has 19 double blocks
    assert dit_lora_arch(attn(0, 3072)) is Arch.UNKNOWN  # Flux or Qwen-Image: same names and width
    assert dit_lora_arch(attn(0, 3072), {"ss_base_model_version": "flux1"}) is Arch.FLUX
    assert dit_lora_arch(attn(0, 16), {"modelspec.architecture": "qwen-image/lora"}) is Arch.QWEN_IMAGE
    assert dit_lora_arch(attn(0, 16)) is Arch.UNKNOWN  # a transformer LoRA, family undecided
    assert dit_lora_arch({"diffusion_model.transformer_blocks.3.img_mod.1.lora_A.weight": (4, 16)}) is Arch.QWEN_IMAGE
    assert dit_lora_arch({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": (4, 16)}) is Arch.SD3
    assert dit_lora_arch({"lora_unet_single_blocks_2_linear1.lora_down.weight": (4, 16)}) is Arch.FLUX
    # SD1 UNet names contain "transformer_blocks_0_attn2": not a DiT
    assert dit_lora_arch({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight":
                          (4, 320)}) is None
    assert dit_lora_arch({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 16)}) is None


def test_undecided_transformer_lora_is_matched_by_keys_and_shapes():
    """A 'transformer.' LoRA whose family its keys do not show loads as UNKNOWN and applies where its layers
    fit (here: attention only, on Flux), and is refused by shape elsewhere."""
    models = tiny_flux(text_encoders=False)
    snap = snapshot(models)
    made = make_dit_lora(models, "ai-toolkit", seed=17, select=lambda n: n.startswith("transformer_blocks.0.attn."))
    lora = lora_from_state_dict(made.state_dict, name="undecided")
    assert lora.arch is Arch.UNKNOWN
    patcher = LoraPatcher(models)
    patcher.apply([(lora, 1.0, 1.0)])
    assert_merged(models, snap, made.deltas, {"transformer": 1.0})
    patcher.restore()
    with pytest.raises(LoraArchMismatch, match="undecided.*other shapes"):
        LoraPatcher(tiny_sd3()).apply([(lora, 1.0, 1.0)])


def test_model_arch_from_the_transformer_class(flux):
    models, _ = flux
    assert model_arch(models) is Arch.FLUX
    assert model_arch(tiny_sd3()) is Arch.SD3 and model_arch(tiny_qwen_image()) is Arch.QWEN_IMAGE
    assert DIT_ARCHES == {Arch.FLUX, Arch.SD3, Arch.QWEN_IMAGE}


# ----------------------------------------------------------------------------- (4) stacks and swaps
def test_swap_between_dit_stacks_touches_only_changed_layers(flux):
    models, snap = flux
    double = lambda n: n.startswith("double_blocks.")  # noqa: E731
    single = lambda n: n.startswith("single_blocks.")  # noqa: E731
    a = make_dit_lora(models, "kohya_bfl", seed=10, select=double)
    b = make_dit_lora(models, "kohya_bfl", seed=11, select=single)
    c = make_dit_lora(models, "comfy_bfl", seed=12, select=single)
    la, lb, lc = (lora_from_state_dict(x.state_dict, name=n) for x, n in ((a, "a"), (b, "b"), (c, "c")))
    patcher = LoraPatcher(models)
    first = patcher.apply([(la, 1.0, 1.0), (lb, 0.5, 0.5)])
    assert first.layers_written == len(a.deltas) + len(b.deltas)
    double_params = {m: models["transformer"].get_submodule(m).weight.data_ptr() for _, m in a.deltas}
    second = patcher.apply([(la, 1.0, 1.0), (lc, 0.5, 0.5)])
    assert second.layers_written == len(c.deltas) and second.layers_restored == 0
    for module, ptr in double_params.items():  # not rewritten: the very same storage
        assert models["transformer"].get_submodule(module).weight.data_ptr() == ptr
    assert_merged(models, snap, {**a.deltas, **{k: 0.5 * v for k, v in c.deltas.items()}}, {"transformer": 1.0})
    assert patcher.apply([(la, 1.0, 1.0), (lc, 0.5, 0.5)]).noop
    third = patcher.apply([(lc, 0.5, 0.5)])
    assert third.layers_written == 0 and third.layers_restored == len(a.deltas)
    patcher.restore()
    assert_pristine(models, snap)


def test_two_loras_on_the_same_fused_layer_add_up(flux):
    models, snap = flux
    a = make_dit_lora(models, "kohya_bfl", seed=13, select=lambda n: n == "single_blocks.1.linear1")
    b = make_dit_lora(models, "ai-toolkit", seed=14, select=lambda n: n.startswith("single_transformer_blocks.1.attn"))
    patcher = LoraPatcher(models)
    patcher.apply([(lora_from_state_dict(a.state_dict, name="a"), 0.6, 0.6),
                   (lora_from_state_dict(b.state_dict, name="b"), -0.3, -0.3)])
    deltas = {k: 0.6 * v for k, v in a.deltas.items()}
    for k, v in b.deltas.items():
        deltas[k] = deltas.get(k, 0) - 0.3 * v
    assert len(deltas) == 4  # to_q/to_k/to_v (both LoRAs) + proj_mlp (only the fused one)
    assert_merged(models, snap, deltas, {"transformer": 1.0})
    patcher.restore()
    assert_pristine(models, snap)


def test_block_weights_on_a_dit_model_warn_and_use_the_plain_weight(flux):
    models, snap = flux
    made = make_dit_lora(models, "kohya_bfl", seed=15, select=lambda n: n.startswith("double_blocks.0.img"))
    patcher = LoraPatcher(models)
    report = patcher.apply([StackEntry(lora_from_state_dict(made.state_dict, name="bw"), 1.0, 1.0, "MIDD")])
    assert any("block weights" in w and "bw" in w for w in report.warnings)
    assert_merged(models, snap, made.deltas, {"transformer": 1.0})
    patcher.restore()
    assert_pristine(models, snap)


# ----------------------------------------------------------------------------- (5) the model manager
def test_manager_apply_loras_patches_a_dit_pipeline(flux):
    """``ModelManager.apply_loras`` hands a DiT pipeline's transformer and text encoders to the patcher
    (the catalog lookup is stubbed: ``_lora`` returns the parsed file)."""
    from types import SimpleNamespace

    from webui.models.manager import ModelManager
    from webui.types import LoraRef

    models, snap = flux
    made = make_dit_lora(models, "kohya_bfl", seed=16, text_encoders=True,
                         select=lambda n: n.startswith(("double_blocks.1", "single_blocks.0")))
    lora = lora_from_state_dict(made.state_dict, name="flux_style", sha256="ab" * 32)
    pipe = SimpleNamespace(transformer=models["transformer"], text_encoder=models["te1"],
                           text_encoder_2=models["te2"], vae=None, scheduler=None)
    model = SimpleNamespace(pipe=pipe, patcher=None, arch=Arch.FLUX)
    manager = SimpleNamespace(_lora=lambda ref: lora)
    result = ModelManager.apply_loras(manager, model, [LoraRef(name="flux_style", weight=0.9, te_weight=0.3)])
    assert result.hashes == {"flux_style": "ab" * 6}
    assert result.matched == {"flux_style": (len(made.deltas), len(made.deltas))}
    assert_merged(models, snap, made.deltas, {"transformer": 0.9, "te1": 0.3, "te2": 0.3})
    ModelManager.apply_loras(manager, model, [])
    assert_pristine(models, snap)
