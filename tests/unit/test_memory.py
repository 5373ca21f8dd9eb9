"""Memory modes (webui.runtime.memory): estimates, the mode ``auto`` picks, refusals with their message,
placement on CPU, and hook removal; plus the manager refusing a model that cannot fit in host RAM."""
from __future__ import annotations

import pytest
import torch

from webui.runtime.memory import (ACTIVATIONS, FASTEST_FIRST, GIB, MemoryEstimate, MemoryRefused, apply_memory_mode,
                                  choose_mode, estimate_from_files, release)

FLUX_LIKE = MemoryEstimate(weights=33 * GIB, largest=23 * GIB, label="flux1-dev")  # bf16: transformer + T5 + ...


def test_estimate_scales_with_the_run_dtype_and_names_the_largest_part():
    sizes = {"transformer": 4 * GIB, "t5": 2 * GIB, "vae": GIB // 4}
    half = estimate_from_files("m", sizes, run_dtype_bytes=2)
    full = estimate_from_files("m", sizes, run_dtype_bytes=4)
    assert half.weights == 4 * GIB + 2 * GIB + GIB // 4 and half.largest == 4 * GIB
    assert full.weights == 2 * half.weights and full.largest == 8 * GIB


def test_needs_shrink_from_full_to_sequential():
    needs = [FLUX_LIKE.accelerator_need(mode) for mode in FASTEST_FIRST]
    assert needs == sorted(needs, reverse=True)
    assert needs[0] == 33 * GIB + ACTIVATIONS and needs[-1] == ACTIVATIONS
    assert "model offload ~25.0 GB" in FLUX_LIKE.describe()


def test_summary_line_for_the_models_bar():
    assert FLUX_LIKE.summary(accelerator=False) == "about 33.0 GB of weights (RAM)"
    assert FLUX_LIKE.summary(accelerator=True) == (
        "about 33.0 GB of weights; accelerator memory: full 35.0 GB, model offload 25.0 GB, "
        "group offload 14.9 GB, sequential offload 2.0 GB")


@pytest.mark.parametrize("free_gb, mode", [(80, "full"), (30, "model_offload"), (16, "group_offload"),
                                           (4, "sequential_offload")])
def test_auto_picks_the_fastest_mode_that_fits(free_gb, mode):
    assert choose_mode(FLUX_LIKE, "auto", free_accelerator=free_gb * GIB, free_host=64 * GIB) == mode


def test_refusals_say_what_is_needed_what_is_free_and_what_to_do():
    with pytest.raises(MemoryRefused, match=r"full mode needs about 35.0 GB .* 24.0 GB is free. Pick a lighter"):
        choose_mode(FLUX_LIKE, "full", free_accelerator=24 * GIB, free_host=64 * GIB)
    with pytest.raises(MemoryRefused, match=r"needs about 33.0 GB of RAM .* only 16.0 GB is free.*quantized"):
        choose_mode(FLUX_LIKE, "auto", free_accelerator=None, free_host=16 * GIB)  # CPU-only: host RAM
    with pytest.raises(MemoryRefused, match="even layer by layer"):
        choose_mode(FLUX_LIKE, "auto", free_accelerator=GIB, free_host=64 * GIB)
    with pytest.raises(MemoryRefused, match="not one of"):
        choose_mode(FLUX_LIKE, "turbo", free_accelerator=None, free_host=64 * GIB)
    assert choose_mode(FLUX_LIKE, "group_offload", free_accelerator=20 * GIB, free_host=64 * GIB,
                       headroom=GIB) == "group_offload"


def test_cpu_placement_is_a_no_op_and_release_removes_group_offload_hooks():
    from diffusers import StableDiffusionPipeline

    from webui.models import tiny
    from webui.models.pipelines import make_scheduler

    parts = tiny.build_components("sd15", dtype=torch.float32)
    pipe = StableDiffusionPipeline(unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                                   tokenizer=None, scheduler=make_scheduler({"_class_name": "DDIMScheduler"}),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    before = {n: p.data_ptr() for n, p in pipe.unet.named_parameters()}
    apply_memory_mode(pipe, "model_offload", torch.device("cpu"))
    assert not getattr(pipe, "_all_hooks", None) and not hasattr(pipe.unet, "_hf_hook")
    pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                   num_blocks_per_group=1)  # what group_offload installs on a GPU
    release(pipe)
    from diffusers.hooks import HookRegistry

    assert not HookRegistry.check_if_exists_or_initialize(pipe.unet).hooks
    assert {n: p.data_ptr() for n, p in pipe.unet.named_parameters()} == before


def test_manager_refuses_a_model_that_cannot_fit_in_ram(tiny_models, tmp_path, monkeypatch):
    from webui.models import manager as manager_module
    from webui.models.cache import ComponentCache
    from webui.models.catalog import Catalog
    from webui.models.manager import ModelManager, ModelUnavailable
    from webui.settings import Settings

    settings = Settings.for_data_dir(tiny_models.root)
    tiny_models.path("sd15")
    catalog = Catalog.from_settings(settings)
    catalog.refresh()
    manager = ModelManager(catalog=catalog, cache=ComponentCache(0), settings=settings)
    monkeypatch.setattr(manager_module, "_free_host_bytes", lambda: 1024)  # a machine with 1 KiB free
    with pytest.raises(ModelUnavailable, match="tiny_sd15.*needs about .* GB of RAM to load"):
        manager.ensure("tiny_sd15")
    assert manager.current is None
