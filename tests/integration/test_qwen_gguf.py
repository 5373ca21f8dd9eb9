"""A GGUF-quantized Qwen-Image transformer (city96 ``qwen-image-Q8_0.gguf`` style: diffusers key names) in the
ComfyUI split layout: detected with its quantization, loaded with quantized linear layers, and a txt2img job
gives the same image as the same split layout with a dense transformer holding the GGUF's decoded values."""
from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.gguf_factory import GgufModels
from tests.fixtures.qwen_split_factory import QwenSplitModels
from tests.fixtures.jobs import pixels
from webui.context import AppContext
from webui.models.detect import detect_path
from webui.models.dit.gguf_loader import quantized_linear_count
from webui.types import Arch, GenerationRequest

SMALL = dict(width=64, height=64, steps=2, prompt="a lighthouse at dusk", negative_prompt="blurry", sampler="Euler",
             schedule="Simple", seed=5)


@pytest.fixture(scope="module")
def ctx(fixture_cache, tmp_path_factory):
    models = QwenSplitModels(tmp_path_factory.mktemp("qwen_gguf"), fixture_cache)
    models.text_encoder(), models.qwen_vae(), models.tokenizer()
    gguf = GgufModels(models)
    gguf.qwen(), gguf.qwen(dequantized=True)
    context = AppContext.create(models.settings())
    yield context
    context.close()


def test_qwen_gguf_is_detected_with_its_quantization(ctx):
    record = ctx.catalog.get("checkpoint", "qwen-image-tiny-Q8_0")
    detection = detect_path(record.path)
    assert detection.arch is Arch.QWEN_IMAGE and record.format == "gguf"
    assert detection.details["quantization"] == "Q8_0" and not detection.unsupported


def test_qwen_gguf_txt2img_equals_the_dense_decoded_weights(ctx):
    quantized = pixels(ctx.run(GenerationRequest(**SMALL, checkpoint="qwen-image-tiny-Q8_0"), timeout=300))
    transformer = ctx.manager.current.pipe.transformer
    assert quantized_linear_count(transformer) == 20  # every Linear whose rows split into 32-wide blocks
    dense = pixels(ctx.run(GenerationRequest(**SMALL, checkpoint="qwen_image_tiny_dequantized"), timeout=300))
    assert quantized_linear_count(ctx.manager.current.pipe.transformer) == 0
    assert quantized.shape == (64, 64, 3) and np.abs(quantized - dense).max() <= 1  # 8-bit rounding at most
