"""webui.prompt.encode on tiny CLIP text encoders with the real CLIP tokenizer.

The reference for plain prompts is diffusers' own ``encode_prompt``; weights, chunking, BREAK and
clip skip are checked against expectations computed by hand from the encoders' raw outputs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from webui.prompt.encode import PromptEncoder
from webui.types import Arch

TOKENIZER = Path(__file__).resolve().parents[2] / "webui" / "configs" / "tokenizer"
EOS, BOS, COMMA, CAT = 49407, 49406, 267, 2368
ATOL = 1e-6


def tokenizer(pad: str) -> CLIPTokenizer:
    return CLIPTokenizer(
        vocab=str(TOKENIZER / "vocab.json"), merges=str(TOKENIZER / "merges.txt"), pad_token=pad, model_max_length=77
    )


def text_encoder(hidden: int, heads: int, layers: int, *, projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=hidden * 2,
        vocab_size=49408,
        projection_dim=hidden,
        hidden_act="gelu" if projection else "quick_gelu",
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    # a fresh LayerNorm has bias 0, which makes every token's mean 0 and A1111's mean restoration 0/0;
    # real CLIP weights have a bias, so give the tiny one a seeded one
    with torch.no_grad():
        getattr(model, "text_model", model).final_layer_norm.bias.normal_(0.5, 0.5)
    return model


def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=64,
    )


def unet(cross: int, **extra) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross,
        **extra,
    )


@pytest.fixture(scope="module")
def sd1():
    return StableDiffusionPipeline(
        vae=vae(),
        text_encoder=text_encoder(48, 12, 3),
        tokenizer=tokenizer("<|endoftext|>"),
        unet=unet(48, attention_head_dim=8),
        scheduler=EulerDiscreteScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def sdxl():
    return StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=text_encoder(48, 12, 3),
        tokenizer=tokenizer("<|endoftext|>"),
        text_encoder_2=text_encoder(80, 20, 4, projection=True, seed=1),
        tokenizer_2=tokenizer("!"),
        unet=unet(
            128,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80 + 6 * 8,
        ),
        scheduler=EulerDiscreteScheduler(),
    )


@pytest.fixture(scope="module")
def enc1(sd1):
    return PromptEncoder.from_pipeline(sd1, Arch.SD1)


@pytest.fixture(scope="module")
def encxl(sdxl):
    return PromptEncoder.from_pipeline(sdxl)


def raw(encoder, ids: list[int]):
    with torch.no_grad():
        return encoder(input_ids=torch.tensor([ids]), output_hidden_states=True)


def ids77(tokens: list[int], pad: int = EOS) -> list[int]:
    return [BOS, *tokens, EOS] + [pad] * (75 - len(tokens))


def close(a, b, atol=ATOL):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ------------------------------------------------------------------ equals diffusers for plain prompts
def test_sd1_plain_prompt_equals_diffusers(sd1, enc1):
    kwargs = enc1.encode("a photo of a cat", "blurry, low quality")
    with torch.no_grad():
        positive, negative = sd1.encode_prompt("a photo of a cat", "cpu", 1, True, "blurry, low quality")
    close(kwargs["prompt_embeds"], positive)
    close(kwargs["negative_prompt_embeds"], negative)
    assert set(kwargs) == {"prompt_embeds", "negative_prompt_embeds"}


def test_sdxl_plain_prompt_equals_diffusers(sdxl, encxl):
    assert encxl.arch is Arch.SDXL
    kwargs = encxl.encode("a photo of a cat", "blurry")
    with torch.no_grad():
        expected = sdxl.encode_prompt(
            "a photo of a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt="blurry",
        )
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, tensor in zip(names, expected):
        close(kwargs[name], tensor)
    assert kwargs["prompt_embeds"].shape == (1, 77, 48 + 80)


def test_sdxl_empty_negative_is_zeros_like_a1111(sdxl, encxl):
    kwargs = encxl.encode("a photo of a cat", "")
    with torch.no_grad():
        _, negative, _, negative_pooled = sdxl.encode_prompt(
            "a photo of a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    assert not negative.any() and not negative_pooled.any()
    close(kwargs["negative_prompt_embeds"], negative)
    close(kwargs["negative_pooled_prompt_embeds"], negative_pooled)
    encoded = PromptEncoder.from_pipeline(sdxl, zero_empty_negative=False).encode("a photo of a cat", "")
    assert encoded["negative_prompt_embeds"].abs().sum() > 0


def test_sdxl_pads_per_tokenizer(encxl):
    clip_l, clip_g = encxl.tokenize("a cat")
    assert clip_l[0].tokens == tuple(ids77([320, CAT]))
    assert clip_g[0].tokens == tuple(ids77([320, CAT], pad=0))  # tokenizer_2 pads with "!" = 0


def test_pipelines_accept_the_embeddings(sd1, sdxl, enc1, encxl):
    for pipe, encoder in ((sd1, enc1), (sdxl, encxl)):
        kwargs = encoder.encode("cat " * 100, "blurry")
        out = pipe(**kwargs, num_inference_steps=1, height=64, width=64, output_type="latent")
        assert torch.isfinite(out.images).all()


# ------------------------------------------------------------------ chunks
def test_100_tokens_make_two_chunks(sd1, enc1):
    chunks = enc1.tokenize("cat " * 100)[0]
    assert [c.tokens for c in chunks] == [tuple(ids77([CAT] * 75)), tuple(ids77([CAT] * 25))]
    assert enc1.token_count("cat " * 100) == (100, 150)
    kwargs = enc1.encode("cat " * 100, "blurry")
    assert kwargs["prompt_embeds"].shape == (1, 154, 48)
    assert kwargs["negative_prompt_embeds"].shape == (1, 154, 48)
    close(kwargs["prompt_embeds"][0, :77], raw(sd1.text_encoder, ids77([CAT] * 75)).last_hidden_state[0])
    close(kwargs["prompt_embeds"][0, 77:], raw(sd1.text_encoder, ids77([CAT] * 25)).last_hidden_state[0])
    # the negative is padded with the encoding of the empty prompt
    close(kwargs["negative_prompt_embeds"][0, 77:], raw(sd1.text_encoder, ids77([])).last_hidden_state[0])


def test_exactly_75_tokens_is_one_chunk(enc1):
    assert len(enc1.tokenize("cat " * 75)[0]) == 1
    assert len(enc1.tokenize("cat " * 76)[0]) == 2
    assert enc1.token_count("") == (0, 75)


def test_comma_backtrack_moves_the_tail_to_the_next_chunk(enc1):
    chunks = enc1.tokenize("cat " * 70 + ", " + "dog " * 10)[0]
    assert chunks[0].tokens == tuple(ids77([CAT] * 70 + [COMMA]))
    assert chunks[1].tokens[1:11] == (1929,) * 10 and chunks[1].tokens[11] == EOS


def test_comma_further_back_than_20_tokens_is_ignored(enc1):
    chunks = enc1.tokenize("cat " * 50 + ", " + "dog " * 40)[0]
    assert chunks[0].tokens == tuple(ids77([CAT] * 50 + [COMMA] + [1929] * 24))
    assert chunks[1].tokens[1:17] == (1929,) * 16


def test_break_starts_a_new_chunk(sd1, enc1):
    chunks = enc1.tokenize("a cat BREAK a cat")[0]
    assert [c.tokens for c in chunks] == [tuple(ids77([320, CAT]))] * 2
    kwargs = enc1.encode("a cat BREAK a cat")
    single = enc1.encode("a cat")["prompt_embeds"]
    close(kwargs["prompt_embeds"], torch.cat([single, single], dim=1))
    assert enc1.token_count("a cat BREAK a cat") == (77, 150)


def test_sd2_style_tokenizer_pads_with_exclamation_mark():
    encoder = PromptEncoder(arch=Arch.SD2, tokenizers=[tokenizer("!")], text_encoders=[text_encoder(48, 12, 2)])
    assert encoder.tokenize("a cat")[0][0].tokens == tuple(ids77([320, CAT], pad=0))


# ------------------------------------------------------------------ weights
def test_weight_scales_token_and_restores_mean(sd1, enc1):
    z = raw(sd1.text_encoder, ids77([320, CAT])).last_hidden_state[0].double()
    w = torch.ones(77, dtype=torch.float64)
    w[2] = 1.5
    weighted = z * w[:, None]
    expected = weighted * (z.mean() / weighted.mean())
    got = enc1.encode("a (cat:1.5)")["prompt_embeds"][0].double()
    close(got, expected, atol=1e-5)
    assert got.mean().item() == pytest.approx(z.mean().item(), abs=1e-6)
    # unweighted tokens keep their direction, only the global scale changes
    ratio = got[1] / z[1]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-4)


def test_nested_and_square_brackets(sd1, enc1):
    chunk = enc1.tokenize("((a)) [cat]")[0][0]
    assert chunk.tokens[:4] == (BOS, 320, CAT, EOS)
    assert chunk.weights[1] == pytest.approx(1.21) and chunk.weights[2] == pytest.approx(1 / 1.1)


def test_emphasis_modes(sd1):
    base = dict(arch=Arch.SD1, tokenizers=[sd1.tokenizer], text_encoders=[sd1.text_encoder])
    z = raw(sd1.text_encoder, ids77([320, CAT])).last_hidden_state[0]
    w = torch.ones(77)
    w[2] = 2.0
    no_norm = PromptEncoder(**base, emphasis="No norm").encode("a (cat:2)")["prompt_embeds"][0]
    close(no_norm, z * w[:, None])
    ignore = PromptEncoder(**base, emphasis="Ignore").encode("a (cat:2)")["prompt_embeds"][0]
    close(ignore, z)
    literal = PromptEncoder(**base, emphasis="None").tokenize("(cat)")[0][0]
    assert literal.tokens[1:4] == (263, CAT, 264) and set(literal.weights) == {1.0}
    with pytest.raises(ValueError, match="emphasis"):
        PromptEncoder(**base, emphasis="Loud")


# ------------------------------------------------------------------ clip skip
def test_clip_skip_sd1(sd1, enc1):
    out = raw(sd1.text_encoder, ids77([320, CAT]))
    norm = sd1.text_encoder.final_layer_norm
    close(enc1.encode("a cat", clip_skip=1)["prompt_embeds"][0], out.last_hidden_state[0])
    close(enc1.encode("a cat", clip_skip=2)["prompt_embeds"][0], norm(out.hidden_states[-2])[0])
    close(enc1.encode("a cat", clip_skip=3)["prompt_embeds"][0], norm(out.hidden_states[-3])[0])
    # deeper than the model (3 layers): the token embeddings
    close(enc1.encode("a cat", clip_skip=12)["prompt_embeds"][0], norm(out.hidden_states[0])[0])


def test_clip_skip_sdxl(sdxl, encxl):
    default = encxl.encode("a cat", "x")
    close(encxl.encode("a cat", "x", clip_skip=2)["prompt_embeds"], default["prompt_embeds"])
    with torch.no_grad():
        expected, *_ = sdxl.encode_prompt(
            "a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=1
        )
    close(encxl.encode("a cat", "x", clip_skip=3)["prompt_embeds"], expected)  # diffusers: hidden_states[-3]
    clip_g = raw(sdxl.text_encoder_2, ids77([320, CAT], pad=0)).hidden_states[-3][0]
    close(encxl.encode("a cat", clip_skip=3)["prompt_embeds"][0, :, 48:], clip_g)


def test_sdxl_pooled_comes_from_the_first_chunk(sdxl, encxl):
    kwargs = encxl.encode("cat " * 80)
    pooled = raw(sdxl.text_encoder_2, ids77([CAT] * 75, pad=0)).text_embeds
    close(kwargs["pooled_prompt_embeds"], pooled)
    assert kwargs["prompt_embeds"].shape == (1, 154, 128)


def test_refiner_uses_only_the_second_encoder(sdxl):
    encoder = PromptEncoder(
        arch=Arch.SDXL_REFINER, tokenizers=[sdxl.tokenizer_2], text_encoders=[sdxl.text_encoder_2]
    )
    kwargs = encoder.encode("a cat", "blurry")
    out = raw(sdxl.text_encoder_2, ids77([320, CAT], pad=0))
    close(kwargs["prompt_embeds"][0], out.hidden_states[-2][0])
    close(kwargs["pooled_prompt_embeds"][0], out.text_embeds[0])


# ------------------------------------------------------------------ schedules
def test_schedule_switches_and_caches(enc1):
    schedule = enc1.encode_schedule("a [cat:dog:2]", "blurry", steps=4)
    assert [end for end, _ in schedule] == [2, 4]
    close(schedule[0][1]["prompt_embeds"], enc1.encode("a cat")["prompt_embeds"])
    close(schedule[1][1]["prompt_embeds"], enc1.encode("a dog")["prompt_embeds"])
    assert schedule[0][1]["negative_prompt_embeds"] is schedule[1][1]["negative_prompt_embeds"]

    alternating = enc1.encode_schedule("[cat|dog]", "", steps=4)
    assert [end for end, _ in alternating] == [1, 2, 3, 4]
    assert alternating[0][1] is alternating[2][1] and alternating[1][1] is alternating[3][1]


def test_schedule_merges_identical_entries_and_unions_negative_steps(enc1):
    assert [end for end, _ in enc1.encode_schedule("[cat:cat:2]", "", steps=5)] == [5]
    schedule = enc1.encode_schedule("a cat <lora:style:0.5>", "[x:y:3]", steps=5)
    assert [end for end, _ in schedule] == [3, 5]
    close(schedule[0][1]["prompt_embeds"], enc1.encode("a cat ")["prompt_embeds"])
    close(schedule[1][1]["negative_prompt_embeds"], enc1.encode("", "y")["negative_prompt_embeds"])


def test_schedule_entries_share_one_length(enc1):
    schedule = enc1.encode_schedule("[short:" + "cat " * 100 + ":2]", "", steps=4)
    assert {tuple(kw["prompt_embeds"].shape) for _, kw in schedule} == {(1, 154, 48)}
    assert {tuple(kw["negative_prompt_embeds"].shape) for _, kw in schedule} == {(1, 154, 48)}


def test_sdxl_schedule_zero_negative(encxl):
    schedule = encxl.encode_schedule("[cat|dog]", "", steps=2)
    assert all(not kw["negative_prompt_embeds"].any() for _, kw in schedule)
    assert all(not kw["negative_pooled_prompt_embeds"].any() for _, kw in schedule)
    assert schedule[0][1]["pooled_prompt_embeds"].shape == (1, 80)


# ------------------------------------------------------------------ construction, textual inversion
def test_from_pipeline_and_validation(sd1, sdxl):
    assert PromptEncoder.from_pipeline(sd1).arch is Arch.SD1
    with pytest.raises(ValueError, match="needs 2"):
        PromptEncoder(arch=Arch.SDXL, tokenizers=[sd1.tokenizer], text_encoders=[sd1.text_encoder])
    with pytest.raises(ValueError, match="not available"):
        PromptEncoder(arch=Arch.UNKNOWN, tokenizers=[], text_encoders=[])


def test_textual_inversion_multi_vector_matches_diffusers():
    pipe = StableDiffusionPipeline(
        vae=vae(),
        text_encoder=text_encoder(48, 12, 2, seed=5),
        tokenizer=tokenizer("<|endoftext|>"),
        unet=unet(48, attention_head_dim=8),
        scheduler=EulerDiscreteScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    torch.manual_seed(3)
    pipe.load_textual_inversion({"<emb>": torch.randn(2, 48)}, token="<emb>")
    encoder = PromptEncoder.from_pipeline(pipe)
    tokens = encoder.tokenize("a <emb> cat")[0][0].tokens
    assert tokens[:6] == (BOS, 320, 49408, 49409, CAT, EOS)
    with torch.no_grad():
        positive, _ = pipe.encode_prompt("a <emb> cat", "cpu", 1, True, "")
    close(encoder.encode("a <emb> cat")["prompt_embeds"], positive)
