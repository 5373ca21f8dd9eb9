"""Textual-inversion embeddings from models/embeddings through the real generation path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.fixtures.factory import TinyModels
from webui.context import AppContext
from webui.models.embeddings import EmbeddingError, parse_embedding, parse_embedding_state_dict
from webui.settings import Settings
from webui.types import GenerationRequest, JobState, LoadModelRequest

SMALL = dict(width=64, height=64, steps=2, seed=3, negative_prompt="")


def test_parse_formats(tmp_path):
    a = parse_embedding_state_dict({"string_to_param": {"*": torch.ones(2, 48)}, "name": "x"}, "x")
    assert a.vectors["single"].shape == (2, 48) and not a.is_xl
    b = parse_embedding_state_dict({"emb_params": torch.ones(48)}, "b")
    assert b.vectors["single"].shape == (1, 48)
    c = parse_embedding_state_dict({"clip_l": torch.ones(1, 48), "clip_g": torch.ones(1, 80)}, "c")
    assert c.is_xl and "clip_g 80" in c.describe()
    with pytest.raises(EmbeddingError, match="clip_l and clip_g"):
        parse_embedding_state_dict({"clip_l": torch.ones(1, 48)}, "d")
    broken = tmp_path / "broken.safetensors"
    save_file({"emb_params": torch.ones(4, 48)}, str(broken))
    broken.write_bytes(broken.read_bytes()[:-40])
    with pytest.raises(EmbeddingError, match="cannot be read"):
        parse_embedding(broken)
    pt = tmp_path / "old.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(3, 48)}, "name": "old",
                "step": 10}, pt)
    assert parse_embedding(pt).vectors["single"].shape == (3, 48)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("emb")
    models = TinyModels(root, fixture_cache)
    models.path("sd15")
    models.path("sdxl")
    context = AppContext.create(Settings.for_data_dir(root))
    emb_dir = context.settings.embeddings_dir
    emb_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, 48, generator=g)}, str(emb_dir / "tinyemb.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 48, generator=g)}, "name": "oldstyle"},
               emb_dir / "oldstyle.pt")
    save_file({"emb_params": torch.randn(1, 64, generator=g)}, str(emb_dir / "widething.safetensors"))
    save_file({"clip_l": torch.randn(1, 48, generator=g), "clip_g": torch.randn(1, 80, generator=g)},
              str(emb_dir / "xlemb.safetensors"))
    context.refresh_models()
    yield context
    context.close()


def _image(ctx, **kw):
    job = ctx.run(GenerationRequest(**{**SMALL, **kw}), timeout=300)
    assert job.state is JobState.DONE, job.error
    return job, np.asarray(job.result.images[0].image, dtype=np.int16)


def test_sd1_embeddings_by_file_name(ctx):
    assert ctx.run(LoadModelRequest(checkpoint="tiny_sd15"), timeout=300).state is JobState.DONE
    state = ctx.manager.current.embeddings
    assert set(state.tokens) == {"tinyemb", "oldstyle"}
    assert "widething" in state.skipped and "xlemb" in state.skipped
    tok = ctx.manager.current.pipe.tokenizer
    assert "tinyemb_1" in tok.get_vocab()  # two vectors
    _, plain = _image(ctx, checkpoint="tiny_sd15", prompt="a house")
    job, emb = _image(ctx, checkpoint="tiny_sd15", prompt="a tinyemb house")
    assert not np.array_equal(plain, emb)
    assert job.result.info["warnings"] == []
    job, _ = _image(ctx, checkpoint="tiny_sd15", prompt="a house widething")
    assert any("widething" in w and "width" in w for w in job.result.info["warnings"])
    # a second ensure adds nothing twice
    assert ctx.run(LoadModelRequest(checkpoint="tiny_sd15"), timeout=300).state is JobState.DONE
    assert ctx.manager.current.embeddings is state


def test_sdxl_embedding_clip_l_and_clip_g(ctx):
    assert ctx.run(LoadModelRequest(checkpoint="tiny_sdxl"), timeout=300).state is JobState.DONE
    state = ctx.manager.current.embeddings
    assert state.tokens == ("xlemb",)
    pipe = ctx.manager.current.pipe
    assert "xlemb" in pipe.tokenizer.get_vocab() and "xlemb" in pipe.tokenizer_2.get_vocab()
    _, plain = _image(ctx, checkpoint="tiny_sdxl", prompt="a house")
    job, emb = _image(ctx, checkpoint="tiny_sdxl", prompt="a xlemb house tinyemb")
    assert not np.array_equal(plain, emb)
    assert any("tinyemb" in w and "SDXL" in w for w in job.result.info["warnings"])
