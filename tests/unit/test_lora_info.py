"""webui.models.lora_info: sidecars, default weights, trigger words, speed-LoRA hints, arch warnings."""
from __future__ import annotations

import json
from pathlib import Path

from webui.models.lora_info import (
    LoraSidecar, arch_warning, default_weight, external_info, header_metadata, insert_trigger_words,
    read_sidecar, remove_trigger_words, sidecar_path, slot_info, speed_hint, trigger_words_for, weight_warning,
    write_sidecar,
)
from webui.types import Arch, ModelKind


def test_sidecar_round_trip_and_missing(tmp_path):
    lora = tmp_path / "style.safetensors"
    assert read_sidecar(lora) == LoraSidecar()
    car = LoraSidecar(trigger_words=("blue hair", "sks"), preferred_weight=0.7, notes="n", category="style")
    path = write_sidecar(lora, car)
    assert path == sidecar_path(lora) == tmp_path / "style.webui.json"
    assert read_sidecar(lora) == car
    assert json.loads(path.read_text())["trigger_words"] == ["blue hair", "sks"]
    path.write_text("{broken")
    assert read_sidecar(lora) == LoraSidecar()
    path.write_text(json.dumps({"trigger_words": "a, b ,a", "preferred_weight": "x"}))
    assert read_sidecar(lora) == LoraSidecar(trigger_words=("a", "b"))


def test_default_weight_precedence():
    assert default_weight({}) == 1.0
    assert default_weight({"ss_network_weight": "0.6"}) == 0.6
    assert default_weight({"ss_network_weight": "5"}) == 2.0  # clamped to the slider
    assert default_weight({"ss_network_weight": "0.6"}, external={"preferred_weight": 0.8}) == 0.8
    assert default_weight({"ss_network_weight": "0.6"}, LoraSidecar(preferred_weight=0.3),
                          {"preferred_weight": 0.8}) == 0.3
    assert default_weight({}, external={"preferred_weight": None}) == 1.0


def test_trigger_words_from_all_sources(tmp_path):
    meta = {"modelspec.trigger_phrase": "zyx style",
            "ss_tag_frequency": json.dumps({"10_ds": {"1girl": 9, "smile": 3, "zyx style": 1}})}
    assert trigger_words_for(meta) == ("zyx style", "1girl", "smile")
    lora = tmp_path / "a.safetensors"
    (tmp_path / "a.civitai.info").write_text(json.dumps({"trainedWords": ["civ word"], "model": {"name": "A"}}))
    (tmp_path / "a.json").write_text(json.dumps({"activation text": "act1, act2", "preferred weight": 0}))
    ext = external_info(lora)
    assert ext["trigger_words"] == ("act1", "act2", "civ word") and ext["preferred_weight"] is None
    assert trigger_words_for(meta, external=ext)[:4] == ("act1", "act2", "civ word", "zyx style")
    assert trigger_words_for(meta, LoraSidecar(trigger_words=("mine",)), ext) == ("mine",)


def test_insert_and_remove_trigger_words():
    assert insert_trigger_words("", ["a b"]) == "a b"
    p = insert_trigger_words("a cat,", ["sks", "blue hair"])
    assert p == "a cat, sks, blue hair"
    assert insert_trigger_words(p, ["sks"]) == p  # no duplicates
    assert remove_trigger_words(p, ["sks", "blue hair"]) == "a cat"
    assert remove_trigger_words("a cat <lora:x:1>, sks", ["sks"]) == "a cat <lora:x:1>"


def test_weight_warning():
    assert weight_warning(1.0) is None and weight_warning(0.5) is None
    assert "above 1" in weight_warning(1.4)


def test_speed_hints():
    assert speed_hint("plain_style") is None
    lcm = speed_hint("lcm-lora-sdv1-5")
    assert lcm.kind == "LCM" and lcm.sampler == "LCM" and lcm.cfg_scale <= 2
    hyper = speed_hint("Hyper-SDXL-8steps-lora")
    assert hyper.kind == "Hyper-SD" and hyper.steps == 8 and hyper.cfg_scale == 1
    assert speed_hint("Hyper-SD15-8steps-CFG-lora").cfg_scale > 1
    assert speed_hint("x", {"ss_output_name": "dmd2_sdxl_4step_lora"}).kind == "DMD2"
    assert speed_hint("pcm_sdxl_smallcfg_4step").kind == "PCM"
    light = speed_hint("sdxl_lightning_2step_lora")
    assert (light.kind, light.steps, light.sampler) == ("Lightning", 2, "Euler")
    assert "steps" in light.text and "CFG" in light.text


def test_arch_warning_text():
    assert arch_warning(Arch.SD1, Arch.SD1) is None
    assert arch_warning(Arch.UNKNOWN, Arch.SDXL) is None
    text = arch_warning(Arch.SDXL, Arch.SD1)
    assert text.startswith("made for SDXL, current model is SD 1.5: it would do nothing")
    assert "SD 2.x" in arch_warning(Arch.SD2, Arch.SD1)


def test_slot_info_over_a_real_file(tmp_path):
    from safetensors.torch import save_file
    import torch

    from webui.models.catalog import ModelRecord

    path = tmp_path / "Hyper-SD15-4steps.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"ss_network_weight": "0.8",
                                                          "modelspec.trigger_phrase": "hyp"})
    assert header_metadata(path)["ss_network_weight"] == "0.8"
    record = ModelRecord(name="Hyper-SD15-4steps", filename=path.name, path=path, folder=ModelKind.LORA,
                         kind=ModelKind.LORA, arch=Arch.SD1)
    info = slot_info(record, Arch.SD1)
    assert info.default_weight == 0.8 and info.trigger_words == ("hyp",) and info.hint.steps == 4
    assert info.usable
    bad = slot_info(record, Arch.SDXL)
    assert not bad.usable and "made for SD 1.5, current model is SDXL" in bad.warning
    broken = ModelRecord(name="b", filename="b.safetensors", path=Path(tmp_path / "b.safetensors"),
                         folder=ModelKind.LORA, kind=ModelKind.CHECKPOINT, error="this is a checkpoint")
    assert "checkpoint" in slot_info(broken, Arch.SD1).warning
