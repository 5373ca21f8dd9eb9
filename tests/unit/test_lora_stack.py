"""LoRA slots <-> LoraRefs <-> <lora:> tags: one list, three spellings; LBW tag syntax; random swap cycles."""
from __future__ import annotations

import random

import pytest
import torch

from webui.models.manager import merge_lora_refs
from webui.prompt.parser import append_lora_tags, extract_lora_tags, lora_tag
from webui.types import GenerationRequest, LoraRef, RequestError
from webui.ui.lora_stack import BLOCK_PRESETS, input_names, slot_count, slots_to_refs
from webui.ui.requests import txt2img_request


def slots(*entries):
    values = {}
    for i, entry in enumerate(entries):
        name, weight, te, blocks = (list(entry) + [None, None, None])[:4]
        values.update({f"lora_{i}_name": name, f"lora_{i}_weight": weight, f"lora_{i}_te_weight": te,
                       f"lora_{i}_blocks": blocks})
    return values


def test_slots_to_refs():
    values = slots(("a", 0.8), ("", 1.0), ("b", 1.2, 0.5, "MIDD"))
    assert slot_count(values) == 3
    assert slots_to_refs(values) == (LoraRef(name="a", weight=0.8),
                                     LoraRef(name="b", weight=1.2, te_weight=0.5, block_weights="MIDD"))
    assert slots_to_refs(slots(("a", None, "", ""))) == (LoraRef(name="a", weight=1.0),)
    assert slots_to_refs({}) == ()
    with pytest.raises(RequestError, match="slot 1"):
        slots_to_refs(slots(("a", "heavy")))
    with pytest.raises(RequestError, match="outside"):
        slots_to_refs(slots(("a", 9.0)))
    assert len(input_names(3)) == 12 and "" in BLOCK_PRESETS and "MIDD" in BLOCK_PRESETS


def test_request_carries_the_slots():
    req = txt2img_request({"prompt": "x", **slots(("a", 0.5))})
    assert req.loras == (LoraRef(name="a", weight=0.5),)
    assert txt2img_request({"prompt": "x"}).loras == ()


def test_lbw_tag_syntax_and_tag_round_trip():
    _, refs = extract_lora_tags("a <lora:x:0.5:0.8:lbw=MIDD> <lora:y:1:lbw=1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0>")
    assert refs[0] == LoraRef(name="x", weight=0.8, te_weight=0.5, block_weights="MIDD")
    assert refs[1].block_weights.startswith("1,0,0")
    for ref in refs + (LoraRef(name="z", weight=0.35),):
        assert extract_lora_tags(lora_tag(ref))[1] == (ref,)


def test_tags_equal_slots():
    """The slot stack written as tags parses back to the same stack, and merging is idempotent."""
    stack = slots_to_refs(slots(("a", 0.8), ("b", 1.2, 0.5, "OUTD")))
    prompt = append_lora_tags("a house", stack)
    text, tags = extract_lora_tags(prompt)
    assert tags == stack and text.strip() == "a house"
    assert merge_lora_refs(stack, tags) == stack
    # a tag already in the prompt wins and is not written twice
    prompt = append_lora_tags("a house <lora:a:0.3>", stack)
    assert prompt.count("<lora:a:") == 1 and "<lora:b:0.5:1.2:lbw=OUTD>" in prompt
    assert append_lora_tags("x", ()) == "x"


def test_infotext_round_trip_restores_the_stack():
    from webui.io.metadata import build_infotext, infotext_params, infotext_to_request_fields, parse_infotext
    from webui.ui.requests import txt2img_field_values

    req = GenerationRequest(prompt="a house", loras=slots_to_refs(slots(("style", 0.7), ("detail", 1.1, 0.9))),
                            width=64, height=64, steps=3, seed=5)
    params = infotext_params(req, seed=5, lora_hashes={"style": "abc123abc123", "detail": "def456def456"})
    text = build_infotext(append_lora_tags(req.prompt, req.loras), req.negative_prompt, params)
    parsed = parse_infotext(text)
    assert "style: abc123abc123" in parsed["Lora hashes"]
    values = txt2img_field_values(infotext_to_request_fields(parsed))
    again = txt2img_request(values)  # slots empty: the prompt carries the stack
    assert merge_lora_refs(again.loras, extract_lora_tags(again.prompt)[1]) == req.loras


def test_restore_is_bit_exact_after_100_random_cycles():
    from tests.fixtures.lora_factory import make_lora, tiny_sd1
    from webui.models.lora import LoraPatcher, StackEntry, lora_from_state_dict

    models = tiny_sd1()
    pristine = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    loras = [lora_from_state_dict(make_lora(models, rank=2, seed=s, conv=s % 2 == 1, amp=0.3,
                                            algo=("lora", "loha", "lokr")[s % 3]), name=f"l{s}")
             for s in range(5)]
    patcher = LoraPatcher(models)
    rng = random.Random(0)
    presets = (None, "MIDD", "OUTD", "ALL0.5")
    for _ in range(100):
        stack = [StackEntry(lora, round(rng.uniform(-1, 2), 2), rng.choice((None, round(rng.uniform(0, 2), 2))),
                            rng.choice(presets))
                 for lora in rng.sample(loras, rng.randint(0, 3))]
        patcher.apply(stack)
        if rng.random() < 0.2:
            patcher.restore()
    patcher.apply([])
    for comp, model in models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, pristine[comp][key]), f"{comp}.{key} drifted"
    assert patcher.backup_bytes == 0
