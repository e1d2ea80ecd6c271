"""/rollout/generate against the references (CPU, fp32), through the real `refit serve`:

* the transition math: SGLang 0.5.23's own FlowRolloutController (from its wheel, installed by scripts/setup),
  fed refit's per-step samples and model outputs and a CPU generator seeded as refit seeds it, reproduces refit's
  next latents, means, noise std-devs, drawn noises and log-probabilities (<= 1e-5), for sde, cps and ode, with and
  without guidance, with a subset of stochastic steps;
* re-scoring: Diffusers' Flux2Transformer2DModel and text encoder on the checkpoint refit serves recompute the model
  outputs of refit's returned trajectory, and the controller turns them into the same log-probabilities (<= 1e-4):
  the policy ratio of an unchanged policy is 1;
* rollout=false and ode steps reproduce the plain image bit for bit.
"""
import base64
import io
import os
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from harness import REFIT, run, start_server  # noqa: E402

SITE = os.environ.get("SGLANG_SITE", str(Path(__file__).resolve().parents[2] / ".deps-py" / "sglang"))
sys.path.insert(0, SITE)
from sglang.multimodal_gen.runtime.post_training.flow_rollout_controller import FlowRolloutController  # noqa: E402

PROMPT = "a red fox in the snow"
TAPS = (1, 2, 3)  # the tiny preset's text-encoder taps
SIZE = 32          # 2x2 latent tokens per image


def decode(obj):
    """SGLang's client-side decoding: tensor maps back to tensors, recursively."""
    if isinstance(obj, dict):
        if obj.get("__tensor__"):
            t = load(obj["data"])["t"]
            assert list(t.shape) == obj["shape"] and str(t.dtype) == obj["dtype"], obj
            return t
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def rollout(server, **fields):
    body = {"prompt": PROMPT, "seed": 7, "width": SIZE, "height": SIZE, "num_inference_steps": 4, "rollout_return_dit_trajectory": True,
            **fields}
    r = server.post("/rollout/generate", body)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/msgpack"
    return decode(msgpack.unpackb(r.content, raw=False))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-ckpt")
    run(REFIT, "make-model", "--preset", "flux2-klein-tiny", "--seed", 1, "--out", root / "distilled")
    run(REFIT, "make-model", "--preset", "flux2-klein-tiny", "--seed", 2, "--base", "--out", root / "base")
    return {"distilled": root / "distilled", "base": root / "base"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory, models):
    s = {k: start_server(tmp_path_factory, p) for k, p in models.items()}
    yield s
    for v in s.values():
        v.kill()


def controller(sample, sde_type, noise_level, no_const, sde_steps, seed, initial_shape):
    """SGLang's controller with a CPU generator that has drawn the sample's initial noise, as refit's has."""
    gen = torch.Generator().manual_seed(seed)
    initial = torch.randn(initial_shape, generator=gen, dtype=torch.float32)
    s = sample["sigmas"] if "sigmas" in sample else None
    ctl = FlowRolloutController(sde_type=sde_type, noise_level=noise_level, log_prob_no_const=no_const, debug_mode=True,
                                sde_step_indices=sde_steps, generator=gen, return_dit_trajectory=False, return_step_indices=None,
                                shard_for_sp=lambda batch, t: t, gather_for_sp=lambda batch, t: t, sigmas=s,
                                latents_shape=tuple([1, *sample["latents"].shape[1:]]))
    return ctl, initial


def replay(sample_out, sde_type, noise_level, no_const, sde_steps, seed, model_outputs=None):
    """Runs SGLang's transition over refit's trajectory; returns (next latents per step, log-probs, debug tensors)."""
    traj = sample_out["dit_trajectory"]
    latents, timesteps, sigmas = traj["latents"], traj["timesteps"], traj["sigmas"]
    outputs = model_outputs if model_outputs is not None else sample_out["rollout_debug_tensors"]["rollout_model_outputs"]
    seq, channels = latents.shape[1:]
    side = int(round(seq ** 0.5))
    ctl, initial = controller({"latents": latents, "sigmas": sigmas}, sde_type, noise_level, no_const, sde_steps, seed, (1, channels, side, side))
    # refit's first latents are this initial noise, packed.
    assert torch.equal(initial.reshape(1, channels, seq).permute(0, 2, 1)[0], latents[0])
    nexts = []
    for k in range(len(sigmas) - 1):
        dt = sigmas[k + 1] - sigmas[k]
        prev = ctl.transition(batch=None, model_output=outputs[k][None], sample=latents[k][None].float(), current_sigma=sigmas[k],
                              next_sigma=sigmas[k + 1], dt=dt, generator=None, step_index=k, timestep=timesteps[k])
        nexts.append(prev[0])
    return torch.stack(nexts), ctl.collect_rollout_log_probs()[0], ctl.collect_rollout_debug_tensors(None)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


CASES = [("sde", 0.7, False, None), ("cps", 0.7, False, [0, 1, 2]), ("sde", 0.7, True, [1, 3]), ("ode", 0.7, True, None),
         ("cps", 0.5, True, None), ("sde", 0.9, False, [0, 2])]


@pytest.mark.parametrize("kind", ["distilled", "base"])
@pytest.mark.parametrize("sde_type,noise,no_const,steps", CASES)
def test_transitions_and_log_probs_equal_sglangs_controller(servers, kind, sde_type, noise, no_const, steps):
    extra = {"guidance_scale": 3.5, "negative_prompt": "blurry"} if kind == "base" else {}
    out = rollout(servers[kind], rollout_sde_type=sde_type, rollout_noise_level=noise, rollout_log_prob_no_const=no_const,
                  rollout_sde_step_indices=steps, **extra)
    assert len(out) == 1
    s = out[0]
    assert s["seed"] == 7 and s["prompt"] == PROMPT and s["weight_version"] == "0"
    lat = s["dit_trajectory"]["latents"]
    T = len(s["dit_trajectory"]["sigmas"]) - 1
    assert lat.shape[0] == T + 1 and s["rollout_log_probs"].shape == (T,)
    nexts, log_probs, dbg = replay(s, sde_type, noise, no_const, steps, 7)
    assert max_err(nexts, lat[1:]) <= 1e-5
    assert max_err(log_probs, s["rollout_log_probs"]) <= 1e-5, (log_probs, s["rollout_log_probs"])
    d = s["rollout_debug_tensors"]
    assert torch.equal(dbg.rollout_variance_noises[0].float(), d["rollout_variance_noises"].float())
    assert max_err(dbg.rollout_prev_sample_means[0], d["rollout_prev_sample_means"]) <= 1e-5
    assert max_err(dbg.rollout_noise_std_devs[0], d["rollout_noise_std_devs"]) <= 1e-6
    stochastic = [k for k in range(T) if sde_type != "ode" and (steps is None or k in steps)]
    for k in range(T):  # ODE steps draw nothing and score 0; CPS's last step has std sigma' * ... = 0
        last_cps = sde_type == "cps" and k == T - 1
        assert (d["rollout_noise_std_devs"][k].item() > 0) == (k in stochastic and not last_cps), (k, d["rollout_noise_std_devs"])
        if k not in stochastic:
            assert s["rollout_log_probs"][k].item() == 0.0


def test_rescoring_with_diffusers_gives_the_same_log_probs(servers, models):
    from diffusers import Flux2KleinPipeline
    s = rollout(servers["base"], guidance_scale=3.5, negative_prompt="blurry", rollout_sde_type="sde", rollout_return_denoising_env=True)[0]
    pipe = Flux2KleinPipeline.from_pretrained(str(models["base"]), torch_dtype=torch.float32)
    with torch.no_grad():
        pos, txt_ids = pipe.encode_prompt(prompt=[PROMPT], device="cpu", text_encoder_out_layers=TAPS)
        neg, _ = pipe.encode_prompt(prompt=["blurry"], device="cpu", text_encoder_out_layers=TAPS)
        env = s["denoising_env"]
        assert max_err(env["pos_cond_kwargs"]["encoder_hidden_states"], pos[0]) <= 1e-5
        assert max_err(env["neg_cond_kwargs"]["encoder_hidden_states"], neg[0]) <= 1e-5
        traj = s["dit_trajectory"]
        seq, channels = traj["latents"].shape[1:]
        side = int(round(seq ** 0.5))
        img_ids = pipe._prepare_latent_ids(torch.zeros(1, channels, side, side))
        outputs = []
        for k in range(len(traj["sigmas"]) - 1):
            x = traj["latents"][k][None]
            t = traj["timesteps"][k].expand(1) / 1000
            cond = pipe.transformer(hidden_states=x, timestep=t, guidance=None, encoder_hidden_states=pos, txt_ids=txt_ids,
                                    img_ids=img_ids, return_dict=False)[0]
            uncond = pipe.transformer(hidden_states=x, timestep=t, guidance=None, encoder_hidden_states=neg, txt_ids=txt_ids,
                                      img_ids=img_ids, return_dict=False)[0]
            outputs.append((uncond + 3.5 * (cond - uncond))[0])
    outputs = torch.stack(outputs)
    assert max_err(outputs, s["rollout_debug_tensors"]["rollout_model_outputs"]) <= 1e-4
    _, log_probs, _ = replay(s, "sde", 0.7, False, None, 7, model_outputs=outputs)
    assert max_err(log_probs, s["rollout_log_probs"]) <= 1e-4, (log_probs, s["rollout_log_probs"])
    ratio = torch.exp(log_probs.sum() - s["rollout_log_probs"].sum()).item()
    assert abs(ratio - 1) <= 1e-3, ratio


def png_pixels(server, seed):
    r = server.post("/v1/images/generations", {"prompt": PROMPT, "seed": seed, "size": f"{SIZE}x{SIZE}", "num_inference_steps": 4})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))


def to_pixels(image):  # [3, H, W] in [0, 1] -> what the PNG holds
    return (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("fields", [{"rollout": False}, {"rollout_sde_type": "ode", "rollout_log_prob_no_const": True}])
def test_plain_and_ode_rollouts_are_the_plain_image_bit_for_bit(servers, fields):
    s = rollout(servers["distilled"], **fields)[0]
    assert np.array_equal(to_pixels(s["generated_output"]), png_pixels(servers["distilled"], 7))
    if fields.get("rollout") is False:
        assert s["rollout_log_probs"] is None and s["rollout_debug_tensors"] is None and s["dit_trajectory"] is None
    else:
        assert torch.count_nonzero(s["rollout_log_probs"]) == 0
