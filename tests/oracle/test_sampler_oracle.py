"""refit's flow-match schedule against diffusers (bit-exact float32 sigmas and timesteps)."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

PROBE = os.environ.get("REFIT_PROBE_SAMPLER", "probe_sampler")

KLEIN = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
         "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential", "shift_terminal": None,
         "invert_sigmas": False, "stochastic_sampling": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
         "use_beta_sigmas": False}


def refit_schedule(tmp_path, config, steps, seq):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(config))
    p = subprocess.run([PROBE, str(path), str(steps), str(seq)], capture_output=True, text=True)
    return p


def diffusers_schedule(config, steps, seq):
    s = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = compute_empirical_mu(image_seq_len=seq, num_steps=steps)
    s.set_timesteps(steps, sigmas=sigmas, mu=mu)
    return s, mu


@pytest.mark.parametrize("config", [KLEIN, {**KLEIN, "time_shift_type": "linear"},
                                    {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
                                    {}], ids=["klein", "linear", "static_shift", "defaults"])
@pytest.mark.parametrize("steps,seq", [(4, 4096), (4, 1024), (1, 256), (50, 4096), (28, 5000), (2, 16)])
def test_sigmas_and_timesteps_bit_exact(tmp_path, config, steps, seq):
    p = refit_schedule(tmp_path, config, steps, seq)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    want, mu = diffusers_schedule(config, steps, seq)
    assert got["mu"] == mu
    assert torch.equal(torch.tensor(got["sigmas"], dtype=torch.float32), want.sigmas)
    assert torch.equal(torch.tensor(got["timesteps"], dtype=torch.float32), want.timesteps)


def test_klein_1024_four_steps_matches_the_published_schedule(tmp_path):
    got = json.loads(refit_schedule(tmp_path, KLEIN, 4, 4096).stdout)
    assert np.allclose(got["sigmas"], [1.0, 0.96738, 0.90814, 0.76720, 0.0], atol=1e-5)


def test_unsupported_scheduler_options_are_refused_by_name(tmp_path):
    p = refit_schedule(tmp_path, {**KLEIN, "use_karras_sigmas": True}, 4, 1024)
    assert p.returncode == 1 and "'use_karras_sigmas' is not supported" in p.stderr
    p = refit_schedule(tmp_path, {**KLEIN, "shift_terminal": 0.1}, 4, 1024)
    assert p.returncode == 1 and "'shift_terminal' is not supported" in p.stderr
