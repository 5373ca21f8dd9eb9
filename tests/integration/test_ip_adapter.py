"""IP-Adapter end to end on tiny models: adapters and encoders from real files through the catalog and a real
ComponentCache, attached to diffusers pipelines built over a loaded checkpoint (CPU, 64x64, 2 steps), and
detached without a trace (the UNet is shared by every ``from_pipe`` view and cached across jobs).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.factory import TinyModels
from tests.fixtures.ip_adapter_factory import CLIP_VISION, IPADAPTER, place_ip_adapters
from webui.image_requests import ReferenceImages
from webui.models import loaders
from webui.models.cache import ComponentCache
from webui.models.catalog import Catalog
from webui.models.ip_adapter import IpAdapterError, IpAdapterLoader
from webui.types import Arch

SD15, SD15_PLUS = "tiny-ip-adapter_sd15", "tiny-ip-adapter-plus_sd15"
# weight 0: diffusers' IP processors skip an adapter whose scale is 0, so the result is expected bit-identical;
# the tolerance only allows for a different SDPA kernel choice.
WEIGHT_ZERO_ATOL = 1e-6


@pytest.fixture(scope="module")
def root(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("ip_adapter")
    place_ip_adapters(root / "models", fixture_cache)
    return SimpleNamespace(path=root, tiny=TinyModels(root, fixture_cache))


def make_loader(root, *, encoders=True):
    roots = {"ip_adapter": [root.path / "models" / IPADAPTER]}
    if encoders:
        roots["clip_vision"] = [root.path / "models" / CLIP_VISION]
    catalog = Catalog(roots)
    catalog.refresh()
    cache = ComponentCache(1 << 30)
    return IpAdapterLoader(catalog, cache, SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)), cache


def pipe_for(root, key: str, arch: Arch):
    pipe = loaders.build_pipeline(loaders.load_checkpoint(root.tiny.path(key), arch=arch))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd15(root):
    return pipe_for(root, "sd15", Arch.SD1)


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8))


def run(pipe, attachment=None, *, cfg=5.0, **extra):
    kwargs = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=2, guidance_scale=cfg,
                  generator=torch.Generator().manual_seed(3), output_type="np", **extra)
    if "image" not in extra:
        kwargs.update(width=64, height=64)
    if attachment is not None:
        kwargs.update(attachment.kwargs)
    with torch.no_grad():
        return pipe(**kwargs).images[0]


def generate(loader, pipe, refs, arch=Arch.SD1, *, cfg=5.0, **extra):
    attachment = loader.attach(pipe, refs, base_arch=arch, num_images_per_prompt=1, do_cfg=cfg > 1)
    try:
        return run(pipe, attachment, cfg=cfg, **extra), attachment
    finally:
        attachment.detach()


def unet_state(unet):
    """Everything attach touches, by identity, plus the weights' storage and values."""
    params = {name: (p.data_ptr(), p.detach().clone()) for name, p in unet.named_parameters()}
    return dict(processors={k: (id(v), type(v)) for k, v in unet.attn_processors.items()},
                hid_proj=unet.encoder_hid_proj, plain_attr="encoder_hid_proj" in vars(unet),
                registered="encoder_hid_proj" in unet._modules, dim_type=unet.config.encoder_hid_dim_type,
                params=params)


def unet_forward(unet):
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=context).sample


def assert_restored(unet, before, forward_before):
    after = unet_state(unet)
    for key in ("processors", "plain_attr", "registered", "dim_type"):
        assert after[key] == before[key], key
    assert after["hid_proj"] is before["hid_proj"]
    assert after["params"].keys() == before["params"].keys()  # no IP modules left behind
    for name, (ptr, value) in before["params"].items():
        assert after["params"][name][0] == ptr and torch.equal(after["params"][name][1], value), name
    assert torch.equal(unet_forward(unet), forward_before)


# ---------------------------------------------------------------------------------------------- SD 1.5
def test_reference_image_changes_the_image_and_weight_zero_does_not(root, sd15):
    loader, _ = make_loader(root)
    plain = run(sd15)
    for model in (SD15, SD15_PLUS):
        ref, attachment = generate(loader, sd15, [ReferenceImages(model=model, images=(picture(1),))])
        other, _ = generate(loader, sd15, [ReferenceImages(model=model, images=(picture(2),))])
        zero, _ = generate(loader, sd15, [ReferenceImages(model=model, images=(picture(1),), weight=0.0)])
        assert np.abs(ref - plain).mean() > 1e-3, model
        assert np.abs(ref - other).mean() > 1e-4, model
        assert np.abs(zero - plain).max() <= WEIGHT_ZERO_ATOL, model
        assert attachment.infotext["IP-Adapter"].startswith(f"{model} [")
        assert attachment.infotext["IP-Adapter"].endswith(", weight 1, 1 image, encoder tiny-CLIP-ViT-H-14")


def test_detach_restores_the_unet_exactly(root, sd15):
    loader, _ = make_loader(root)
    unet = sd15.unet
    before, forward_before = unet_state(unet), unet_forward(unet)
    components = dict(sd15.components)
    for refs in ([ReferenceImages(model=SD15, images=(picture(1),))],
                 [ReferenceImages(model=SD15_PLUS, images=(picture(1), picture(2)), weight=0.7),
                  ReferenceImages(model=SD15, images=(picture(3),))]):
        attachment = loader.attach(sd15, refs, base_arch=Arch.SD1, num_images_per_prompt=2, do_cfg=True)
        assert unet.config.encoder_hid_dim_type == "ip_image_proj"
        assert {type(p).__name__ for n, p in unet.attn_processors.items() if n.endswith("attn2.processor")} == \
            {"IPAdapterAttnProcessor2_0"}
        with pytest.raises(IpAdapterError, match="still attached"):
            loader.attach(sd15, refs, base_arch=Arch.SD1, num_images_per_prompt=1, do_cfg=True)
        attachment.detach()
        attachment.detach()  # idempotent
        assert_restored(unet, before, forward_before)
    assert dict(sd15.components) == components  # no image_encoder / feature_extractor registered


def test_several_images_and_several_adapters(root, sd15):
    loader, _ = make_loader(root)
    one, _ = generate(loader, sd15, [ReferenceImages(model=SD15_PLUS, images=(picture(1),))])
    two, attachment = generate(loader, sd15, [ReferenceImages(model=SD15_PLUS, images=(picture(1), picture(2)))])
    (embeds,) = attachment.kwargs["ip_adapter_image_embeds"]
    assert embeds.shape == (2, 2, 257, 64)  # (negative + image, images, CLIP tokens, hidden width)
    assert torch.equal(embeds[0], embeds[0][:1].expand_as(embeds[0]))  # negative: the zero image, twice
    assert attachment.infotext["IP-Adapter"].endswith("2 images, encoder tiny-CLIP-ViT-H-14")
    assert np.abs(two - one).mean() > 1e-4
    refs = [ReferenceImages(model=SD15_PLUS, images=(picture(1),), weight=0.8),
            ReferenceImages(model=SD15, images=(picture(2),), weight=0.6)]
    both, attachment = generate(loader, sd15, refs)
    base_only, _ = generate(loader, sd15, refs[1:])
    assert [e.shape for e in attachment.kwargs["ip_adapter_image_embeds"]] == [(2, 1, 257, 64), (2, 1, 32)]
    assert set(attachment.infotext) == {"IP-Adapter", "IP-Adapter 2"}
    assert "weight 0.6" in attachment.infotext["IP-Adapter 2"]
    assert np.abs(both - one).mean() > 1e-4 and np.abs(both - base_only).mean() > 1e-4


def test_without_cfg_and_cache_hits(root, sd15):
    loader, cache = make_loader(root)
    refs = [ReferenceImages(model=SD15, images=(picture(1),))]
    out, attachment = generate(loader, sd15, refs, cfg=1.0)
    assert attachment.kwargs["ip_adapter_image_embeds"][0].shape == (1, 1, 32)
    assert np.abs(out - run(sd15, cfg=1.0)).mean() > 1e-3
    stats = cache.stats()
    assert stats.entries == 2  # the adapter's state dict and its encoder
    generate(loader, sd15, refs, cfg=1.0)
    assert cache.stats().hits == stats.hits + 2 and cache.stats().misses == stats.misses


def test_img2img_view_shares_the_unet(root, sd15):
    from diffusers import StableDiffusionImg2ImgPipeline

    loader, _ = make_loader(root)
    view = StableDiffusionImg2ImgPipeline.from_pipe(sd15)
    view.set_progress_bar_config(disable=True)
    unet = sd15.unet
    assert view.unet is unet
    before, forward_before = unet_state(unet), unet_forward(unet)
    init = picture(5).resize((64, 64))
    plain = run(view, image=init, strength=0.6)
    ref, _ = generate(loader, view, [ReferenceImages(model=SD15_PLUS, images=(picture(1),))], image=init, strength=0.6)
    assert ref.shape == (64, 64, 3) and np.abs(ref - plain).mean() > 1e-3
    assert_restored(unet, before, forward_before)
    # while attached, every view runs the adapter: a call without the embeddings (e.g. a hires pass that
    # does not forward them) fails inside the UNet (SD1: TypeError on added_cond_kwargs None; SDXL: ValueError)
    attachment = loader.attach(sd15, [ReferenceImages(model=SD15, images=(picture(1),))], base_arch=Arch.SD1,
                               num_images_per_prompt=1, do_cfg=True)
    try:
        with pytest.raises((TypeError, ValueError)):
            run(view, image=init, strength=0.6)
        assert np.abs(run(view, attachment, image=init, strength=0.6) - plain).mean() > 1e-3
    finally:
        attachment.detach()
    assert_restored(unet, before, forward_before)


def test_errors_name_the_file_and_what_to_do(root, sd15):
    loader, _ = make_loader(root)
    unet = sd15.unet
    before = unet_state(unet)
    with pytest.raises(IpAdapterError, match="is for SDXL but the loaded checkpoint is SD 1.x"):
        loader.attach(sd15, [ReferenceImages(model="tiny-ip-adapter_sdxl", images=(picture(1),))],
                      base_arch=Arch.SD1)
    with pytest.raises(IpAdapterError, match="'missing' not found"):
        loader.attach(sd15, [ReferenceImages(model="missing", images=(picture(1),))], base_arch=Arch.SD1)
    bare, _ = make_loader(root, encoders=False)
    with pytest.raises(IpAdapterError, match="needs a CLIP vision encoder with 64-dim hidden states in "):
        bare.attach(sd15, [ReferenceImages(model=SD15_PLUS, images=(picture(1),))], base_arch=Arch.SD1)
    after = unet_state(unet)
    assert after["processors"] == before["processors"] and after["dim_type"] is None
    assert loader.attach(sd15, [], base_arch=Arch.SD1).kwargs == {}


# ---------------------------------------------------------------------------------------------- SDXL
def test_sdxl_adapters_pick_their_encoders(root):
    pipe = pipe_for(root, "sdxl", Arch.SDXL)
    loader, _ = make_loader(root)
    before = unet_state(pipe.unet)
    plain = run(pipe)
    for model, encoder in (("tiny-ip-adapter_sdxl", "tiny-CLIP-ViT-bigG-14"),
                           ("tiny-ip-adapter-plus_sdxl_vit-h", "tiny-CLIP-ViT-H-14")):
        out, attachment = generate(loader, pipe, [ReferenceImages(model=model, images=(picture(1),))], Arch.SDXL)
        assert attachment.infotext["IP-Adapter"].endswith(f"encoder {encoder}")
        assert np.abs(out - plain).mean() > 1e-3, model
    after = unet_state(pipe.unet)
    assert after["processors"] == before["processors"] and after["hid_proj"] is None
    assert np.abs(run(pipe) - plain).max() == 0
    with pytest.raises(IpAdapterError, match="is for SD 1.x but the loaded checkpoint is SDXL: pick an SDXL"):
        loader.attach(pipe, [ReferenceImages(model=SD15, images=(picture(1),))], base_arch=Arch.SDXL)


# ---------------------------------------------------------------------------------------------- one job path
@pytest.fixture(scope="module")
def ctx(root):
    from webui.context import AppContext
    from webui.settings import Settings

    root.tiny.path("sd15")
    context = AppContext.create(Settings.for_data_dir(root.path))
    if context.ip_adapters is None:  # until AppContext.create builds it
        context.ip_adapters = IpAdapterLoader(context.catalog, context.cache, context.manager.plan)
    context.options.update({"sd_model_checkpoint": "tiny_sd15"})
    yield context
    context.close()


def test_txt2img_and_img2img_jobs_with_reference_images(ctx):
    from webui.image_requests import Img2ImgRequest
    from webui.io.metadata import parse_infotext
    from webui.types import GenerationRequest, JobState

    def done(job):
        assert job.state is JobState.DONE, job.error
        return job.result

    small = dict(width=64, height=64, steps=2, prompt="a red fox", negative_prompt="blurry", seed=3, batch_size=2)
    refs = (ReferenceImages(model=SD15_PLUS, images=(picture(1), picture(2)), weight=0.8),)
    plain = done(ctx.run(GenerationRequest(**small), timeout=120))
    ref = done(ctx.run(GenerationRequest(**small, ip_adapters=refs), timeout=120))
    assert len(ref.images) == 2
    for a, b in zip(plain.images, ref.images):
        assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).mean() > 1
    params = parse_infotext(ref.images[0].infotext)
    assert params["IP-Adapter"].startswith(f"{SD15_PLUS} [") and "weight 0.8, 2 images" in params["IP-Adapter"]
    again = done(ctx.run(GenerationRequest(**small), timeout=120))  # detached: the plain image comes back
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(plain.images, again.images))
    init = picture(5).resize((64, 64))
    i2i = dict(small, init_images=[init], denoising_strength=0.6)
    plain_i2i = done(ctx.run(Img2ImgRequest(**i2i), timeout=120))
    ref_i2i = done(ctx.run(Img2ImgRequest(**i2i, ip_adapters=refs), timeout=120))
    assert np.abs(np.asarray(plain_i2i.images[0].image, np.int16)
                  - np.asarray(ref_i2i.images[0].image, np.int16)).mean() > 1
    assert "IP-Adapter" in parse_infotext(ref_i2i.images[0].infotext)
