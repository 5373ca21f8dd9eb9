"""Options store (typed, atomic, unknown keys kept) and launch settings (flags, safety)."""
import json
import os
from pathlib import Path

import pytest

from webui.options import OptionError, OptionsStore, atomic_write_text
from webui.settings import Settings, SettingsError, build_arg_parser, parse_auth, settings_from_args


def test_options_round_trip_keeps_unknown_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"sd_vae": "x.safetensors", "some_a1111_key": [1, 2], "CLIP_stop_at_last_layers": 2}))
    store = OptionsStore(path)
    assert store.get("sd_vae") == "x.safetensors"
    assert store.get("CLIP_stop_at_last_layers") == 2
    assert store.get("some_a1111_key") == [1, 2]
    store.update({"CLIP_stop_at_last_layers": "3", "samples_save": "false"})
    saved = json.loads(path.read_text())
    assert saved["CLIP_stop_at_last_layers"] == 3
    assert saved["samples_save"] is False
    assert saved["some_a1111_key"] == [1, 2]
    assert OptionsStore(path).get("CLIP_stop_at_last_layers") == 3


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"CLIP_stop_at_last_layers": 0}, ">= 1"),
        ({"CLIP_stop_at_last_layers": "two"}, "must be a int"),
        ({"samples_save": "maybe"}, "must be a bool"),
        ({"show_progress_every_n_steps": 1.5}, "must be a int"),
    ],
)
def test_invalid_option_is_rejected_and_nothing_saved(tmp_path, changes, message):
    path = tmp_path / "config.json"
    store = OptionsStore(path)
    store.update({"sd_vae": "Automatic"})
    before = path.read_text()
    with pytest.raises(OptionError, match=message):
        store.update({"sd_vae": "other.safetensors", **changes})
    assert path.read_text() == before
    assert store.get("sd_vae") == "Automatic"


def test_corrupt_config_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    store = OptionsStore(path)
    assert store.load_warnings and "could not read settings" in store.load_warnings[0]
    assert path.read_text() == "{not json"
    assert store.get("samples_save") is True


def test_atomic_write_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    target.write_text("old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_parse_auth():
    assert parse_auth("a:b,c:d:e") == (("a", "b"), ("c", "d:e"))
    assert parse_auth(None) == ()
    with pytest.raises(SettingsError, match="user:password"):
        parse_auth("nopassword")


def test_flags_point_at_existing_folders(tmp_path):
    args = build_arg_parser().parse_args(
        ["--data-dir", str(tmp_path), "--ckpt-dir", str(tmp_path / "ckpts"), "--lora-dir", "/x/loras", "--port", "7000"]
    )
    s = settings_from_args(args, default_data_dir=Path("/nowhere"))
    assert s.ckpt_dir == tmp_path / "ckpts"
    assert s.lora_dir == Path("/x/loras")
    assert s.vae_dir == tmp_path / "models" / "VAE"
    assert s.outdir == tmp_path / "outputs"
    assert s.port == 7000 and s.host == "127.0.0.1"


@pytest.mark.parametrize("flags", [["--listen"], ["--share"], ["--server-name", "10.1.2.3"]])
def test_public_listen_without_auth_refuses(tmp_path, flags):
    args = build_arg_parser().parse_args(["--data-dir", str(tmp_path), *flags])
    s = settings_from_args(args, default_data_dir=tmp_path)
    with pytest.raises(SettingsError, match="--gradio-auth"):
        s.check_safe()
    assert not s.extension_install_allowed
    settings_from_args(build_arg_parser().parse_args(["--data-dir", str(tmp_path), *flags, "--gradio-auth", "u:p"]),
                       default_data_dir=tmp_path).check_safe()
    settings_from_args(build_arg_parser().parse_args(["--data-dir", str(tmp_path), *flags, "--insecure"]),
                       default_data_dir=tmp_path).check_safe()


def test_local_listen_is_safe(tmp_path):
    s = Settings.for_data_dir(tmp_path)
    s.check_safe()
    assert s.extension_install_allowed
