import pytest
import torch

from webui.generation import samplers
from webui.types import RequestError

# SD1.5's scheduler_config.json (runwayml/stable-diffusion-v1-5), as a literal.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

EXPECTED = {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "DPM++ 2S a", "DPM2", "DPM2 a",
            "Heun", "LMS", "DDIM", "PLMS", "UniPC", "LCM", "DEIS", "DPM++ 3M SDE"}


def _sigmas(scheduler, steps=8):
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.clone()


def test_registry_names():
    assert EXPECTED <= set(samplers.sampler_names())
    assert {"Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform", "Simple", "Beta"} <= set(
        samplers.schedule_names())


@pytest.mark.parametrize("name", samplers.sampler_names())
def test_every_supported_combination_builds_and_sets_timesteps(name):
    spec = samplers.SAMPLERS[name]
    for schedule in spec.schedules:
        sched = samplers.make_scheduler(SD15_SCHEDULER_CONFIG, name, schedule)
        assert type(sched).__name__ == spec.cls_name
        sched.set_timesteps(8)
        assert len(sched.timesteps) >= 8
        assert sched.config.beta_schedule == "scaled_linear"
        assert sched.config.num_train_timesteps == 1000


@pytest.mark.parametrize("name", samplers.sampler_names())
def test_unsupported_schedules_are_refused_clearly(name):
    spec = samplers.SAMPLERS[name]
    for schedule in samplers.schedule_names():
        if schedule in spec.schedules:
            continue
        with pytest.raises(RequestError) as err:
            samplers.resolve(name, schedule)
        assert schedule in str(err.value) and "use one of" in str(err.value)


def test_schedules_change_sigmas():
    uniform = _sigmas(samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler", "Uniform"))
    karras = _sigmas(samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler", "Karras"))
    exponential = _sigmas(samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler", "Exponential"))
    assert not torch.allclose(uniform, karras)
    assert not torch.allclose(uniform, exponential)
    assert not torch.allclose(karras, exponential)
    # A1111 runs Karras between the model's full sigma range (14.61 .. 0.0292).
    assert karras[0].item() == pytest.approx(14.6146, rel=1e-3)
    assert karras[-2].item() == pytest.approx(0.0292, rel=1e-2)
    assert uniform[0].item() == pytest.approx(14.6146, rel=1e-3)


def test_automatic_means_a1111_default():
    assert samplers.resolve("DPM++ 2M", "Automatic").schedule == "Karras"
    assert samplers.resolve("DPM++ 2M SDE", "Automatic").schedule == "Exponential"
    assert samplers.resolve("Euler a", "Automatic").schedule == "Uniform"
    assert samplers.resolve("DDIM", "Automatic").schedule == "Automatic"
    auto = _sigmas(samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "DPM++ 2M", "Automatic"))
    karras = _sigmas(samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "DPM++ 2M", "Karras"))
    assert torch.allclose(auto, karras)


def test_aliases_and_old_style_names():
    assert samplers.resolve("k_euler_a").sampler == "Euler a"
    assert samplers.resolve("euler A").sampler == "Euler a"
    choice = samplers.resolve("DPM++ 2M Karras", "Automatic")
    assert (choice.sampler, choice.schedule) == ("DPM++ 2M", "Karras")
    choice = samplers.resolve("DPM++ 2M SDE Exponential")
    assert (choice.sampler, choice.schedule) == ("DPM++ 2M SDE", "Exponential")
    choice = samplers.resolve("k_dpmpp_2m_ka")
    assert (choice.sampler, choice.schedule) == ("DPM++ 2M", "Karras")
    assert samplers.resolve("DPM++ 2M SDE Heun").sampler == "DPM++ 2M SDE Heun"  # not "SDE" + "Heun"
    assert samplers.resolve("Euler", "karras").schedule == "Karras"
    assert samplers.resolve("Euler", "sgm_uniform").schedule == "SGM Uniform"
    assert samplers.split_legacy_name("nope") == (None, None)


def test_unknown_names_list_valid_ones():
    with pytest.raises(RequestError) as err:
        samplers.resolve("Eulerr", "Automatic")
    assert "Eulerr" in str(err.value) and "DPM++ 2M" in str(err.value) and "Euler a" in str(err.value)
    with pytest.raises(RequestError) as err:
        samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler", "Karas")
    assert "Karas" in str(err.value) and "Karras" in str(err.value)


def test_prediction_type_passes_through():
    v_config = dict(SD15_SCHEDULER_CONFIG, prediction_type="v_prediction")
    for name in samplers.sampler_names():
        assert samplers.make_scheduler(v_config, name).config.prediction_type == "v_prediction"
    sched = samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler", prediction_type="v_prediction")
    assert sched.config.prediction_type == "v_prediction"
    assert samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler").config.prediction_type == "epsilon"


def test_zero_snr():
    sched = samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler", "Simple", rescale_betas_zero_snr=True)
    assert sched.config.rescale_betas_zero_snr is True
    with pytest.raises(RequestError) as err:
        samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "Heun", rescale_betas_zero_snr=True)
    assert "zero-terminal-SNR" in str(err.value) and "Euler" in str(err.value)


def test_fresh_instance_each_call_and_config_is_not_mutated():
    before = dict(SD15_SCHEDULER_CONFIG)
    a = samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "DPM++ 2M", "Karras")
    b = samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "DPM++ 2M", "Karras")
    assert a is not b
    assert SD15_SCHEDULER_CONFIG == before


def test_model_config_flags_do_not_leak():
    karras_config = dict(SD15_SCHEDULER_CONFIG, _class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True)
    assert samplers.make_scheduler(karras_config, "DPM++ 2M", "Uniform").config.use_karras_sigmas is False


def test_sde_seed_and_stochastic_flags():
    sched = samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "DPM++ SDE", seed=1234)
    assert sched.config.noise_sampler_seed == 1234
    assert samplers.resolve("Euler a").stochastic and not samplers.resolve("Euler").stochastic


def test_euler_step_runs():
    sched = samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler a", "Automatic")
    sched.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen) * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        x = sched.step(torch.zeros_like(x_in), t, x, generator=gen).prev_sample
    assert torch.isfinite(x).all()


def test_describe_for_api():
    entries = samplers.describe_samplers()
    names = [e["name"] for e in entries]
    assert names == samplers.sampler_names()
    euler_a = entries[names.index("Euler a")]
    assert "k_euler_a" in euler_a["aliases"]
    assert all(isinstance(v, str) for e in entries for v in e["options"].values())
    assert {s["label"] for s in samplers.describe_schedules()} == set(samplers.schedule_names())


# ---- the registry: built-ins unchanged, extension samplers and schedule types ----------------------
import diffusers  # noqa: E402
import numpy as np  # noqa: E402

from webui.generation.sampler_extensions import build_registry  # noqa: E402
from webui.plugins.api import NamedEntry  # noqa: E402


class Gate:
    """ExtensionCalls for tests: which extensions are active, what was reported, failures disable."""

    def __init__(self):
        self.inactive: set[str] = set()
        self.problems: list[tuple[str, str]] = []

    def extension_active(self, name):
        return name not in self.inactive

    def call_entry(self, name, where, fn, *args, **kwargs):
        if name in self.inactive:
            raise RequestError(f"{where} is not available: its extension {name!r} is error")
        try:
            return fn(*args, **kwargs)
        except RequestError:
            raise
        except Exception as exc:
            self.inactive.add(name)
            raise RequestError(f"{where} from extension {name!r} failed ({exc})") from None

    def report_problem(self, name, message):
        self.problems.append((name, message))


def trailing_euler(config, seed=None):
    trailing_euler.seeds.append(seed)
    config["beta_start"] = 123.0  # the factory gets a copy; the model's config must not change
    return diffusers.EulerDiscreteScheduler.from_config(config, beta_start=0.00085, timestep_spacing="trailing")


trailing_euler.seeds = []


def cubic(n, sigma_min, sigma_max):
    ramp = np.linspace(1.0, 0.0, n)
    return sigma_min + (sigma_max - sigma_min) * ramp ** 3


def registry(gate=None, samplers_=(), schedules_=()):
    return build_registry(list(samplers_), list(schedules_), gate or Gate())


def test_builtin_registry_is_the_table_and_module_functions_use_it():
    reg = samplers.SamplerRegistry()
    assert reg == samplers.BUILTIN and reg.sampler_names() == list(samplers.SAMPLERS) == samplers.sampler_names()
    assert reg.schedule_names() == list(samplers.SCHEDULES) == samplers.schedule_names(reg)
    assert samplers.resolve("k_dpmpp_2m_ka", registry=reg) == samplers.resolve("k_dpmpp_2m_ka")
    with pytest.raises(TypeError):
        reg.samplers["x"] = reg.samplers["Euler"]  # immutable
    # built from plugins with no entries: still exactly the built-ins
    empty = registry()
    assert empty.sampler_names() == reg.sampler_names() and empty.refused == ()
    assert samplers.SamplerRegistry.from_plugins(None) == reg


def test_extension_sampler_is_listed_resolved_and_built_with_job_settings():
    reg = registry(samplers_=[("myext", NamedEntry(name="Euler Trailing", factory=trailing_euler,
                                                   description="Euler, trailing spacing"))])
    assert reg.sampler_names()[-1] == "Euler Trailing" and reg.sampler_names()[:-1] == samplers.sampler_names()
    spec = reg.samplers["Euler Trailing"]
    assert spec.extension == "myext" and spec.cls_name == "EulerDiscreteScheduler"
    assert spec.schedules == tuple(samplers.SCHEDULES)  # Euler takes every built-in schedule type
    assert reg.resolve("euler  trailing").sampler == reg.resolve("myext:Euler Trailing").sampler == "Euler Trailing"
    assert reg.resolve("Euler Trailing Karras").schedule == "Karras"  # A1111 "<sampler> <schedule>" still works
    before = dict(SD15_SCHEDULER_CONFIG)
    trailing_euler.seeds.clear()
    auto = reg.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler Trailing", prediction_type="v_prediction", seed=77)
    assert SD15_SCHEDULER_CONFIG == before and trailing_euler.seeds == [77]
    assert isinstance(auto, diffusers.EulerDiscreteScheduler) and auto.config.prediction_type == "v_prediction"
    auto.set_timesteps(4)
    assert auto.timesteps.tolist() == [999, 749, 499, 249]  # Automatic keeps the extension's spacing
    karras = reg.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler Trailing", "Karras")
    assert karras.config.use_karras_sigmas is True
    assert torch.allclose(_sigmas(karras), _sigmas(samplers.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler", "Karras")))
    described = {e["name"]: e for e in reg.describe_samplers()}["Euler Trailing"]
    assert described["aliases"] == ["myext:Euler Trailing"]
    assert described["options"]["extension"] == "myext" and described["options"]["note"] == "Euler, trailing spacing"


def test_extension_schedule_feeds_exact_sigmas_or_mapped_timesteps():
    reg = registry(schedules_=[("curves", NamedEntry(name="Cubic", factory=cubic))])
    assert reg.schedule_names()[-1] == "Cubic"
    assert "Cubic" in reg.samplers["Euler"].schedules and "Cubic" in reg.samplers["DPM++ 2M"].schedules
    assert "Cubic" not in reg.samplers["LMS"].schedules and "Cubic" not in reg.samplers["LCM"].schedules
    train = np.sqrt((1 - diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod.numpy())
                    / diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod.numpy())
    wanted = cubic(6, float(train[0]), float(train[-1]))
    euler = reg.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler", "Cubic")
    euler.set_timesteps(6)  # what every pipeline calls
    assert np.allclose(euler.sigmas.numpy(), [*wanted, 0.0], rtol=1e-4)
    dpm = reg.make_scheduler(SD15_SCHEDULER_CONFIG, "DPM++ 2M", "curves:cubic")
    dpm.set_timesteps(6, device="cpu")
    steps = dpm.timesteps.tolist()
    assert steps[0] == 999 and all(a > b for a, b in zip(steps, steps[1:])) and len(steps) == 6
    assert np.allclose(dpm.sigmas.numpy()[:6], wanted, rtol=0.05)  # nearest training timestep
    heun = reg.make_scheduler(SD15_SCHEDULER_CONFIG, "Heun", "Cubic")  # Heun calls set_timesteps in __init__
    heun.set_timesteps(3)
    assert heun.timesteps[0] == 999 and len(heun.timesteps) == 2 * 3 - 1
    euler.set_timesteps(sigmas=[10.0, 1.0, 0.0])  # an explicit schedule from a caller passes through
    assert euler.sigmas.tolist() == [10.0, 1.0, 0.0]
    with pytest.raises(RequestError, match="does not support schedule type 'Cubic'"):
        reg.make_scheduler(SD15_SCHEDULER_CONFIG, "LMS", "Cubic")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * euler.init_noise_sigma
    euler.set_timesteps(4)
    for t in euler.timesteps:
        x = euler.step(torch.zeros_like(x), t, x).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name, owner", [
    ("Euler", "built-in sampler 'Euler'"), ("k_euler", "built-in sampler 'Euler'"),
    ("euler   A", "built-in sampler 'Euler a'"), ("Mine", "sampler 'Mine' of the extension 'first'"),
])
def test_a_taken_sampler_name_is_refused_with_a_reason(name, owner):
    gate = Gate()
    reg = registry(gate, samplers_=[("first", NamedEntry(name="Mine", factory=trailing_euler)),
                                    ("second", NamedEntry(name=name, factory=trailing_euler))])
    assert reg.sampler_names()[-1] == "Mine" and len(reg.sampler_names()) == len(samplers.SAMPLERS) + 1
    assert [p[0] for p in gate.problems] == ["second"]
    assert owner in gate.problems[0][1] and "rename it" in gate.problems[0][1]
    assert reg.refused and "second" in reg.refused[0]
    assert reg.samplers.get(name) is None or reg.samplers[name].extension != "second"


def test_bad_entries_and_schedule_names_are_refused():
    gate = Gate()
    reg = registry(gate, samplers_=[("x", NamedEntry(name=" padded", factory=trailing_euler)),
                                    ("x", NamedEntry(name="ok", factory="not callable")),
                                    ("x", object())],
                   schedules_=[("y", NamedEntry(name="karras", factory=cubic)),
                               ("y", NamedEntry(name="a:b", factory=cubic))])
    assert reg.sampler_names() == samplers.sampler_names() and reg.schedule_names() == samplers.schedule_names()
    messages = [m for _, m in gate.problems]
    assert len(messages) == 5  # schedule types are checked first
    assert "built-in schedule type 'Karras'" in messages[0] and "without ':'" in messages[1]
    assert "' padded'" in messages[2] and "not callable" in messages[3] and "entry None" in messages[4]
    assert gate.inactive == set()  # a refused name does not disable the extension


def test_a_broken_factory_is_isolated():
    def broken(config):
        raise RuntimeError("boom")

    gate = Gate()
    reg = registry(gate, samplers_=[("bad", NamedEntry(name="Broken", factory=broken)),
                                    ("bad", NamedEntry(name="Later", factory=trailing_euler)),
                                    ("good", NamedEntry(name="Fine", factory=trailing_euler))],
                   schedules_=[("worse", NamedEntry(name="Short", factory=lambda n, lo, hi: [hi]))])
    assert gate.inactive == {"bad", "worse"}  # probed at start-up: the extensions are disabled
    assert "Broken" not in reg.samplers and "Later" not in reg.samplers and "Short" not in reg.schedules
    assert "Fine" in reg.sampler_names() and any("boom" in r for r in reg.refused)
    assert any("1 sigmas for 4 steps" in r for r in reg.refused)


def test_a_factory_failing_in_a_job_fails_that_job_and_disables_its_extension():
    calls = []

    def flaky(config):
        calls.append(config.get("prediction_type"))
        if len(calls) > 1:
            return "not a scheduler"
        return diffusers.EulerDiscreteScheduler.from_config(config)

    gate = Gate()
    reg = registry(gate, samplers_=[("flaky", NamedEntry(name="Flaky", factory=flaky))])
    assert "Flaky" in reg.sampler_names()
    with pytest.raises(RequestError, match="sampler 'Flaky' from extension 'flaky' failed.*not a diffusers scheduler"):
        reg.make_scheduler(SD15_SCHEDULER_CONFIG, "Flaky")
    assert "Flaky" not in reg.sampler_names() and "Flaky" not in {e["name"] for e in reg.describe_samplers()}
    with pytest.raises(RequestError, match="comes from the extension 'flaky', which is disabled or failed"):
        reg.resolve("Flaky")
    assert reg.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler").config.timestep_spacing == "linspace"  # others work


def test_direct_calls_turn_failures_into_request_errors():
    def bad_later(n, sigma_min, sigma_max):  # fine for the start-up probe (4 steps), wrong afterwards
        return [sigma_max] * n if n == 4 else []

    reg = build_registry([], [("s", NamedEntry(name="Bad Later", factory=bad_later))], samplers.DirectCalls())
    sched = reg.make_scheduler(SD15_SCHEDULER_CONFIG, "Euler", "Bad Later")
    with pytest.raises(RequestError, match="schedule type 'Bad Later' from extension 's' failed.*0 sigmas for 5"):
        sched.set_timesteps(5)
