"""LoRA library (issue #6): metadata extraction, category/base inference, search/filter/sort, sidecars,
SQLite persistence (bookmarks, usage, header cache) and bad input.  No torch, no Gradio."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fixtures.lora_library_factory import (
    BASES, library_item, lora_tensors, touch_later, write_library, write_safetensors,
)
from webui.lora_library import LoraLibrary, Query, infer
from webui.lora_library.cards import card, detail, grid
from webui.lora_library.index import build_entry, header_facts
from webui.lora_library.search import compatible, facets
from webui.lora_library.store import LibraryStore


@pytest.fixture
def lib(tmp_path):
    folder = tmp_path / "Lora"
    write_library(folder, 24)
    library = LoraLibrary([folder], tmp_path / "webui.db")
    library.refresh()
    yield library
    library.close()


def _entry(**facts_meta):
    meta = facts_meta.pop("meta", {})
    return build_entry(root=0, rel=facts_meta.pop("rel", "x.safetensors"), path=Path("/m/x.safetensors"), size=1,
                       mtime_ns=0, facts={"meta": meta, **facts_meta})


# ---------------------------------------------------------------------------- inference (pure)
@pytest.mark.parametrize("arch_family, meta, expected", [
    ("SDXL", {"ss_sd_model_name": "ponyDiffusionV6XL.safetensors"}, "Pony"),
    ("SDXL", {"ss_sd_model_name": "illustriousXL_v01"}, "Illustrious"),
    ("SDXL", {"ss_sd_model_name": "noobaiXL_vpred"}, "NoobAI"),
    ("SDXL", {"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL"),
    ("SD 1.5", {"ss_sd_model_name": "ponyDiffusionV6XL"}, "SD 1.5"),  # structure beats contradicting metadata
    ("", {"modelspec.architecture": "flux-1-dev/lora"}, "Flux"),
    ("", {"ss_base_model_version": "sd_v1"}, "SD 1.5"),
    ("", {}, "Unknown"),
    ("SD 1.5", {"ss_sd_model_name": "my ponytail mix"}, "SD 1.5"),
])
def test_base_family(arch_family, meta, expected):
    assert infer.base_family(arch_family, meta) == expected


def test_base_family_user_override_wins():
    assert infer.base_family("SDXL", {}, override="illustrious") == "Illustrious"


@pytest.mark.parametrize("kwargs, expected", [
    ({"override": "style"}, ("Style", "user")),
    ({"metadata": {"modelspec.category": "clothing"}}, ("Outfit", "metadata")),
    ({"folder": "characters/anime"}, ("Character", "folder")),
    ({"folder": "Styles"}, ("Style", "folder")),
    ({"name": "detail_tweaker_xl"}, ("Detail/Slider", "name")),
    ({"name": "add-detail"}, ("Detail/Slider", "name")),
    ({"name": "sdxl_lightning_4step"}, ("Speed", "name")),
    ({"name": "LCM_LoRA"}, ("Speed", "name")),
    ({"name": "dynamic_pose_helper"}, ("Pose", "name")),
    ({"name": "kimono_outfit"}, ("Outfit", "name")),
    ({"name": "zxy", "metadata": {"modelspec.title": "Watercolor Style"}}, ("Style", "name")),
    ({"name": "zxy", "tags": ["1girl", "solo"]}, ("Other", "default")),
    ({"name": "xyz", "tags": ["pixel art", "1girl"]}, ("Style", "tags")),
])
def test_category(kwargs, expected):
    assert infer.category(**kwargs) == expected


def test_tag_frequency_top20_and_bad_input():
    tags = {f"tag{i}": i for i in range(100)}
    meta = {"ss_tag_frequency": json.dumps({"a": tags, "b": {"tag1": 500, "weird": "x", "": 3, "nan": float("nan")}})}
    top = infer.tag_frequency(meta)
    assert len(top) == 20 and top[0] == ("tag1", 501) and top[1] == ("tag99", 99)
    assert infer.tag_frequency({"ss_tag_frequency": "{not json"}) == ()
    assert infer.tag_frequency({"ss_tag_frequency": "[1, 2]"}) == ()
    assert infer.tag_frequency({"ss_tag_frequency": json.dumps({"a": [1, 2]})}) == ()


def test_huge_tag_list_is_bounded():
    meta = {"ss_tag_frequency": json.dumps({"a": {f"t{i}": 1 for i in range(200_000)}})}
    assert len(infer.tag_frequency(meta)) == 20


def test_trigger_words_phrase_first():
    meta = {"modelspec.trigger_phrase": "sks dog, blue collar"}
    assert infer.trigger_words(meta, (("dog", 5), ("sks dog", 3))) == ("sks dog", "blue collar", "dog")


def test_training_summary():
    summary = infer.training_summary({"ss_network_dim": "16", "ss_network_alpha": "8", "ss_resolution": "(1024, 1024)",
                                      "ss_num_epochs": "10"}, rank=4)
    assert summary == {"rank": "16", "alpha": "8", "resolution": "(1024, 1024)", "epochs": "10"}
    assert infer.training_summary({}, rank=4) == {"rank": "4"}


# ---------------------------------------------------------------------------- header extraction
@pytest.mark.parametrize("i", range(len(BASES)))
def test_header_facts_from_real_headers(tmp_path, i):
    rel, arch, meta = library_item(i)
    path = write_safetensors(tmp_path / "x.safetensors", lora_tensors(arch), meta)
    facts = header_facts(path)
    assert facts.get("problem") is None
    assert facts["arch"] == arch
    entry = build_entry(root=0, rel=rel, path=path, size=1, mtime_ns=0, facts=facts)
    assert entry.family == BASES[i][2]
    assert entry.trigger_words[0] == f"{meta['ss_output_name'].split('_')[0]}{i}_trigger"
    assert dict(entry.training)["rank"] == meta["ss_network_dim"]


def test_header_facts_bad_files(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    (tmp_path / "huge.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}")
    (tmp_path / "notlora.safetensors").write_bytes(b"")
    write_safetensors(tmp_path / "notlora.safetensors", {"foo.weight": ("F16", (2, 2))}, {})
    write_safetensors(tmp_path / "flux.safetensors", lora_tensors("flux"), {"modelspec.architecture": "flux-1-dev/lora"})
    (tmp_path / "pickled.pt").write_bytes(b"\x80\x02}q\x00.")
    for name in ("empty", "junk", "huge", "notlora"):
        assert header_facts(tmp_path / f"{name}.safetensors")["problem"], name
    flux = header_facts(tmp_path / "flux.safetensors")  # DiT LoRAs are usable since issue #10
    assert not flux.get("problem") and (flux["arch"], flux["detected_family"]) == ("flux", "Flux")
    assert "pickle" in header_facts(tmp_path / "pickled.pt")["problem"]
    assert header_facts(tmp_path / "pickled.pt", allow_pickle=True)["problem"] is None


def test_odd_metadata_values(tmp_path):
    meta = {"ss_tag_frequency": json.dumps({"a": {"x" * 5000: 10**30}}), "modelspec.title": "\u202e\x00<b>odd</b>",
            "ss_network_dim": "None", "ss_num_epochs": "-1", "modelspec.description": "é" * 10_000}
    path = write_safetensors(tmp_path / "odd.safetensors", lora_tensors("sd1"), meta)
    facts = header_facts(path)
    entry = build_entry(root=0, rel="odd.safetensors", path=path, size=1, mtime_ns=0, facts=facts)
    assert entry.problem is None and len(entry.description) <= infer.MAX_TEXT
    html = card(entry, 0, bookmarked=False) + detail(entry, sha256=None)
    assert "<b>odd</b>" not in html and "&lt;b&gt;odd&lt;/b&gt;" in html


# ---------------------------------------------------------------------------- search (pure)
def test_search_by_trigger_word_name_tag_description(lib):
    assert [e.name for e in lib.search(Query(text="amber0_trigger")).items] == ["characters/amber_lora_00000"]
    assert [e.name for e in lib.search(Query(text="AMBER0_TRIGGER")).items] == ["characters/amber_lora_00000"]
    assert lib.search(Query(text="about fjord")).total == 1  # description
    assert lib.search(Query(text="amber lora")).total == 2  # tokens AND, "amber_lora" matched with spaces
    assert lib.search(Query(text="amber_lora_00020")).total == 1  # file name with underscores
    assert lib.search(Query(text="zzznothing")).total == 0
    assert lib.search(Query(text="")).total == 24


def test_filters_and_sort(lib):
    styles = lib.search(Query(category="Style")).items
    assert styles and all(e.category == "Style" for e in styles)
    pony = lib.search(Query(family="Pony")).items
    assert pony and all(e.family == "Pony" for e in pony)
    assert all(e.folder.startswith("misc") for e in lib.search(Query(folder="misc")).items)
    sd1 = lib.search(Query(checkpoint_arch="sd1")).items
    assert sd1 and all(e.arch in ("sd1", "unknown") for e in sd1)
    names = [e.name for e in lib.search(Query(sort="Name")).items]
    assert names == sorted(names, key=str.casefold)
    lib.set_bookmark(names[3], True)
    assert [e.name for e in lib.search(Query(bookmarked_only=True)).items] == [names[3]]
    lib.record_use([names[5], names[5], names[7]])
    lib.record_use([names[5]])
    assert lib.search(Query(sort="Most used")).items[0].name == names[5]
    lib.record_use([names[9] + ".safetensors"])  # a prompt-style reference counts for the same LoRA
    assert lib.search(Query(sort="Recently used")).items[0].name == names[9]


def test_pagination(lib):
    first = lib.search(Query(sort="Name", page_size=10))
    last = lib.search(Query(sort="Name", page_size=10, page=99))
    assert (first.pages, first.page, len(first.items)) == (3, 0, 10)
    assert (last.page, len(last.items)) == (2, 4)
    assert not {e.name for e in first.items} & {e.name for e in last.items}


def test_compatible_rules():
    sd1 = _entry(arch="sd1", detected_family="SD 1.5")
    flux = _entry(unsupported="LoRA for a transformer (DiT) model such as Flux/SD3", meta={"modelspec.architecture": "flux"})
    unknown = _entry()
    assert compatible(sd1, "sd1") and not compatible(sd1, "sdxl") and compatible(sd1, None)
    assert not compatible(flux, "sdxl") and compatible(flux, "flux") and compatible(unknown, "sdxl")


def test_facets_and_grid(lib):
    f = facets(lib.entries())
    assert f["category"][0] == "All" and "Style" in f["category"]
    assert "misc" in f["folder"] and "misc/old" in f["folder"]
    page = lib.search(Query(page_size=5))
    html = grid(page.items, bookmarks=set(), total=page.total, library=24)
    assert html.count('class="lora-card') == 5 and 'id="lora_card_4"' in html
    assert "No LoRA files yet" in grid((), bookmarks=set(), library=0)


# ---------------------------------------------------------------------------- scanning, cache, sidecars
def test_incremental_rescan_and_restart(tmp_path):
    folder = tmp_path / "Lora"
    paths = write_library(folder, 30)
    library = LoraLibrary([folder], tmp_path / "webui.db")
    assert library.refresh().read == 30
    assert library.refresh().read == 0
    touch_later(paths[3])
    paths[4].unlink()
    write_library(folder, 2, start=100)
    report = library.refresh()
    assert (report.files, report.read, report.removed) == (31, 3, 1)
    library.close()
    again = LoraLibrary([folder], tmp_path / "webui.db")  # a restart reads no header
    assert again.refresh().read == 0 and len(again.entries()) == 31
    again.close()


def test_sidecar_save_preserves_other_keys_and_never_touches_the_lora(lib):
    entry = lib.get("styles/birch_lora_00001")
    path = Path(entry.path)
    before = path.read_bytes()
    side = path.with_name(path.stem + ".webui.json")
    side.write_text(json.dumps({"notes": "old", "someone_else": 1}))
    lib.refresh()
    updated = lib.save_details(entry.name, {"trigger_words": "foo, bar", "preferred_weight": 0.7,
                                            "category": "Pose", "base_model": "Pony", "description": "hello"})
    assert path.read_bytes() == before
    data = json.loads(side.read_text())
    assert data["someone_else"] == 1 and data["notes"] == "old" and data["trigger_words"] == ["foo", "bar"]
    assert (updated.category, updated.family, updated.default_weight) == ("Pose", "Pony", 0.7)
    assert updated.trigger_words == ("foo", "bar") and updated.description == "hello"
    assert lib.search(Query(text="foo")).items[0].name == entry.name
    from webui.models.lora_info import read_sidecar

    assert read_sidecar(path).preferred_weight == 0.7  # the txt2img stack reads the same file


def test_previews_and_samples(lib, tmp_path):
    from PIL import Image

    entry = lib.get("poses/cobalt_lora_00002")
    path = Path(entry.path)
    Image.new("RGB", (8, 8)).save(path.with_name(path.stem + ".jpg"))
    lib.refresh()
    assert lib.get(entry.name).preview == "poses/cobalt_lora_00002.jpg"
    updated = lib.set_preview(entry.name, Image.new("RGB", (16, 16), "red"))
    assert updated.preview == "poses/cobalt_lora_00002.preview.png"
    samples = path.with_suffix(".samples")
    samples.mkdir()
    Image.new("RGB", (8, 8)).save(samples / "a.png")
    assert lib.samples(entry.name)[-1] == "poses/cobalt_lora_00002.samples/a.png"
    assert "/webui/v1/files/models/lora/poses/cobalt_lora_00002.preview.png" in card(updated, 0, bookmarked=False)


def test_hashes_are_lazy_and_cached(lib):
    import hashlib

    entry = lib.get("styles/birch_lora_00001")
    assert lib.sha256(entry.name, compute=False) is None
    digest = lib.sha256(entry.name)
    assert digest == hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
    lib.start_hashing()
    lib._hash_thread.join(10)
    assert all(lib.sha256(e.name, compute=False) for e in lib.entries())


def test_non_utf8_and_broken_files_are_listed(tmp_path):
    folder = tmp_path / "Lora"
    source = write_library(folder, 1)[0].read_bytes()
    raw = os.fsencode(str(folder)) + b"/caf\xe9_lora.safetensors"
    try:
        with open(raw, "wb") as f:
            f.write(source)
    except OSError:
        pytest.skip("file system refuses non-UTF-8 names")
    (folder / "truncated.safetensors").write_bytes(source[:40])
    library = LoraLibrary([folder], tmp_path / "webui.db")
    library.refresh()
    by_name = {e.name: e for e in library.entries()}
    odd = next(e for e in by_name.values() if "caf" in e.name)
    assert "\ufffd" in odd.name and "UTF-8" in odd.problem
    assert "truncated" in by_name["truncated"].problem
    json.dumps([e.name for e in library.entries()])  # JSON-safe for the UI
    assert library.refresh().read == 0  # cached like any other file
    library.close()


# ---------------------------------------------------------------------------- persistence
def test_store_persists_bookmarks_and_usage(tmp_path):
    store = LibraryStore(tmp_path / "webui.db")
    store.set_bookmark("a", True)
    store.record_use(["a", "b"], when=5.0)
    store.record_use(["a"], when=6.0)
    store.close()
    again = LibraryStore(tmp_path / "webui.db")
    assert again.bookmarks() == {"a"} and again.usage() == {"a": (2, 6.0), "b": (1, 5.0)}
    again.set_bookmark("a", False)
    assert again.bookmarks() == set()
    mode = sqlite3.connect(tmp_path / "webui.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_store_survives_kill_9_mid_write(tmp_path):
    """A child process bookmarks in a tight loop and is SIGKILLed; the db opens and holds whole rows."""
    db = tmp_path / "webui.db"
    code = textwrap.dedent(f"""
        import sys, os
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from webui.lora_library.store import LibraryStore
        s = LibraryStore({str(db)!r})
        i = 0
        while True:
            s.set_bookmark(f"lora{{i}}", True); s.record_use([f"lora{{i}}"])
            if i == 50: print("ready", flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    proc.kill()
    proc.wait()
    store = LibraryStore(db)
    assert store._read("PRAGMA integrity_check")[0][0] == "ok"
    marks = store.bookmarks()
    assert len(marks) >= 50 and all(n in store.usage() for n in marks - {max(marks, key=lambda n: int(n[4:]))})
    store.close()


def test_store_replaces_a_garbage_database(tmp_path):
    db = tmp_path / "webui.db"
    db.write_bytes(b"this is not sqlite" * 100)
    store = LibraryStore(db)
    store.set_bookmark("x", True)
    assert store.bookmarks() == {"x"}
    assert list(tmp_path.glob("webui.db.broken-*"))
    store.close()
