"""LoRA through the real generation path: tags and UI slots apply the same stack, restore is exact,
the infotext names the LoRA, and a wrong-architecture LoRA fails with a message instead of doing nothing."""
from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.factory import TinyModels
from tests.fixtures.lora_factory import make_lora, tiny_sdxl, write_lora
from webui.context import AppContext
from webui.io.metadata import parse_infotext
from webui.settings import Settings
from webui.types import GenerationRequest, JobState, LoadModelRequest, LoraRef

SMALL = dict(width=64, height=64, steps=3, seed=4, negative_prompt="")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("lora")
    TinyModels(root, fixture_cache).path("sd15")
    context = AppContext.create(Settings.for_data_dir(root))
    assert context.run(LoadModelRequest(checkpoint="tiny_sd15"), timeout=300).state is JobState.DONE
    pipe = context.manager.current.pipe
    lora_dir = context.settings.lora_dir
    (lora_dir / "style").mkdir(parents=True, exist_ok=True)
    write_lora(lora_dir / "style" / "tiny_style.safetensors",
               make_lora({"unet": pipe.unet, "te1": pipe.text_encoder}, rank=4, alpha=4.0, amp=0.5),
               metadata={"ss_base_model_version": "sd_v1", "ss_output_name": "tiny_style"})
    write_lora(lora_dir / "xl_only.safetensors", make_lora(tiny_sdxl(), rank=2))
    context.refresh_models("lora")
    yield context
    context.close()


def image(ctx, **kw):
    job = ctx.run(GenerationRequest(**{**SMALL, **kw}), timeout=300)
    assert job.state is JobState.DONE, job.error
    return job, np.asarray(job.result.images[0].image, dtype=np.int16)


def test_lora_tag_changes_the_image_and_restores_exactly(ctx):
    _, plain = image(ctx, prompt="a house")
    unet = ctx.manager.current.pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    job, styled = image(ctx, prompt="a house <lora:tiny_style:0.8>")
    assert not np.array_equal(plain, styled)
    parsed = parse_infotext(job.result.images[0].infotext)
    assert parsed["Lora hashes"].startswith("tiny_style: ")
    assert "<lora:tiny_style:0.8>" in parsed["Prompt"]
    _, again = image(ctx, prompt="a house")
    assert np.array_equal(plain, again), "without the tag the image is exactly the plain one"
    after = unet.state_dict()
    assert all(torch_equal(before[k], after[k]) for k in before), "weights restored bit-exactly"


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_ui_slot_and_tag_are_the_same_stack(ctx):
    _, tagged = image(ctx, prompt="a house <lora:tiny_style:0.8>")
    _, slotted = image(ctx, prompt="a house", loras=(LoraRef(name="tiny_style", weight=0.8),))
    assert np.array_equal(tagged, slotted)


def test_wrong_architecture_lora_is_reported(ctx):
    job = ctx.run(GenerationRequest(**SMALL, prompt="x <lora:xl_only:1>"), timeout=300)
    assert job.state is JobState.FAILED
    assert "xl_only" in job.error and "SDXL" in job.error.upper()
    assert image(ctx, prompt="a house")[0].state is JobState.DONE


def test_unknown_lora_names_suggestions(ctx):
    job = ctx.run(GenerationRequest(**SMALL, prompt="x <lora:tiny_styel:1>"), timeout=300)
    assert job.state is JobState.FAILED
    assert "tiny_styel" in job.error and "tiny_style" in job.error
