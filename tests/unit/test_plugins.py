"""The extension contract: manifests, API ranges, isolation of raising hooks, persisted enable/disable,
opt-in hook arguments, extension settings validated like ours, install refusal, and the shipped examples'
pure parts (wildcards expansion, contact sheet grid)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from webui.options import OptionError, OptionsStore
from webui.plugins.api import API_VERSION
from webui.plugins.install import REFUSED, InstallError, install
from webui.plugins.manager import ManifestError, PluginManager, api_compatible, parse_manifest
from webui.types import GenerationRequest, Progress, RequestError

REPO = Path(__file__).resolve().parents[2]


def write_ext(root: Path, name: str, code: str, *, api: str = ">=1.0,<2", version: str = "0.1.0") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "extension.toml").write_text(
        f'[extension]\nname = "{name}"\nversion = "{version}"\napi = "{api}"\nentry = "main"\n')
    (folder / "main.py").write_text("from webui.plugins.api import hookimpl, SettingSpec\n" + textwrap.dedent(code))
    return folder


def manager(tmp_path: Path, options: dict | None = None) -> PluginManager:
    values = options or {}
    return PluginManager(folders=[tmp_path / "ext"], state_file=tmp_path / "extensions.json",
                         data_root=tmp_path / "data", option_getter=lambda k: values[k],
                         entry_point_group=None).load()


# ---- manifests and versions --------------------------------------------------------------------
def test_manifest_parsing_and_errors():
    m = parse_manifest('[extension]\nname = "my-ext"\nversion = "1.2.0"\napi = ">=1.0,<2"\n')
    assert (m.name, m.version, m.api, m.entry) == ("my-ext", "1.2.0", ">=1.0,<2", "my_ext")
    assert parse_manifest('name = "x"\nversion = "1"\napi = "~=1.0"\nentry = "pkg"').entry == "pkg"
    with pytest.raises(ManifestError, match="missing or empty api"):
        parse_manifest('name = "x"\nversion = "1"')
    with pytest.raises(ManifestError, match="lower-case"):
        parse_manifest('name = "Bad Name"\nversion = "1"\napi = ">=1"')
    with pytest.raises(ManifestError, match="not valid"):
        parse_manifest('name = "x"\nversion = "1"\napi = "one or two"')
    with pytest.raises(ManifestError, match="TOML"):
        parse_manifest('name = "x')


@pytest.mark.parametrize("spec, version, ok", [
    (">=1.0,<2", "1.0.0", True), (">=1.0,<2", "1.7.3", True), (">=1.0,<2", "2.0.0", False),
    (">=1.1", "1.0.0", False), ("~=1.0", "1.4.0", True), ("==1.*", "1.0.0", True), ("<1", "1.0.0", False),
])
def test_api_ranges(spec, version, ok):
    assert api_compatible(spec, version) is ok


def test_incompatible_or_broken_extensions_are_refused_with_a_reason(tmp_path):
    ext = tmp_path / "ext"
    write_ext(ext, "future", "@hookimpl\ndef webui_on_step(progress): pass\n", api=">=2.0,<3")
    write_ext(ext, "unknown-hook", "@hookimpl\ndef webui_on_frobnicate(api): pass\n")
    write_ext(ext, "bad-arg", "@hookimpl\ndef webui_on_step(progress, colour): pass\n")
    write_ext(ext, "crash-on-import", "raise RuntimeError('boom at import')\n")
    (ext / "no-manifest-fields").mkdir()
    (ext / "no-manifest-fields" / "extension.toml").write_text('name = "no-manifest-fields"\n')
    pm = manager(tmp_path)
    status = {r.name: r for r in pm.records()}
    assert status["future"].status == "incompatible"
    assert ">=2.0,<3" in status["future"].error and API_VERSION in status["future"].error
    assert status["unknown-hook"].status == "invalid" and "webui_on_frobnicate" in status["unknown-hook"].error
    assert status["bad-arg"].status == "invalid" and "colour" in status["bad-arg"].error
    assert status["crash-on-import"].status == "error" and "boom at import" in status["crash-on-import"].error
    assert status["no-manifest-fields"].status == "invalid"
    assert "crash-on-import" not in {impl.plugin_name for impl in pm.pm.hook.webui_on_step.get_hookimpls()}


# ---- isolation -------------------------------------------------------------------------------
RAISING = """
@hookimpl
def webui_settings():
    raise RuntimeError("settings broke")
@hookimpl
def webui_modify_request(request):
    raise RuntimeError("modify broke")
@hookimpl
def webui_prompt_syntax(prompt):
    raise RuntimeError("prompt broke")
@hookimpl
def webui_on_step(progress):
    raise RuntimeError("step broke")
@hookimpl
def webui_postprocess_image(image):
    raise RuntimeError("postprocess broke")
"""

GOOD = """
CALLS = []
@hookimpl
def webui_modify_request(request, api):
    CALLS.append(("modify", api.name))
    return request.with_changes(steps=request.steps + 1)
@hookimpl
def webui_prompt_syntax(prompt, negative):
    return prompt if negative else prompt + ", good"
@hookimpl
def webui_on_step(progress):
    CALLS.append(("step", progress.step))
@hookimpl
def webui_postprocess_image(image, index):
    CALLS.append(("post", index))
    return image.transpose(0)
"""


@pytest.mark.parametrize("hook", ["settings", "modify", "prompt", "step", "postprocess"])
def test_a_raising_hook_disables_only_its_extension(tmp_path, hook):
    ext = tmp_path / "ext"
    # each "raiser" raises in one hook only, so every hook is tested on a fresh, enabled plugin
    lines = [block for block in RAISING.split("@hookimpl") if f"{hook} broke" in block]
    write_ext(ext, "raiser", "@hookimpl" + lines[0])
    write_ext(ext, "good", GOOD)
    pm = manager(tmp_path)
    good = sys.modules["webui_ext_good"]
    good.CALLS.clear()
    request = GenerationRequest(prompt="a cat", steps=3, width=64, height=64, seed=1)
    pm.setting_specs()
    out = pm.modify_request(request)
    pm.on_step(Progress(step=1, total_steps=3), out)
    image = Image.new("RGB", (8, 4))
    processed = pm.postprocess_image(image, seed=1, index=0, request=out)
    raiser = pm.get("raiser")
    assert raiser.status == "error" and f"{hook} broke" in raiser.error and "Traceback" in raiser.error
    # the other extension and the "generation" carried on
    assert out.steps == 4 and out.prompt == "a cat, good"
    assert processed.size == (8, 4) and processed.tobytes() == image.transpose(0).tobytes()
    assert ("step", 1) in good.CALLS and ("post", 0) in good.CALLS
    # disabled until restart: no more calls into it
    pm.modify_request(request)
    assert pm.get("raiser").status == "error"


def test_request_error_from_a_hook_reaches_the_user_and_keeps_the_extension(tmp_path):
    write_ext(tmp_path / "ext", "strict", """
from webui.plugins.api import RequestError
@hookimpl
def webui_modify_request(request):
    if "forbidden" in request.prompt:
        raise RequestError("strict: 'forbidden' is not allowed in prompts")
""")
    pm = manager(tmp_path)
    with pytest.raises(RequestError, match="strict"):
        pm.modify_request(GenerationRequest(prompt="forbidden fruit"))
    assert pm.get("strict").status == "enabled"


def test_wrong_return_type_disables_the_extension(tmp_path):
    write_ext(tmp_path / "ext", "wrong", "@hookimpl\ndef webui_prompt_syntax(prompt):\n    return 42\n")
    pm = manager(tmp_path)
    assert pm.modify_request(GenerationRequest(prompt="x")).prompt == "x"
    assert pm.get("wrong").status == "error" and "returned int" in pm.get("wrong").error


def test_disable_persists_and_is_not_imported_after_restart(tmp_path):
    write_ext(tmp_path / "ext", "toggle", "@hookimpl\ndef webui_prompt_syntax(prompt):\n    return prompt + '!'\n")
    pm = manager(tmp_path)
    assert pm.modify_request(GenerationRequest(prompt="hi")).prompt == "hi!"
    pm.set_enabled("toggle", False)
    assert pm.modify_request(GenerationRequest(prompt="hi")).prompt == "hi"  # at once
    assert json.loads((tmp_path / "extensions.json").read_text()) == {"disabled": ["toggle"]}
    sys.modules.pop("webui_ext_toggle", None)
    again = manager(tmp_path)
    assert again.get("toggle").status == "disabled" and "webui_ext_toggle" not in sys.modules
    again.set_enabled("toggle", True)  # enabling loads it now
    assert again.get("toggle").status == "enabled"
    assert again.modify_request(GenerationRequest(prompt="hi")).prompt == "hi!"
    assert manager(tmp_path).get("toggle").status == "enabled"


def test_settings_are_validated_like_ours(tmp_path):
    write_ext(tmp_path / "ext", "knobs", """
@hookimpl
def webui_settings():
    return [SettingSpec(key="knobs_strength", default=0.5, label="Strength", minimum=0, maximum=1),
            SettingSpec(key="samples_save", default=False, label="collides with a core option")]
""")
    pm = manager(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"knobs_strength": 7}))
    store = OptionsStore(config)
    warnings = store.add_specs(pm.option_specs())
    assert store.get("knobs_strength") == 0.5  # the saved 7 is out of range
    assert any("knobs_strength" in w for w in warnings) and any("samples_save" in w for w in warnings)
    assert store.update({"knobs_strength": "0.25"}) == {"knobs_strength": 0.25}
    with pytest.raises(OptionError, match="knobs_strength"):
        store.update({"knobs_strength": 3})
    assert OptionsStore(config).get("knobs_strength") == 0.25


def test_tryfirst_order_and_facade(tmp_path):
    write_ext(tmp_path / "ext", "aaa", "@hookimpl(tryfirst=True)\ndef webui_prompt_syntax(prompt):\n"
                                       "    return prompt + ' A'\n")
    write_ext(tmp_path / "ext", "zzz", "@hookimpl\ndef webui_prompt_syntax(prompt, api):\n"
                                       "    return prompt + ' ' + api.option('suffix') + ' ' + api.name\n")
    pm = manager(tmp_path, {"suffix": "S"})
    assert pm.modify_request(GenerationRequest(prompt="p")).prompt == "p A S zzz"
    assert pm.get("zzz").facade.data_dir == tmp_path / "data" / "zzz"


def test_reserved_registries_are_collected(tmp_path):
    write_ext(tmp_path / "ext", "reg", """
from webui.plugins.api import NamedEntry
@hookimpl
def webui_upscalers():
    return [NamedEntry(name="Nearest x2", factory=lambda image, scale: image)]
""")
    entries = manager(tmp_path).registry_entries("webui_upscalers")
    assert [(name, e.name) for name, e in entries] == [("reg", "Nearest x2")]


SAMPLER_EXT = """
import diffusers
from webui.plugins.api import NamedEntry

def trailing(config):
    return diffusers.EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")

def linear(n, sigma_min, sigma_max):
    return [sigma_max + (sigma_min - sigma_max) * i / max(n - 1, 1) for i in range(n)]

@hookimpl
def webui_samplers():
    return [NamedEntry(name="Euler Trailing", factory=trailing), NamedEntry(name="DDIM", factory=trailing)]

@hookimpl
def webui_schedulers():
    return [NamedEntry(name="Linear Sigmas", factory=linear)]
"""


def test_api_1_1_makes_the_sampler_registries_real(tmp_path):
    from webui.generation.samplers import SamplerRegistry, sampler_names

    assert API_VERSION.startswith("1.") and tuple(map(int, API_VERSION.split(".")[:2])) >= (1, 1)
    write_ext(tmp_path / "ext", "samp", SAMPLER_EXT, api=">=1.1,<2")
    pm = manager(tmp_path)
    registry = SamplerRegistry.from_plugins(pm)
    record = pm.get("samp")
    assert record.status == "enabled"  # the clashing "DDIM" is refused, the extension stays enabled
    assert "sampler 'DDIM' refused" in record.error and "built-in sampler 'DDIM'" in record.error
    assert registry.sampler_names() == [*sampler_names(), "Euler Trailing"]
    assert registry.schedule_names()[-1] == "Linear Sigmas"
    scheduler = registry.make_scheduler({"num_train_timesteps": 1000}, "Euler Trailing", "Linear Sigmas")
    scheduler.set_timesteps(3)
    sigmas = scheduler.sigmas.tolist()
    assert len(sigmas) == 4 and sigmas[-1] == 0 and abs((sigmas[0] - sigmas[1]) - (sigmas[1] - sigmas[2])) < 1e-3
    pm.set_enabled("samp", False)  # disabled at run time: gone from the lists, refused with a reason
    assert "Euler Trailing" not in registry.sampler_names() and "Linear Sigmas" not in registry.schedule_names()
    with pytest.raises(RequestError, match="extension 'samp', which is disabled"):
        registry.resolve("Euler Trailing")
    pm.set_enabled("samp", True)
    assert registry.resolve("samp:Euler Trailing").sampler == "Euler Trailing"


def test_a_failing_sampler_factory_disables_only_its_extension(tmp_path):
    from webui.generation.samplers import SamplerRegistry

    write_ext(tmp_path / "ext", "good", SAMPLER_EXT)
    write_ext(tmp_path / "ext", "broken", """
from webui.plugins.api import NamedEntry

def at_start(config):
    raise RuntimeError("broken at start")

@hookimpl
def webui_samplers():
    return [NamedEntry(name="At Start", factory=at_start)]
""")
    write_ext(tmp_path / "ext", "later", """
from webui.plugins.api import NamedEntry
import diffusers

def in_a_job(config):
    if config.get("prediction_type") == "v_prediction":
        raise RuntimeError("broken in a job")
    return diffusers.EulerDiscreteScheduler.from_config(config)

@hookimpl
def webui_samplers():
    return [NamedEntry(name="Later", factory=in_a_job)]
""")
    pm = manager(tmp_path)
    registry = SamplerRegistry.from_plugins(pm)
    broken = pm.get("broken")
    assert broken.status == "error" and "broken at start" in broken.error and "Traceback" in broken.error
    assert "At Start" not in registry.samplers and "Later" in registry.sampler_names()
    with pytest.raises(RequestError) as err:
        registry.make_scheduler({"prediction_type": "v_prediction"}, "Later")
    assert "sampler 'Later' from extension 'later' failed (RuntimeError: broken in a job)" in str(err.value)
    assert pm.get("later").status == "error" and "broken in a job" in pm.get("later").error
    assert pm.get("good").status == "enabled" and "Euler Trailing" in registry.sampler_names()
    assert "Later" not in registry.sampler_names()


# ---- install -----------------------------------------------------------------------------------
def test_install_refused_when_listening_publicly(tmp_path):
    source = write_ext(tmp_path / "src", "inst", "")
    with pytest.raises(PermissionError) as info:
        install(str(source), target_root=tmp_path / "installed", allowed=False)
    assert str(info.value) == REFUSED and "--enable-insecure-extension-access" in REFUSED
    assert not (tmp_path / "installed").exists()


def test_install_from_folder_and_local_git(tmp_path):
    from webui.settings import Settings

    assert Settings.for_data_dir(tmp_path).extension_install_allowed
    assert not Settings.for_data_dir(tmp_path, host="0.0.0.0").extension_install_allowed
    assert Settings.for_data_dir(tmp_path, share=True, enable_insecure_extension_access=True).extension_install_allowed
    target = tmp_path / "installed"
    source = write_ext(tmp_path / "src", "inst", "")
    assert install(str(source), target_root=target, allowed=True) == target / "inst"
    with pytest.raises(InstallError, match="already installed"):
        install(str(source), target_root=target, allowed=True)
    with pytest.raises(InstallError, match="neither"):
        install(str(tmp_path / "nothing"), target_root=target, allowed=True)
    repo = write_ext(tmp_path / "gitsrc", "from-git", "")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "init"], check=True)
    bare = tmp_path / "from-git.git"
    subprocess.run([*git, "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    folder = install(f"file://{bare}", target_root=target, allowed=True)
    assert folder == target / "from-git" and (folder / "main.py").is_file()
    pm = PluginManager(folders=[target], state_file=tmp_path / "s.json", data_root=tmp_path / "d",
                       entry_point_group=None).load()
    assert {r.name: r.status for r in pm.records()} == {"from-git": "enabled", "inst": "enabled"}


# ---- shipped examples (pure parts) -------------------------------------------------------------
def load_example(name: str, module: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{module}", REPO / "extensions" / name / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wildcards_expansion_is_seeded_nested_and_safe(tmp_path):
    wc = load_example("wildcards", "wildcards_ext")
    (tmp_path / "wc" / "sub").mkdir(parents=True)
    (tmp_path / "wc" / "color.txt").write_text("# comment\nred\n\nblue\n")
    (tmp_path / "wc" / "sub" / "pet.txt").write_text("__color__ cat\n")
    (tmp_path / "secret.txt").write_text("leak\n")
    lookup = lambda name: wc.read_wildcard(tmp_path / "wc", name)  # noqa: E731
    outs = {wc.expand("a __color__ bird", lookup, random.Random(s)) for s in range(30)}
    assert outs == {"a red bird", "a blue bird"}
    assert wc.expand("__color__", lookup, random.Random(3)) == wc.expand("__color__", lookup, random.Random(3))
    assert wc.expand("my __sub/pet__", lookup, random.Random(1)) in {"my red cat", "my blue cat"}
    assert wc.expand("__../secret__ __missing__", lookup, random.Random(1)) == "__../secret__ __missing__"
    assert wc.names(tmp_path / "wc") == ["color", "sub/pet"]


def test_contact_sheet_grid_and_watermark():
    cs = load_example("contact_sheet", "contact_sheet_ext")
    images = [Image.new("RGB", (16, 8), c) for c in ("red", "green", "blue")]
    sheet, columns, rows = cs.make_grid(images)
    assert (columns, rows) == (2, 2) and sheet.size == (2 * 16 + 3 * cs.GAP, 2 * 8 + 3 * cs.GAP)
    assert sheet.getpixel((cs.GAP, cs.GAP)) == (255, 0, 0)
    with pytest.raises(RequestError):
        cs.make_grid([])
    marked = cs.watermark(Image.new("RGB", (64, 64), "gray"), "WM")
    assert marked.size == (64, 64) and marked.tobytes() != Image.new("RGB", (64, 64), "gray").tobytes()


def test_deprecated_hook_argument_warns_when_an_extension_uses_it(tmp_path):
    """The deprecation window of docs/extensions.md: pluggy's warn_on_impl_args fires at load time."""
    import pluggy

    spec = pluggy.HookspecMarker("webui")

    class Future:
        @spec(warn_on_impl_args={"old": DeprecationWarning("'old' is deprecated, use 'new'")})
        def webui_future_hook(self, old, new, api):
            """a hook whose argument ``old`` is on its way out"""

    write_ext(tmp_path / "ext", "user-old", "@hookimpl\ndef webui_future_hook(old):\n    return old\n")
    write_ext(tmp_path / "ext", "user-new", "@hookimpl\ndef webui_future_hook(new):\n    return new\n")
    pm = PluginManager(folders=[tmp_path / "ext"], state_file=tmp_path / "s.json", data_root=tmp_path / "d",
                       entry_point_group=None)
    pm.pm.add_hookspecs(Future)
    with pytest.warns(DeprecationWarning, match="use 'new'") as caught:
        pm.load()
    assert len(caught) == 1
    results = {r.name: v for r, v in pm._call("webui_future_hook", old=1, new=2)}
    assert results == {"user-old": 1, "user-new": 2}
