"""LoRA formats, key names, block weights and file loading (webui.models.lora.formats/keymap/blocks/loading).

Tolerances: deltas are compared with hand-written formulas in float32 at atol 1e-6 (same ops, different
order).  Key mapping is checked against the real SD1.5/SD2/SDXL layouts on the meta device (no weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from webui.models.lora import (
    BlockWeightError, KeyMap, LoraArchMismatch, LoraFormatError, check_lora, load_lora, lora_from_state_dict,
    parse_state_dict, resolve_block_weights, split_name, trigger_words,
)
from webui.models.lora.blocks import BLOCK_LAYOUTS
from webui.models.lora.formats import LohaPatch, LokrPatch, LoraPatch
from webui.types import Arch

HEADERS = Path(__file__).resolve().parents[1] / "fixtures" / "headers"
CONFIGS = Path(__file__).resolve().parents[2] / "webui" / "configs"
ATOL = 1e-6


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=g(seed))


# ----------------------------------------------------------------------------- deltas vs hand formulas
def test_kohya_linear_lora_delta_is_up_at_down_times_alpha_over_rank():
    down, up = rnd(4, 12, seed=1), rnd(10, 4, seed=2)
    p = parse_state_dict({"x.lora_down.weight": down, "x.lora_up.weight": up, "x.alpha": torch.tensor(2.0)})
    patch = p.patches["x"]
    assert isinstance(patch, LoraPatch) and patch.rank == 4 and patch.scale == 0.5
    orig = rnd(10, 12, seed=3)
    torch.testing.assert_close(patch.delta(orig), up @ down * (2.0 / 4), atol=ATOL, rtol=0)


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_missing_or_zero_alpha_means_alpha_equals_rank(alpha):
    sd = {"x.lora_down.weight": rnd(3, 6, seed=1), "x.lora_up.weight": rnd(5, 3, seed=2)}
    if alpha is not None:
        sd["x.alpha"] = torch.tensor(alpha)
    patch = parse_state_dict(sd).patches["x"]
    assert patch.scale == 1.0
    torch.testing.assert_close(patch.delta(torch.zeros(5, 6)), sd["x.lora_up.weight"] @ sd["x.lora_down.weight"],
                               atol=ATOL, rtol=0)


def test_locon_conv3x3_conv1x1_and_cp_decomposition():
    down3, up3 = rnd(4, 6, 3, 3, seed=1), rnd(8, 4, 1, 1, seed=2)
    down1, up1 = rnd(4, 6, 1, 1, seed=3), rnd(8, 4, 1, 1, seed=4)
    cdown, mid, cup = rnd(4, 6, 1, 1, seed=5), rnd(4, 4, 3, 3, seed=6), rnd(8, 4, 1, 1, seed=7)
    sd = {"a.lora_down.weight": down3, "a.lora_up.weight": up3, "a.alpha": torch.tensor(1.0),
          "b.lora_down.weight": down1, "b.lora_up.weight": up1,
          "c.lora_down.weight": cdown, "c.lora_mid.weight": mid, "c.lora_up.weight": cup, "c.alpha": torch.tensor(8.0)}
    parsed = parse_state_dict(sd)
    assert parsed.format == "locon"
    w3, w1 = torch.zeros(8, 6, 3, 3), torch.zeros(8, 6, 1, 1)
    want_a = (up3.flatten(1) @ down3.flatten(1)).reshape(8, 6, 3, 3) * 0.25
    torch.testing.assert_close(parsed.patches["a"].delta(w3), want_a, atol=ATOL, rtol=0)
    want_b = (up1.flatten(1) @ down1.flatten(1)).reshape(8, 6, 1, 1)
    torch.testing.assert_close(parsed.patches["b"].delta(w1), want_b, atol=ATOL, rtol=0)
    # CP: kernel[o, i, h, w] = sum_{r,s} up[o, r] * mid[r, s, h, w] * down[s, i]
    want_c = torch.zeros(8, 6, 3, 3)
    for r in range(4):
        for s in range(4):
            outer = cup[:, r, 0, 0][:, None] * cdown[s, :, 0, 0][None, :]  # [out, in]
            want_c += outer[:, :, None, None] * mid[r, s][None, None]
    torch.testing.assert_close(parsed.patches["c"].delta(w3), want_c * 2.0, atol=1e-5, rtol=0)
    assert parsed.patches["c"].fits((8, 6, 3, 3)) and not parsed.patches["c"].fits((8, 6, 1, 1))


def test_loha_delta_is_hadamard_of_two_products():
    w1a, w1b, w2a, w2b = rnd(10, 4, seed=1), rnd(4, 12, seed=2), rnd(10, 4, seed=3), rnd(4, 12, seed=4)
    sd = {"x.hada_w1_a": w1a, "x.hada_w1_b": w1b, "x.hada_w2_a": w2a, "x.hada_w2_b": w2b, "x.alpha": torch.tensor(1.0)}
    patch = parse_state_dict(sd).patches["x"]
    assert isinstance(patch, LohaPatch) and patch.scale == 0.25
    torch.testing.assert_close(patch.delta(torch.zeros(10, 12)), (w1a @ w1b) * (w2a @ w2b) * 0.25, atol=ATOL, rtol=0)
    # conv without Tucker: w*_b spans in * kh * kw
    c1a, c1b, c2a, c2b = rnd(8, 2, seed=5), rnd(2, 6 * 9, seed=6), rnd(8, 2, seed=7), rnd(2, 6 * 9, seed=8)
    conv = parse_state_dict({"c.hada_w1_a": c1a, "c.hada_w1_b": c1b, "c.hada_w2_a": c2a, "c.hada_w2_b": c2b})
    want = ((c1a @ c1b) * (c2a @ c2b)).reshape(8, 6, 3, 3)
    torch.testing.assert_close(conv.patches["c"].delta(torch.zeros(8, 6, 3, 3)), want, atol=ATOL, rtol=0)


def test_loha_tucker_conv():
    t1, t2 = rnd(2, 2, 3, 3, seed=1), rnd(2, 2, 3, 3, seed=2)
    w1a, w1b, w2a, w2b = rnd(2, 8, seed=3), rnd(2, 6, seed=4), rnd(2, 8, seed=5), rnd(2, 6, seed=6)
    sd = {"c.hada_t1": t1, "c.hada_t2": t2, "c.hada_w1_a": w1a, "c.hada_w1_b": w1b, "c.hada_w2_a": w2a,
          "c.hada_w2_b": w2b}

    def rebuild(t, wa, wb):  # [out, in, kh, kw] = sum_ij t[i, j] wa[i, out] wb[j, in]
        out = torch.zeros(8, 6, 3, 3)
        for i in range(2):
            for j in range(2):
                out += wa[i][:, None, None, None] * wb[j][None, :, None, None] * t[i, j][None, None]
        return out

    patch = parse_state_dict(sd).patches["c"]
    assert patch.fits((8, 6, 3, 3))
    torch.testing.assert_close(patch.delta(torch.zeros(8, 6, 3, 3)), rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b),
                               atol=1e-5, rtol=0)


def test_lokr_delta_is_kronecker_product():
    w1, w2a, w2b = rnd(2, 3, seed=1), rnd(5, 2, seed=2), rnd(2, 4, seed=3)
    patch = parse_state_dict({"x.lokr_w1": w1, "x.lokr_w2_a": w2a, "x.lokr_w2_b": w2b,
                              "x.alpha": torch.tensor(1.0)}).patches["x"]
    assert isinstance(patch, LokrPatch) and patch.rank == 2 and patch.fits((10, 12))
    torch.testing.assert_close(patch.delta(torch.zeros(10, 12)), torch.kron(w1, w2a @ w2b) * 0.5, atol=ATOL, rtol=0)
    # two full factors: alpha is ignored (LyCORIS), scale 1
    full = parse_state_dict({"y.lokr_w1": w1, "y.lokr_w2": rnd(5, 4, seed=4), "y.alpha": torch.tensor(7.0)})
    assert full.patches["y"].scale == 1.0
    # conv: w2 decomposed over in * kh * kw; kron broadcasts w1 over the kernel (A1111 make_kron)
    c1, c2a, c2b = rnd(2, 2, seed=5), rnd(4, 3, seed=6), rnd(3, 3 * 9, seed=7)
    conv = parse_state_dict({"c.lokr_w1": c1, "c.lokr_w2_a": c2a, "c.lokr_w2_b": c2b}).patches["c"]
    want = torch.kron(c1[:, :, None, None], (c2a @ c2b).reshape(4, 3, 3, 3))
    torch.testing.assert_close(conv.delta(torch.zeros(8, 6, 3, 3)), want, atol=ATOL, rtol=0)
    # decomposed w1 and Tucker w2
    t2, a, b = rnd(2, 2, 3, 3, seed=8), rnd(2, 4, seed=9), rnd(2, 3, seed=10)
    w1a, w1b = rnd(2, 1, seed=11), rnd(1, 2, seed=12)
    tk = parse_state_dict({"t.lokr_w1_a": w1a, "t.lokr_w1_b": w1b, "t.lokr_t2": t2, "t.lokr_w2_a": a,
                           "t.lokr_w2_b": b}).patches["t"]
    w2 = torch.einsum("ijhw,io,jn->onhw", t2, a, b).contiguous()
    torch.testing.assert_close(tk.delta(torch.zeros(8, 6, 3, 3)), torch.kron((w1a @ w1b)[:, :, None, None], w2),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_weight_decomposition(axis):
    """W' = m * (W + dW) / ||W + dW||; the norm per output row ([out, 1] scale) or input column ([1, in])."""
    W, down, up = rnd(6, 5, seed=1), rnd(2, 5, seed=2), rnd(6, 2, seed=3)
    m = rnd(6, 1, seed=4).abs() + 0.5 if axis == "out" else rnd(1, 5, seed=4).abs() + 0.5
    patch = parse_state_dict({"x.lora_down.weight": down, "x.lora_up.weight": up, "x.alpha": torch.tensor(1.0),
                              "x.dora_scale": m}).patches["x"]
    merged = W + up @ down * 0.5
    dim = 1 if axis == "out" else 0
    want = m * merged / merged.norm(dim=dim, keepdim=True)
    torch.testing.assert_close(W + patch.delta(W), want, atol=ATOL, rtol=0)


def test_peft_names_and_adapter_metadata_alpha():
    A, B = rnd(4, 8, seed=1), rnd(6, 4, seed=2)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8,
                                                 "unet.alpha_pattern": {"to_k": 2}})}
    sd = {"unet.a.to_q.lora_A.weight": A, "unet.a.to_q.lora_B.weight": B,
          "unet.a.to_k.lora_A.weight": A, "unet.a.to_k.lora_B.weight": B,
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": A,
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": B}
    patches = parse_state_dict(sd, meta).patches
    assert patches["unet.a.to_q"].scale == 2.0  # lora_alpha 8 / r 4
    assert patches["unet.a.to_k"].scale == 0.5  # alpha_pattern
    assert patches["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].scale == 1.0  # no config: alpha = r


def test_incomplete_layer_names_the_layer():
    with pytest.raises(LoraFormatError, match="lora_unet_x.*lora_up|lora_unet_x.*up"):
        parse_state_dict({"lora_unet_x.lora_down.weight": rnd(2, 4)})
    with pytest.raises(LoraFormatError, match="lora_unet_y.*hada"):
        parse_state_dict({"lora_unet_y.hada_w1_a": rnd(2, 2), "lora_unet_y.hada_w1_b": rnd(2, 2)})


def test_unknown_and_unsupported_keys_are_reported_not_applied():
    sd = {"a.lora_down.weight": rnd(2, 4), "a.lora_up.weight": rnd(3, 2), "b.oft_blocks": rnd(2, 2, 2),
          "something_else": rnd(1)}
    parsed = parse_state_dict(sd)
    assert set(parsed.patches) == {"a"}
    assert parsed.unsupported == ("b (OFT)",) and parsed.ignored == ("something_else",)
    with pytest.raises(LoraFormatError, match="no LoRA.*OFT"):
        lora_from_state_dict({"b.oft_blocks": rnd(2, 2, 2)}, name="oft")


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize("name, want", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     ("unet", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")),
    ("lora_unet_input_blocks_4_1_proj_in", ("unet", "input_blocks_4_1_proj_in")),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", ("te1", "encoder_layers_0_self_attn_q_proj")),
    ("lora_te1_text_model_encoder_layers_3_mlp_fc1", ("te1", "encoder_layers_3_mlp_fc1")),
    ("lora_te2_text_model_encoder_layers_3_mlp_fc2", ("te2", "encoder_layers_3_mlp_fc2")),
    ("unet.mid_block.attentions.0.proj_out", ("unet", "mid_block_attentions_0_proj_out")),
    ("text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj", ("te2", "encoder_layers_1_self_attn_k_proj")),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_out",
     ("unet", "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0")),
    ("diffusion_model.output_blocks.2.1.conv", ("unet", "output_blocks_2_1_conv")),
    ("transformer.single_blocks.0.linear1", ("transformer", "single_blocks_0_linear1")),  # DiT LoRAs: issue #10
])
def test_split_name(name, want):
    assert split_name(name) == want


def test_keymap_accepts_pipeline_component_names_and_rejects_others():
    te = torch.nn.Module()
    te.encoder = torch.nn.Linear(2, 2)
    km = KeyMap({"text_encoder": te, "text_encoder_2": None, "vae": torch.nn.Linear(2, 2), "scheduler": object()})
    assert set(km.components) == {"te1"}
    assert km.resolve("lora_te_text_model_encoder").module == "encoder"
    assert km.resolve("lora_te_text_model_encoder").block == "BASE"
    assert km.resolve("lora_te2_text_model_encoder") is None
    with pytest.raises(ValueError, match="controlnet"):
        KeyMap({"controlnet": te})


def _meta_models(which: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIGS / which
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                  "te1": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if (folder / "text_encoder_2").is_dir():
            models["te2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return models


@pytest.fixture(scope="module")
def real_keymaps():
    return {name: KeyMap(_meta_models(name)) for name in ("sd15", "sd2", "sdxl_base")}


def _header_lora(name: str):
    entry = json.loads((HEADERS / f"{name}.json").read_text())
    sd = {k: (torch.ones(shape) if k.endswith(".alpha") else torch.empty(shape, device="meta"))
          for k, (_dtype, shape) in entry["tensors"].items()}
    return lora_from_state_dict(sd, name=f"{name}.safetensors", metadata=entry["metadata"])


SD1_17 = set(BLOCK_LAYOUTS[17])
SDXL_12 = set(BLOCK_LAYOUTS[12])


@pytest.mark.parametrize("header, model, arch, blocks", [
    ("lora_sd15_kohya", "sd15", Arch.SD1, SD1_17),
    ("lora_sd15_locon", "sd15", Arch.SD1, set(BLOCK_LAYOUTS[26]) - {"IN00"}),
    ("lora_sd15_loha", "sd15", Arch.SD1, SD1_17),
    ("lora_sd15_dora", "sd15", Arch.SD1, SD1_17),
    ("lora_sd21_kohya", "sd2", Arch.SD2, SD1_17),
    ("lora_sdxl_kohya", "sdxl_base", Arch.SDXL, SDXL_12),  # ldm/sgm names: input_blocks_4_1_...
    ("lora_sdxl_lokr", "sdxl_base", Arch.SDXL, SDXL_12 - {"BASE"}),
    ("lora_sdxl_peft", "sdxl_base", Arch.SDXL, SDXL_12),  # peft names: unet.down_blocks.1...
])
def test_real_layouts_match_every_layer(real_keymaps, header, model, arch, blocks):
    """Every layer of real-layout LoRA headers resolves on the real model layout, with fitting shapes, and
    lands in the blocks the LoRA Block Weight extension lists for that family (17 SD / 12 SDXL)."""
    lora = _header_lora(header)
    assert lora.arch == arch
    report = check_lora(lora, real_keymaps[model], arch)
    assert report.unmatched == () and len(report.matched) == len(lora.patches)
    assert {t.block for t in report.matched.values()} == blocks


@pytest.mark.parametrize("header, model, arch, words", [
    ("lora_sdxl_kohya", "sd15", Arch.SD1, ["lora_sdxl_kohya.safetensors", "SDXL", "SD 1.x"]),
    ("lora_sd15_kohya", "sdxl_base", Arch.SDXL, ["lora_sd15_kohya.safetensors", "SD 1.x", "SDXL"]),
    ("lora_sd21_kohya", "sd15", Arch.SD1, ["lora_sd21_kohya.safetensors", "SD 2.x", "SD 1.x", "shapes"]),
    ("lora_sd15_kohya", "sd2", Arch.SD2, ["lora_sd15_kohya.safetensors", "SD 1.x", "SD 2.x", "shapes"]),
])
def test_wrong_architecture_is_named(real_keymaps, header, model, arch, words):
    with pytest.raises(LoraArchMismatch) as info:
        check_lora(_header_lora(header), real_keymaps[model], arch)
    for word in words:
        assert word in str(info.value)


# ----------------------------------------------------------------------------- block weights, metadata
def test_block_weight_presets_and_vectors():
    midd = resolve_block_weights("MIDD", sdxl=False)
    assert midd["BASE"] == 1 and midd["IN04"] == 0 and midd["IN05"] == 1 and midd["M00"] == 1
    assert midd["OUT06"] == 1 and midd["OUT07"] == 0 and midd["IN00"] == 0  # unlisted in 17 -> 0
    outall = resolve_block_weights("outall", sdxl=True)
    assert outall["IN08"] == 0 and outall["M00"] == 0 and outall["OUT00"] == 1 and outall["OUT05"] == 1
    vec = resolve_block_weights(",".join(["0.5"] * 26), sdxl=False)
    assert vec["IN00"] == 0.5 and vec["OUT11"] == 0.5
    assert resolve_block_weights([1] + [0] * 11, sdxl=True)["IN04"] == 0
    with pytest.raises(BlockWeightError, match="13 values"):
        resolve_block_weights([1.0] * 13, sdxl=False)
    with pytest.raises(BlockWeightError, match="preset"):
        resolve_block_weights("NOPE", sdxl=False)


def test_trigger_words_from_modelspec_and_tag_frequency():
    meta = {"modelspec.trigger_phrase": "sks dog, photo",
            "ss_tag_frequency": json.dumps({"10_a": {"dog": 9, "grass": 2}, "5_b": {"grass": 8, "photo": 1}})}
    assert trigger_words(meta) == ("sks dog", "photo", "grass", "dog")
    assert trigger_words({"ss_tag_frequency": "not json"}) == ()
    assert trigger_words(meta, limit=2) == ("sks dog", "photo")


def _tiny_file_dict():
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": rnd(2, 32, 1, 1),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": rnd(32, 2, 1, 1),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}


def test_load_lora_reads_safetensors_with_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "style.safetensors"
    save_file(_tiny_file_dict(), str(path), metadata={"ss_base_model_version": "sd_v1",
                                                      "modelspec.trigger_phrase": "in style"})
    lora = load_lora(path, sha256="ab" * 32)
    assert lora.name == "style" and lora.label == "style.safetensors" and lora.identity == "ab" * 32
    assert lora.arch == Arch.SD1 and lora.format == "lora"
    assert lora.trigger_words == ("in style",) and lora.metadata["ss_base_model_version"] == "sd_v1"
    assert lora.nbytes > 0 and list(lora.patches) == ["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert load_lora(path).identity == str(path)


def test_load_lora_refuses_pickles_unless_allowed_and_reports_broken_files(tmp_path):
    pt = tmp_path / "old.pt"
    torch.save(_tiny_file_dict(), pt)
    with pytest.raises(LoraFormatError, match="old.pt.*pickled"):
        load_lora(pt)
    assert len(load_lora(pt, allow_pickle=True).patches) == 1
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoraFormatError, match="broken.safetensors"):
        load_lora(broken)
    with pytest.raises(LoraFormatError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")
