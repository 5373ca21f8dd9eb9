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
