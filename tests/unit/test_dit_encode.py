"""DiT prompt encoding: A1111 syntax cleaned, the pipeline's own encoder used, negative prompt per family."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.dit_pipes import flux_pipe, qwen_pipe, sd3_pipe
from webui.prompt.dit_encode import DitPromptEncoder, clean_prompt, prompt_notes
from webui.types import Arch


# ----------------------------------------------------------------------------- pure cleaning
def test_clean_prompt_strips_weights_tags_and_break_with_notes():
    text, notes = clean_prompt("a (red:1.3) fox <lora:style:0.8>, [forest] BREAK at night", label="Flux")
    assert text == "a red fox , forest at night"
    assert any("weights" in n and "Flux" in n for n in notes)
    assert any("BREAK" in n for n in notes)


def test_clean_prompt_plain_text_untouched_and_no_notes():
    assert clean_prompt("a photo of a cat sitting on a mat. It is raining.") == (
        "a photo of a cat sitting on a mat. It is raining.", [])


def test_clean_prompt_escaped_brackets_are_literal():
    text, notes = clean_prompt(r"a sign that says \(hello\)")
    assert text == "a sign that says (hello)" and notes == []


def test_scheduled_prompt_keeps_first_prompt_and_warns():
    text, notes = clean_prompt("a [cat:dog:5] in a box", steps=10)
    assert text == "a cat in a box"
    assert any("first step" in n for n in notes)
    text, notes = clean_prompt("a [cat|dog] in a box", steps=4)
    assert text == "a cat in a box" and notes


def test_prompt_notes_negative_prompt_per_family():
    assert any("negative prompt is ignored" in n for n in prompt_notes(Arch.FLUX, "a fox", "blurry"))
    assert prompt_notes(Arch.SD3, "a fox", "blurry") == []
    assert prompt_notes(Arch.QWEN_IMAGE, "a fox", "blurry") == []
    assert any(n.startswith("negative prompt:") for n in prompt_notes(Arch.SD3, "a fox", "(blurry:1.4)"))
    with pytest.raises(ValueError, match="no DiT prompt encoder"):
        prompt_notes(Arch.SD1, "a fox")


# ----------------------------------------------------------------------------- encoders on tiny pipelines
@pytest.fixture(scope="module")
def flux():
    return flux_pipe()


@pytest.fixture(scope="module")
def sd3():
    return sd3_pipe()


@pytest.fixture(scope="module")
def qwen():
    return qwen_pipe()


def test_flux_schedule_matches_pipeline_encoder_and_has_no_negative(flux):
    encoder = DitPromptEncoder.from_pipeline(flux)
    assert encoder.arch is Arch.FLUX
    schedule = encoder.encode_schedule("a red fox", "blurry", 7)
    assert [end for end, _ in schedule] == [6]
    kwargs = schedule[0][1]
    assert set(kwargs) == {"prompt_embeds", "pooled_prompt_embeds"}
    with torch.no_grad():
        embeds, pooled, _ = flux.encode_prompt(prompt="a red fox", prompt_2="a red fox", max_sequence_length=512)
    assert torch.allclose(kwargs["prompt_embeds"], embeds, atol=1e-5)
    assert torch.allclose(kwargs["pooled_prompt_embeds"], pooled, atol=1e-5)


def test_weights_and_lora_tags_do_not_reach_the_text_encoder(flux):
    encoder = DitPromptEncoder(flux, Arch.FLUX)
    plain = encoder.encode_schedule("a red fox", steps=2)[0][1]
    fancy = encoder.encode_schedule("a (red:1.4) fox <lora:thing:1>", steps=2)[0][1]
    assert torch.equal(plain["prompt_embeds"], fancy["prompt_embeds"])
    other = encoder.encode_schedule("a blue fox", steps=2)[0][1]
    assert not torch.equal(plain["prompt_embeds"], other["prompt_embeds"])


def test_sd3_negative_prompt_is_encoded(sd3):
    encoder = DitPromptEncoder.from_pipeline(sd3, Arch.SD3)
    a = encoder.encode_schedule("a red fox", "blurry", 4)[0][1]
    b = encoder.encode_schedule("a red fox", "", 4)[0][1]
    assert set(a) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                      "negative_pooled_prompt_embeds"}
    assert torch.equal(a["prompt_embeds"], b["prompt_embeds"])
    assert not torch.equal(a["negative_prompt_embeds"], b["negative_prompt_embeds"])
    with torch.no_grad():
        pos, neg, _, _ = sd3.encode_prompt(prompt="a red fox", prompt_2=None, prompt_3=None,
                                           negative_prompt="blurry", max_sequence_length=256)
    assert torch.allclose(a["prompt_embeds"], pos, atol=1e-5)
    assert torch.allclose(a["negative_prompt_embeds"], neg, atol=1e-5)


def test_sd3_clip_skip_changes_clip_layers(sd3):
    encoder = DitPromptEncoder(sd3, Arch.SD3)
    one = encoder.encode_schedule("a red fox", "", 2, clip_skip=1)[0][1]
    two = encoder.encode_schedule("a red fox", "", 2, clip_skip=2)[0][1]
    assert not torch.equal(one["prompt_embeds"], two["prompt_embeds"])


def test_qwen_true_cfg_negative_and_masks(qwen):
    encoder = DitPromptEncoder.from_pipeline(qwen, Arch.QWEN_IMAGE)
    kwargs = encoder.encode_schedule("a red fox", "", 3)[0][1]
    assert set(kwargs) == {"prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds",
                           "negative_prompt_embeds_mask"}
    assert kwargs["prompt_embeds_mask"].shape == kwargs["prompt_embeds"].shape[:2]
    blurry = encoder.encode_schedule("a red fox", "blurry", 3)[0][1]
    assert not torch.equal(kwargs["negative_prompt_embeds"], blurry["negative_prompt_embeds"])


def test_qwen_edit_passes_cleaned_texts_for_the_pipeline_to_encode_with_images():
    encoder = DitPromptEncoder.from_pipeline(qwen_pipe(edit=True), Arch.QWEN_IMAGE)
    assert encoder.text_only
    assert encoder.encode_schedule("make the (sky:1.2) <lora:x:1> blue", "", 5) == [
        (4, {"prompt": "make the sky blue", "negative_prompt": " "})]


def test_token_count_uses_the_long_tokenizer(flux):
    used, limit = DitPromptEncoder(flux, Arch.FLUX).token_count("a (red:1.2) fox")
    assert used == 3 and limit == 512


# ----------------------------------------------------------------------------- UI family profile (pure)
def test_family_profiles_adapt_the_tabs():
    import gradio as gr

    from webui.ui.family_controls import DEFAULT_PLACEHOLDER, FamilyProfile, profile_for, updates
    from webui.types import Variant

    flux = profile_for(Arch.FLUX, Variant.NORMAL, "flux1-dev")
    assert not flux.negative_visible and "Distilled guidance" in flux.cfg_label
    assert (flux.sampler, flux.schedule, flux.cfg, flux.steps) == ("Euler", "Simple", 3.5, None)
    assert profile_for("flux", "normal", "flux1-schnell-fp8").steps == 4
    assert "edit" in profile_for(Arch.QWEN_IMAGE, Variant.EDIT).placeholder
    assert profile_for(Arch.SD3).negative_visible and profile_for(Arch.SD3).sampler == "Euler"
    assert profile_for(Arch.SDXL) == FamilyProfile() == profile_for(None) == profile_for("nonsense")
    prompt, negative, cfg, sampler, schedule, steps = updates(gr, flux)
    assert negative["visible"] is False and cfg["value"] == 3.5 and sampler["value"] == "Euler"
    assert "value" not in steps  # dev keeps the user's steps
    back = updates(gr, profile_for(Arch.SD1))
    assert back[0]["placeholder"] == DEFAULT_PLACEHOLDER and back[1]["visible"] is True
    assert "value" not in back[2] and "value" not in back[3]  # switching back keeps the user's values
