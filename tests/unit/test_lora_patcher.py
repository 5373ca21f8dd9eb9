"""LoraPatcher on tiny SD1/SDXL models with real layer names (tests/fixtures/lora_factory.py).

Tolerances: merged weights vs hand-computed references, float32, atol 1e-6 (DoRA/LoKr 1e-5: a norm or a
kron in a different order); model outputs vs diffusers' own ``load_lora_into_unet`` + ``fuse_lora`` (and
peft for the text encoder / DoRA), atol 1e-5.  Restore is checked bit-exactly with ``torch.equal``.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.fixtures.lora_factory import kohya_name, lora_targets, make_lora, tiny_sd1, tiny_sdxl, write_lora
from webui.models.lora import (
    LoraArchMismatch, LoraNoMatch, LoraPatch, LoraPatcher, StackEntry, load_lora, lora_from_state_dict,
)

ATOL = 1e-6


def snapshot(models):
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in models.items()}


def assert_pristine(models, snap):
    for comp, model in models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, snap[comp][key]), f"{comp}.{key} differs from pristine"


def changed_params(models, snap) -> set[str]:
    return {f"{c}.{k}" for c, m in models.items() for k, v in m.state_dict().items() if not torch.equal(v, snap[c][k])}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny matmuls run ~100x slower with 2 threads on a busy 2-core machine; results are the same."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sd1():
    models = tiny_sd1()
    return models, snapshot(models)


@pytest.fixture(scope="module")
def sdxl():
    models = tiny_sdxl()
    return models, snapshot(models)


@pytest.fixture
def patcher(sd1):
    models, snap = sd1
    p = LoraPatcher(models)
    yield p
    p.restore()
    assert_pristine(models, snap)


def as_lora(sd, name="test.safetensors", **kw):
    return lora_from_state_dict(sd, name=name, **kw)


def unet_out(unet, seed=0, ctx=48, **kw):
    g = torch.Generator().manual_seed(seed)
    x, enc = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, ctx, generator=g)
    with torch.no_grad():
        return unet(x, 10, enc, **kw).sample


def te_out(te, seed=0):
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return te(ids).last_hidden_state


# ----------------------------------------------------------------------------- (1) hand reference
def test_kohya_lora_merge_equals_hand_reference(sd1, patcher):
    models, snap = sd1
    sd = make_lora(models, algo="lora", conv=True, rank=4, alpha=2.0, seed=1)
    report = patcher.apply([(as_lora(sd), 0.7, 0.3)])
    targets = lora_targets(models, conv=True)
    assert report.layers_written == len(targets) and report.warnings == ()
    for comp, name, module in targets:
        key = kohya_name(comp, name)
        down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
        w0 = snap[comp][f"{name}.weight"]
        mult = 0.7 if comp == "unet" else 0.3
        want = w0 + mult * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape) * (2.0 / 4)
        torch.testing.assert_close(module.weight.detach(), want, atol=ATOL, rtol=0, msg=f"{comp}.{name}")


# ----------------------------------------------------------------------------- (2) diffusers reference
def test_kohya_locon_matches_diffusers_fuse_lora_sd1(sd1, patcher, tmp_path):
    pytest.importorskip("peft")  # diffusers' LoRA loading needs it (requirements-test.txt)
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    models, _ = sd1
    ref_unet, ref_te = copy.deepcopy(models["unet"]), copy.deepcopy(models["te1"])
    path = write_lora(tmp_path / "locon.safetensors", make_lora(models, algo="lora", conv=True, seed=2))
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))[:2]
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=ref_unet, adapter_name="a")
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=ref_te, prefix="text_encoder",
                                                        adapter_name="a")
    ref_unet.fuse_lora(lora_scale=1.0)
    fuse_text_encoder_lora(ref_te, lora_scale=1.0)

    before_unet, before_te = unet_out(models["unet"]), te_out(models["te1"])
    patcher.apply([(load_lora(path), 1.0, 1.0)])
    ours_unet, ours_te = unet_out(models["unet"]), te_out(models["te1"])
    assert (ours_unet - before_unet).abs().max() > 0.1 and (ours_te - before_te).abs().max() > 0.1
    torch.testing.assert_close(ours_unet, unet_out(ref_unet), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_te, te_out(ref_te), atol=1e-5, rtol=0)


def test_sdxl_ldm_named_locon_matches_diffusers(sdxl, tmp_path):
    """kohya's SDXL files use ldm/sgm names (input_blocks_4_1_...): diffusers converts them with its own
    block formulas; our structure-derived keymap must land on the same modules."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionXLPipeline

    models, snap = sdxl
    ref_unet = copy.deepcopy(models["unet"])
    def few(comp, name):  # every kind of ldm name, not all 1051 layers (peft injection is slow)
        return ".attentions." not in name or name.endswith(("proj_in", "0.attn1.to_q", "1.attn2.to_k", "9.ff.net.2"))

    sd = make_lora(models, algo="lora", conv=True, seed=3, components=("unet",), select=few)
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv") for k in sd)  # an upsampler, ldm-named
    path = write_lora(tmp_path / "xl.safetensors", sd)
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=ref_unet.config)[:2]
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=ref_unet, adapter_name="a")
    ref_unet.fuse_lora(lora_scale=1.0)
    cond = {"text_embeds": torch.randn(1, 80, generator=torch.Generator().manual_seed(5)),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    p = LoraPatcher(models)
    try:
        report = p.apply([(load_lora(path), 1.0, 1.0)])
        assert report.layers_written == len(sd) // 3
        ours = unet_out(models["unet"], ctx=128, added_cond_kwargs=cond)
    finally:
        p.restore()
    torch.testing.assert_close(ours, unet_out(ref_unet, ctx=128, added_cond_kwargs=cond), atol=1e-5, rtol=0)
    assert_pristine(models, snap)


def test_diffusers_saved_peft_file_with_adapter_metadata(sd1, patcher, tmp_path):
    """A file written by diffusers' save_lora_weights: peft names + lora_alpha/alpha_pattern in metadata."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    models, _ = sd1
    ref_unet = copy.deepcopy(models["unet"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "conv1"], alpha_pattern={"to_k": 2},
                        init_lora_weights=False)
    torch.manual_seed(20)
    ref_unet.add_adapter(config, adapter_name="default")
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref_unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    lora = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert {p.scale for p in lora.patches.values()} == {2.0, 0.5}
    patcher.apply([(lora, 1.0, 1.0)])
    torch.testing.assert_close(unet_out(models["unet"]), unet_out(ref_unet), atol=1e-5, rtol=0)


def test_sd1_ldm_names_patch_the_same_modules_as_diffusers_names(sd1, patcher):
    """Older SD1 kohya files name the UNet the ldm way (input_blocks_1_1_..., output_blocks_2_1_conv)."""
    models, snap = sd1
    ldm = make_lora(models, conv=True, naming="kohya_ldm", seed=21)
    assert "lora_unet_input_blocks_3_0_op.lora_down.weight" in ldm  # the first downsampler
    assert "lora_unet_output_blocks_2_1_conv.lora_down.weight" in ldm  # upsampler of an attention-less block
    patcher.apply([(as_lora(ldm, name="ldm.safetensors"), 1.0, 1.0)])
    via_ldm = snapshot(models)
    patcher.apply([(as_lora(make_lora(models, conv=True, naming="kohya_diffusers", seed=21)), 1.0, 1.0)])
    for comp, model in models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, via_ldm[comp][key]), key


def test_peft_dora_matches_peft_merge(sd1, patcher, tmp_path):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    models, _ = sd1
    ref_unet = copy.deepcopy(models["unet"])
    sd = make_lora(models, algo="lora", dora=True, naming="peft", alpha=None, seed=4, components=("unet",))
    path = write_lora(tmp_path / "dora.safetensors", sd)
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))[:2]
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=ref_unet, adapter_name="a")
    ref_unet.fuse_lora(lora_scale=1.0)
    lora = load_lora(path)
    assert lora.format == "lora+dora"
    patcher.apply([(lora, 1.0, 1.0)])
    torch.testing.assert_close(unet_out(models["unet"]), unet_out(ref_unet), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- (3) LyCORIS in the model
def _one(sd, key, suffix):
    return sd[f"{key}.{suffix}"].float()


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_lycoris_and_dora_merges_equal_hand_formulas(sd1, patcher, algo):
    models, snap = sd1
    kw = {"algo": "lora", "dora": True} if algo == "dora" else {"algo": algo}
    sd = make_lora(models, conv=True, rank=2, alpha=1.0, seed=6, components=("unet",), **kw)
    patcher.apply([(as_lora(sd), 0.8, 1.0)])
    checked = 0
    for comp, name, module in lora_targets(models, conv=True, components=("unet",)):
        if not (name.endswith("attn1.to_q") or name.endswith("resnets.0.conv1")):
            continue
        key, w0 = kohya_name(comp, name), snap[comp][f"{name}.weight"]
        if algo == "loha":
            d = (_one(sd, key, "hada_w1_a") @ _one(sd, key, "hada_w1_b")) * (
                _one(sd, key, "hada_w2_a") @ _one(sd, key, "hada_w2_b"))
            want = w0 + 0.8 * 0.5 * d.reshape(w0.shape)
        elif algo == "lokr":
            w1, w2 = _one(sd, key, "lokr_w1"), _one(sd, key, "lokr_w2_a") @ _one(sd, key, "lokr_w2_b")
            if w0.dim() == 4:
                w1, w2 = w1[:, :, None, None], w2.reshape(w2.shape[0], -1, *w0.shape[2:])
            want = w0 + 0.8 * 0.5 * torch.kron(w1, w2)
        else:
            up, down = _one(sd, key, "lora_up.weight"), _one(sd, key, "lora_down.weight")
            merged = w0 + (up.flatten(1) @ down.flatten(1)).reshape(w0.shape) * 0.5
            norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (w0.dim() - 1))
            dora = _one(sd, key, "dora_scale") * merged / norm
            want = w0 + 0.8 * (dora - w0)
        torch.testing.assert_close(module.weight.detach(), want, atol=1e-5, rtol=0, msg=name)
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("key, arch", [("sd15", "sd1"), ("sd2", "sd2"), ("sdxl_base", "sdxl")])
def test_whole_bundled_tiny_layouts_patch_and_restore(key, arch):
    """The tiny models the loader builds from our bundled configs (tests/fixtures/factory.py): a LoCon over
    every attention, resnet and sampler layer matches fully, and restore is exact."""
    from tests.fixtures.factory import build_components

    components = build_components(key, dtype=torch.float32)  # pipeline names, incl. the vae
    snap = snapshot(components)
    lora = as_lora(make_lora(components, conv=True, seed=22), name=f"{key}.safetensors")
    patcher = LoraPatcher(components)
    assert lora.arch.value == arch and patcher.arch.value == arch
    report = patcher.apply([(lora, 1.0, 1.0)])
    assert report.warnings == () and report.layers_written == len(lora.patches)
    patcher.restore()
    assert_pristine(components, snap)


# ----------------------------------------------------------------------------- (4) exact restore
def test_restore_is_bit_exact_after_swaps(sd1, patcher):
    models, snap = sd1
    a = as_lora(make_lora(models, seed=7), name="a.safetensors")
    b = as_lora(make_lora(models, algo="loha", conv=True, seed=8), name="b.safetensors")
    before = unet_out(models["unet"])
    patcher.apply([(a, 1.0, 1.0)])
    during_a = unet_out(models["unet"])
    assert not torch.equal(during_a, before) and changed_params(models, snap)
    patcher.apply([(b, 0.5, 1.0)])
    assert not torch.equal(unet_out(models["unet"]), during_a)
    patcher.apply([(a, 1.0, 1.0), (b, -0.5, 0.25)])
    patcher.apply([])
    assert_pristine(models, snap)
    assert torch.equal(unet_out(models["unet"]), before)
    for _ in range(3):  # many cycles never drift: restore copies, it does not subtract
        patcher.apply([(a, 1.3, 0.7)])
        patcher.restore()
    assert_pristine(models, snap)
    assert patcher.applied_identity == () and patcher.backup_bytes == 0


class Exploding(LoraPatch):
    def delta(self, orig):
        raise RuntimeError("boom while merging")


def test_failure_midway_restores_everything(sd1, patcher):
    models, snap = sd1
    a = as_lora(make_lora(models, seed=9), name="a.safetensors")
    patcher.apply([(a, 1.0, 1.0)])
    b = as_lora(make_lora(models, seed=10), name="b.safetensors")
    names = sorted(b.patches)
    patches = dict(b.patches)
    victim = names[len(names) // 2]
    patches[victim] = Exploding(**{f.name: getattr(b.patches[victim], f.name)
                                   for f in dataclasses.fields(LoraPatch)})
    bad = dataclasses.replace(b, patches=patches)
    with pytest.raises(RuntimeError, match="boom"):
        patcher.apply([(a, 0.5, 1.0), (bad, 1.0, 1.0)])
    assert_pristine(models, snap)
    assert patcher.applied_identity == () and patcher.patched_count == 0
    with pytest.raises(RuntimeError, match="boom"):
        with patcher.applied([(bad, 1.0, 1.0)]):
            pass
    assert_pristine(models, snap)


def test_writes_are_out_of_place_and_backups_are_copies(sd1, patcher):
    models, snap = sd1
    param = models["unet"].get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight
    held = param.data  # e.g. a cache's reference to the same tensor
    patcher.apply([(as_lora(make_lora(models, seed=11)), 1.0, 1.0)])
    assert param.data.data_ptr() != held.data_ptr()
    assert torch.equal(held, snap["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    assert patcher.backup_bytes == sum(m.weight.numel() * 4 for _, _, m in lora_targets(models))


# ----------------------------------------------------------------------------- (5) swaps touch only changes
def test_swap_recomputes_only_changed_layers(sd1, patcher):
    models, snap = sd1

    def pick(pred):
        return as_lora(make_lora(models, select=pred, seed=12), name="x.safetensors")

    a = pick(lambda c, n: "attn1" in n)
    b = pick(lambda c, n: ("attn1" in n and n.startswith("down_blocks")) or "attn2" in n)
    b = dataclasses.replace(b, name="b", sha256="b" * 64)
    only_a = set(a.patches) - set(b.patches)
    overlap = set(a.patches) & set(b.patches)
    assert only_a and overlap and set(b.patches) - set(a.patches)

    r = patcher.apply([(a, 1.0, 1.0)])
    assert (r.layers_written, r.layers_restored) == (len(a.patches), 0)
    keep = models["unet"].get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").weight
    ptr = keep.data_ptr()
    r = patcher.apply([StackEntry(a, 1.0, 1.0), StackEntry(b, 1.0, 1.0)])
    assert (r.layers_written, r.layers_restored) == (len(b.patches), 0)
    assert keep.data_ptr() == ptr  # an a-only layer was not rewritten
    assert patcher.apply([(a, 1.0, 1.0), (b, 1.0, 1.0)]).noop  # same stack: nothing happens
    r = patcher.apply([(b, 1.0, 1.0)])
    assert (r.layers_written, r.layers_restored) == (len(overlap), len(only_a))
    r = patcher.apply([(b, 0.5, 1.0)])  # unet weight changed: b's unet layers only (b has no te layers here)
    assert r.layers_written == len(b.patches)
    assert patcher.applied_identity == (("b" * 64, 0.5, 1.0),)
    r = patcher.apply([])
    assert (r.layers_written, r.layers_restored, r.layers_patched) == (0, len(b.patches), 0)
    assert_pristine(models, snap)


def test_identity_is_sorted_by_value(sd1, patcher):
    models, _ = sd1
    a = dataclasses.replace(as_lora(make_lora(models, seed=13)), sha256="a" * 64)
    b = dataclasses.replace(as_lora(make_lora(models, seed=14)), sha256="b" * 64)
    patcher.apply([(b, 1.0, 0.5), StackEntry(a, 0.8, None, "MIDD")])  # te weight None: same as unet
    assert patcher.applied_identity == (("a" * 64, 0.8, 0.8, "MIDD"), ("b" * 64, 1.0, 0.5))


# ----------------------------------------------------------------------------- (6) wrong arch / no match
def test_sdxl_lora_on_sd1_is_refused_before_patching(sd1, sdxl, patcher, tmp_path):
    models, snap = sd1
    path = write_lora(tmp_path / "xl_style.safetensors", make_lora(sdxl[0], seed=15))
    xl = load_lora(path)
    with pytest.raises(LoraArchMismatch) as info:
        patcher.apply([(xl, 1.0, 1.0)])
    message = str(info.value)
    assert "xl_style.safetensors" in message and "SDXL" in message and "SD 1.x" in message
    assert_pristine(models, snap)
    sd1_lora = as_lora(make_lora(models, seed=16), name="sd1_style.safetensors")
    with pytest.raises(LoraArchMismatch, match="sd1_style.safetensors.*SD 1.x.*SDXL"):
        LoraPatcher(sdxl[0]).apply([(sd1_lora, 1.0, 1.0)])
    assert_pristine(*sdxl)


def test_zero_matched_layers_is_an_error(patcher):
    sd = {"lora_unet_no_such_block_0_proj.lora_down.weight": torch.randn(2, 8),
          "lora_unet_no_such_block_0_proj.lora_up.weight": torch.randn(8, 2)}
    with pytest.raises(LoraNoMatch, match="nothing.safetensors.*none of its 1 layers"):
        patcher.apply([(as_lora(sd, name="nothing.safetensors"), 1.0, 1.0)])


def test_partial_match_is_a_warning_with_the_list(sd1, patcher):
    models, _ = sd1
    sd = make_lora(models, seed=17, components=("te1",))
    sd["lora_te_text_model_encoder_layers_40_mlp_fc1.lora_down.weight"] = torch.randn(4, 48)
    sd["lora_te_text_model_encoder_layers_40_mlp_fc1.lora_up.weight"] = torch.randn(192, 4)
    report = patcher.apply([(as_lora(sd, name="extra.safetensors"), 1.0, 1.0)])
    (match,) = report.matches
    assert match.unmatched == ("lora_te_text_model_encoder_layers_40_mlp_fc1",)
    assert len(match.matched) == 72 and report.layers_written == 72
    assert any("extra.safetensors: 1 of 73 layers" in w and "layers_40_mlp_fc1" in w for w in report.warnings)


def test_half_precision_weights_keep_their_dtype_and_restore_exactly(sd1):
    te16 = copy.deepcopy(sd1[0]["te1"]).half()
    snap = snapshot({"te1": te16})
    p = LoraPatcher({"text_encoder": te16})
    sd = make_lora({"te1": te16}, seed=18, components=("te1",))
    p.apply([(as_lora(sd), 1.0, 0.6)])
    w = te16.get_submodule("encoder.layers.0.self_attn.q_proj").weight
    key = kohya_name("te1", "encoder.layers.0.self_attn.q_proj")
    d = sd[f"{key}.lora_up.weight"].float() @ sd[f"{key}.lora_down.weight"].float() * 0.5
    assert w.dtype == torch.float16
    assert torch.equal(w, (snap["te1"]["encoder.layers.0.self_attn.q_proj.weight"].float() + 0.6 * d).half())
    p.restore()
    assert_pristine({"te1": te16}, snap)


# ----------------------------------------------------------------------------- (7) block weights
def test_block_weights_zero_the_right_layers(sd1, patcher):
    models, snap = sd1
    lora = as_lora(make_lora(models, seed=19))
    only_mid = [0.0] * 17
    only_mid[7] = 1.0  # BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, ...
    patcher.apply([StackEntry(lora, 1.0, 1.0, only_mid)])
    changed = changed_params(models, snap)
    assert changed and all(k.startswith("unet.mid_block.") for k in changed)
    patcher.apply([StackEntry(lora, 1.0, 1.0, "OUTALL")])  # BASE 1, IN 0, MID 0, OUT03-OUT11 1
    changed = changed_params(models, snap)
    assert not any(k.startswith(("unet.down_blocks.", "unet.mid_block.")) for k in changed)
    assert any(k.startswith("unet.up_blocks.") for k in changed) and any(k.startswith("te1.") for k in changed)
    half = patcher.apply([StackEntry(lora, 1.0, 1.0, "ALL0.5")])
    assert half.layers_written == len(lora.patches)
    w = models["unet"].get_submodule("down_blocks.1.attentions.0.proj_in").weight
    key = kohya_name("unet", "down_blocks.1.attentions.0.proj_in")
    patch = lora.patches[key]
    want = snap["unet"]["down_blocks.1.attentions.0.proj_in.weight"] + 0.5 * patch.delta(
        snap["unet"]["down_blocks.1.attentions.0.proj_in.weight"])
    torch.testing.assert_close(w.detach(), want, atol=ATOL, rtol=0)


def test_layer_matching_is_remembered_for_recent_loras_only(sd1, patcher, monkeypatch):
    """Swapping back to a stack does not re-match its layers; the memory of matches stays bounded."""
    from webui.models.lora import patcher as patcher_module

    models, _ = sd1
    a, b = as_lora(make_lora(models, seed=1), "a.safetensors"), as_lora(make_lora(models, seed=2), "b.safetensors")
    patcher.apply([(a, 1.0, 1.0)])
    patcher.apply([(b, 1.0, 1.0)])
    calls = []
    real = patcher_module.check_lora
    monkeypatch.setattr(patcher_module, "check_lora", lambda *args: calls.append(args) or real(*args))
    patcher.apply([(a, 1.0, 1.0)])
    assert calls == [], "a's match report was kept across the swap"
    monkeypatch.setattr(patcher_module, "MATCH_CACHE_SIZE", 2)
    extra = [as_lora(make_lora(models, seed=10 + i, components=("unet",)), f"x{i}.safetensors") for i in range(3)]
    for lora in extra:
        patcher.check(lora)
    assert len(patcher._matches) == 2
    patcher.restore()
