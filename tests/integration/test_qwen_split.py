"""Qwen-Image / Qwen-Image-Edit from the ComfyUI split layout (models/diffusion_models + text_encoders + VAE +
text_encoders/qwen_tokenizer): the loaded parts compute what the diffusers folder's parts compute (same seeds,
same weights), txt2img and an edit run end to end through the app and match the folder's images, Edit-2511
(marker key, ``model.diffusion_model.`` prefix, models/unet) loads as the Plus pipeline, and missing or wrong
parts give messages naming the folder and the file to add."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.qwen_split_factory import QwenSplitModels
from tests.fixtures.jobs import pixels
from webui.context import AppContext
from webui.image_requests import Img2ImgRequest
from webui.models.cache import ComponentCache
from webui.models.catalog import Catalog
from webui.models.manager import ModelManager, ModelUnavailable
from webui.types import Arch, GenerationRequest, Variant

SMALL = dict(width=64, height=64, steps=2, prompt="a red boat on a lake", sampler="Euler", schedule="Simple", seed=3)
ATOL = 1e-5  # fp32 on both sides, identical weights and configs: differences are float noise at most
REFERENCE = Image.new("RGB", (64, 64), (30, 140, 200))


def _manager(models: QwenSplitModels) -> ModelManager:
    settings = models.settings()
    catalog = Catalog.from_settings(settings)
    catalog.refresh()
    return ModelManager(catalog=catalog, cache=ComponentCache(2 ** 32), settings=settings)


@pytest.fixture
def qwen(fixture_cache, tmp_path):
    return QwenSplitModels(tmp_path / "data", fixture_cache)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=ATOL, rtol=0), float((a - b).abs().max())


def test_split_parts_compute_what_the_diffusers_folder_computes(qwen):
    split_file = qwen.all("edit")
    folder = qwen.reference_folder(edit=True)
    manager = _manager(qwen)
    split = manager.ensure(split_file.stem, None)
    assert (split.arch, split.components.variant, split.components.family) == (Arch.QWEN_IMAGE, Variant.EDIT,
                                                                               "Qwen-Image-Edit")
    assert type(split.pipe).__name__ == "QwenImageEditPipeline"
    assert set(split.components.parts) == {"transformer", "qwen2.5-vl", "vae", "qwen_tokenizer"}
    reference = manager.ensure(folder.name, None)
    a, b = split.pipe, reference.pipe
    torch.manual_seed(0)
    tokens, text = torch.randn(1, 16, 64), torch.randn(1, 7, 32)
    with torch.no_grad():
        kwargs = dict(hidden_states=tokens, encoder_hidden_states=text, encoder_hidden_states_mask=torch.ones(1, 7),
                      timestep=torch.tensor([0.6]), img_shapes=[[(1, 4, 4)]], return_dict=False)
        _close(a.transformer(**kwargs)[0], b.transformer(**kwargs)[0])
        embeds_a, mask_a = a.encode_prompt("a red boat", image=[REFERENCE.resize((56, 56))])
        embeds_b, mask_b = b.encode_prompt("a red boat", image=[REFERENCE.resize((56, 56))])
        _close(embeds_a, embeds_b)
        assert (mask_a is None and mask_b is None) or torch.equal(mask_a, mask_b)  # None: no padding
        image = torch.rand(1, 3, 1, 64, 64) * 2 - 1
        latent_a, latent_b = a.vae.encode(image).latent_dist.mean, b.vae.encode(image).latent_dist.mean
        _close(latent_a, latent_b)
        _close(a.vae.decode(latent_a).sample, b.vae.decode(latent_b).sample)
    assert a.vae.config.latents_mean == b.vae.config.latents_mean
    public = [{k: v for k, v in dict(p.scheduler.config).items() if not k.startswith("_")} for p in (a, b)]
    assert public[0] == public[1]


def test_base_and_edit_share_text_encoder_and_vae_in_ram(qwen):
    base_file = qwen.all("base")
    qwen.transformer("edit")
    manager = _manager(qwen)
    base = manager.ensure(base_file.stem, None)
    assert type(base.pipe).__name__ == "QwenImagePipeline" and base.components.processor is None
    edit = manager.ensure("qwen_image_edit_tiny", None)
    assert edit.components.processor is not None
    assert edit.components.text_encoder is base.components.text_encoder and edit.components.vae is base.components.vae
    again = manager.ensure(base_file.stem, None)
    assert again.cache_hit and again.components.transformer is base.components.transformer


def test_edit_2511_with_prefix_in_models_unet_loads_as_the_plus_pipeline(qwen):
    qwen.text_encoder(), qwen.qwen_vae(), qwen.tokenizer()
    path = qwen.transformer("2511", folder="unet", prefix="model.diffusion_model.")
    model = _manager(qwen).ensure(path.stem, None)
    assert type(model.pipe).__name__ == "QwenImageEditPlusPipeline" and model.pipe.transformer.config.zero_cond_t
    assert model.components.family == "Qwen-Image-Edit-2511"
    out = model.pipe(image=[REFERENCE], prompt="make it red", negative_prompt=" ", true_cfg_scale=2.0, height=64,
                     width=64, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


@pytest.fixture(scope="module")
def ctx(fixture_cache, tmp_path_factory):
    models = QwenSplitModels(tmp_path_factory.mktemp("qwen_e2e"), fixture_cache)
    models.all("base"), models.transformer("edit"), models.reference_folder(), models.reference_folder(edit=True)
    context = AppContext.create(models.settings())
    yield context
    context.close()


def test_txt2img_from_split_files_matches_the_diffusers_folder(ctx):
    split = pixels(ctx.run(GenerationRequest(**SMALL, checkpoint="qwen_image_tiny", negative_prompt="blurry"),
                            timeout=300))
    folder = pixels(ctx.run(GenerationRequest(**SMALL, checkpoint="tiny-qwen-image-ref", negative_prompt="blurry"),
                             timeout=300))
    assert split.shape == (64, 64, 3) and np.abs(split - folder).max() <= 1  # 8-bit rounding at most


def test_edit_from_split_files_matches_the_diffusers_folder(ctx):
    runs = [ctx.run(Img2ImgRequest(**SMALL, checkpoint=name, init_images=[REFERENCE]), timeout=300)
            for name in ("qwen_image_edit_tiny", "tiny-qwen-image-edit-ref")]
    split, folder = (pixels(job) for job in runs)
    assert runs[0].result.info["mode"] == "img2img"
    assert np.abs(split - folder).max() <= 1


# ---------------------------------------------------------------------------------------------- clear refusals
def test_missing_text_encoder_and_wrong_text_encoder_are_named(qwen):
    model = qwen.transformer("base")
    with pytest.raises(ModelUnavailable, match=r"Qwen2\.5-VL text encoder.*qwen_2\.5_vl_7b\.safetensors.*"
                                               r"text_encoders.*found there: nothing"):
        _manager(qwen).ensure(model.stem, None)
    qwen.text_encoders(parts=("t5xxl",), tokenizer=False)  # a Flux user's T5: not what Qwen-Image reads
    with pytest.raises(ModelUnavailable, match=r"qwen_2\.5_vl_7b\.safetensors.*t5xxl_fp16\.safetensors \(t5\)"):
        _manager(qwen).ensure(model.stem, None)


def test_missing_tokenizer_processor_and_vae_are_named(qwen):
    model = qwen.transformer("base")
    edit = qwen.transformer("edit")
    qwen.text_encoder()
    with pytest.raises(ModelUnavailable, match=r"Qwen2\.5-VL tokenizer.*tokenizer/.*Qwen-Image.*"
                                               r"text_encoders/qwen_tokenizer"):
        _manager(qwen).ensure(model.stem, None)
    qwen.tokenizer(processor=False)
    with pytest.raises(ModelUnavailable, match=r"processor/.*Qwen-Image-Edit.*qwen_tokenizer.*preprocessor_config"):
        _manager(qwen).ensure(edit.stem, None)
    with pytest.raises(ModelUnavailable, match=r"no VAE.*qwen_image_vae\.safetensors.*VAE"):
        _manager(qwen).ensure(model.stem, None)
    qwen.vae()  # a Flux 16-channel VAE is not taken for Qwen-Image
    with pytest.raises(ModelUnavailable, match=r"qwen_image_vae\.safetensors"):
        _manager(qwen).ensure(model.stem, None)
    with pytest.raises(ModelUnavailable, match=r"ae\.safetensors.*Qwen-Image VAE.*Automatic"):
        _manager(qwen).ensure(model.stem, "ae")
