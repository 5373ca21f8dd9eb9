"""The LoRA library on a real AppContext: same names as the catalog, usage counted by real generations,
bookmarks and usage surviving a restart, and the browser's "Use this LoRA" values accepted by the stack."""
from __future__ import annotations

import pytest

from tests.fixtures.factory import TinyModels
from tests.fixtures.lora_factory import make_lora, write_lora
from tests.fixtures.lora_library_factory import write_library
from webui.context import AppContext
from webui.lora_library import Query
from webui.settings import Settings
from webui.types import GenerationRequest, JobState, LoadModelRequest


@pytest.fixture(scope="module")
def root(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("lora_library")
    TinyModels(root, fixture_cache).path("sd15")
    return root


@pytest.fixture(scope="module")
def ctx(root):
    context = AppContext.create(Settings.for_data_dir(root))
    assert context.run(LoadModelRequest(checkpoint="tiny_sd15"), timeout=300).state is JobState.DONE
    pipe = context.manager.current.pipe
    lora_dir = context.settings.lora_dir
    (lora_dir / "style").mkdir(parents=True, exist_ok=True)
    write_lora(lora_dir / "style" / "tiny_style.safetensors",
               make_lora({"unet": pipe.unet, "te1": pipe.text_encoder}, rank=2, alpha=2.0),
               metadata={"ss_base_model_version": "sd_v1", "modelspec.trigger_phrase": "tinystyle"})
    write_library(lora_dir / "more", 12)
    context.refresh_models("lora")
    yield context
    context.close()


def test_library_names_match_the_catalog(ctx):
    library = ctx.lora_library
    library.refresh()
    assert {e.name for e in library.entries()} == {r.name for r in ctx.catalog.list("lora")}
    entry = library.get("style/tiny_style")
    assert (entry.arch, entry.family, entry.category, entry.trigger_words[0]) == ("sd1", "SD 1.5", "Style", "tinystyle")
    # the loaded checkpoint is SD 1.5: the compatibility filter keeps SD 1.5 LoRAs only
    shown = library.search(Query(checkpoint_arch=ctx.catalog.get("checkpoint", "tiny_sd15").arch.value)).items
    assert entry in shown and all(e.arch in ("sd1", "unknown") for e in shown)


def test_generation_counts_usage(ctx):
    library = ctx.lora_library
    before = library.usage().get("style/tiny_style", (0, 0.0))[0]
    job = ctx.run(GenerationRequest(prompt="a house <lora:tiny_style:0.5>", width=64, height=64, steps=2, seed=1,
                                    negative_prompt=""), timeout=300)
    assert job.state is JobState.DONE, job.error
    count, last = library.usage()["style/tiny_style"]
    assert count == before + 1 and last > 0
    assert library.search(Query(sort="Most used")).items[0].name == "style/tiny_style"


def test_bookmarks_and_usage_survive_a_restart(ctx, root):
    ctx.lora_library.set_bookmark("style/tiny_style", True)
    used = ctx.lora_library.usage()
    ctx.lora_library.close()
    ctx.lora_library = None
    again = AppContext.create(Settings.for_data_dir(root), start_worker=False)
    try:
        assert again.lora_library.is_bookmarked("style/tiny_style")
        assert again.lora_library.usage() == used
        assert again.lora_library.refresh().read == 0  # parsed headers come from webui.db
    finally:
        again.close()
