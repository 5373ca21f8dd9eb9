"""The UI LoRA stack through the real path: slots -> request -> worker -> infotext -> slots/prompt again."""
from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.factory import TinyModels
from tests.fixtures.lora_factory import make_lora, tiny_sdxl, write_lora
from webui.context import AppContext
from webui.io.metadata import infotext_to_request_fields, parse_infotext
from webui.settings import Settings
from webui.types import JobState, LoadModelRequest
from webui.ui.lora_stack import result_notes, stack_warnings
from webui.ui.requests import txt2img_field_values, txt2img_request

SMALL = dict(width=64, height=64, steps=2, seed=7, negative_prompt="")


def slots(*entries, count=3):
    values = {}
    for i in range(count):
        name, weight, te, blocks = (list(entries[i]) + [None] * 3)[:4] if i < len(entries) else ("", 1.0, -1, "")
        values.update({f"lora_{i}_name": name, f"lora_{i}_weight": 1.0 if weight is None else weight,
                       f"lora_{i}_te_weight": -1 if te is None else te, f"lora_{i}_blocks": blocks or ""})
    return values


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("lora_stack")
    TinyModels(root, fixture_cache).path("sd15")
    context = AppContext.create(Settings.for_data_dir(root))
    assert context.run(LoadModelRequest(checkpoint="tiny_sd15"), timeout=300).state is JobState.DONE
    pipe = context.manager.current.pipe
    lora_dir = context.settings.lora_dir
    lora_dir.mkdir(parents=True, exist_ok=True)
    write_lora(lora_dir / "tiny_style.safetensors",
               make_lora({"unet": pipe.unet, "te1": pipe.text_encoder}, rank=4, alpha=4.0, amp=0.5),
               metadata={"ss_base_model_version": "sd_v1", "ss_network_weight": "0.75",
                         "modelspec.trigger_phrase": "zyx style"})
    write_lora(lora_dir / "xl_only.safetensors", make_lora(tiny_sdxl(), rank=2))
    broken = write_lora(lora_dir / "broken.safetensors",
                        make_lora({"unet": pipe.unet}, rank=2, components=("unet",)))
    broken.write_bytes(broken.read_bytes()[:-100])
    context.refresh_models("lora")
    yield context
    context.close()


def run(ctx, values):
    request = txt2img_request({**SMALL, **values})
    job = ctx.run(request, timeout=300)
    return job


def pixels(job):
    assert job.state is JobState.DONE, job.error
    return np.asarray(job.result.images[0].image, dtype=np.int16)


def test_wrong_arch_and_broken_files_are_warned_in_the_ui(ctx):
    text = stack_warnings(ctx, slots(("xl_only", 1.0), ("broken", 1.0), ("tiny_style", 1.5)))
    assert "made for SDXL, current model is SD 1.5: it would do nothing" in text
    assert "slot 2" in text and "broken" in text
    assert "above 1" in text and "zyx style" in text
    assert "no LoRA matches" in stack_warnings(ctx, slots(("nope", 1.0)))
    assert stack_warnings(ctx, slots()) == ""


def test_bad_loras_stop_with_a_message_never_a_crash(ctx):
    for name in ("xl_only", "broken", "tiny_styel"):
        job = run(ctx, {"prompt": "a house", **slots((name, 1.0))})
        assert job.state is JobState.FAILED and name in job.error
    assert run(ctx, {"prompt": "a house"}).state is JobState.DONE


def test_slot_stack_infotext_round_trip(ctx):
    plain = pixels(run(ctx, {"prompt": "a house"}))
    job = run(ctx, {"prompt": "a house", **slots(("tiny_style", 0.8, 0.5))})
    styled = pixels(job)
    assert not np.array_equal(plain, styled)
    info = job.result.info
    matched, total = info["lora_layers"]["tiny_style.safetensors"]
    assert matched == total > 0
    assert "layers applied" in result_notes(info)
    infotext = job.result.images[0].infotext
    parsed = parse_infotext(infotext)
    assert "<lora:tiny_style:0.5:0.8>" in parsed["Prompt"] and parsed["Lora hashes"].startswith("tiny_style: ")
    values = txt2img_field_values(infotext_to_request_fields(parsed))  # "Send to txt2img": slots stay empty
    again = pixels(run(ctx, {**values, **slots()}))
    assert np.array_equal(again, styled)


def test_block_weights_from_a_slot_and_from_lbw_tag_agree(ctx):
    full = pixels(run(ctx, {"prompt": "a house", **slots(("tiny_style", 1.0))}))
    outd = pixels(run(ctx, {"prompt": "a house", **slots(("tiny_style", 1.0, None, "OUTD"))}))
    tagged = pixels(run(ctx, {"prompt": "a house <lora:tiny_style:1:lbw=OUTD>"}))
    assert not np.array_equal(full, outd)
    assert np.array_equal(outd, tagged)
