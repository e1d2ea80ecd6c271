"""POST /rollout/generate over HTTP, decoded as a trainer decodes it (msgpack + safetensors): what each flag
returns, SGLang's error wording for fields refit refuses, and rollouts concurrent with weight updates (each
response names the weights every one of its steps used: a rollout never spans a commit)."""
import threading

import msgpack
import pytest
import torch
from safetensors.torch import load

from harness import MODULES


def decode(obj):
    if isinstance(obj, dict):
        if obj.get("__tensor__"):
            return load(obj["data"])["t"]
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def post(server, **fields):
    body = {"prompt": "a red fox", "seed": 3, "width": 32, "height": 32, "num_inference_steps": 3, **fields}
    r = server.post("/rollout/generate", body)
    assert r.status_code == 200, r.text
    return [decode(s) for s in msgpack.unpackb(r.content, raw=False)]


def test_every_sample_carries_what_the_flags_ask_for(server, ckpt):
    server.update(ckpt.base, weight_version="rollout-base")
    out = post(server, num_outputs_per_prompt=2, rollout_debug_mode=False)
    assert len(out) == 2
    keys = ["request_id", "prompt", "seed", "generated_output", "rollout_log_probs", "rollout_debug_tensors", "denoising_env",
            "dit_trajectory", "inference_time_s", "peak_memory_mb", "weight_version"]
    for s in out:
        assert list(s) == keys
        assert s["weight_version"] == "rollout-base" and s["seed"] == 3 and s["prompt"] == "a red fox"
        assert s["generated_output"].shape == (3, 32, 32) and s["generated_output"].dtype == torch.float32
        assert s["rollout_log_probs"].shape == (3,) and s["rollout_debug_tensors"] is None and s["denoising_env"] is None
        assert s["dit_trajectory"] is None and s["inference_time_s"] > 0
    assert out[0]["request_id"] == out[1]["request_id"]
    assert not torch.equal(out[0]["generated_output"], out[1]["generated_output"])  # seed + 0, seed + 1
    full = post(server, rollout_return_dit_trajectory=True, rollout_return_denoising_env=True, rollout_return_step_indices=[0, 3])[0]
    assert set(full["rollout_debug_tensors"]) == {"rollout_variance_noises", "rollout_prev_sample_means", "rollout_noise_std_devs",
                                                  "rollout_model_outputs"}
    assert full["rollout_debug_tensors"]["rollout_noise_std_devs"].shape == (3, 1)
    traj = full["dit_trajectory"]
    assert traj["latents"].shape[0] == 2 and traj["timesteps"].tolist()[1] == 0.0 and traj["sigmas"].shape == (4,)
    env = full["denoising_env"]
    assert env["image_kwargs"] is None and env["neg_cond_kwargs"] is None and env["guidance"] is None
    assert env["pos_cond_kwargs"]["encoder_hidden_states"].dim() == 2 and len(env["pos_cond_kwargs"]["freqs_cis"]) == 2
    again = post(server)[0]  # deterministic per seed
    assert torch.equal(again["rollout_log_probs"], full["rollout_log_probs"])


BAD = {
    "video": ({"num_frames": 16}, "field 'num_frames' is not supported"),
    "editing": ({"image_path": ["/tmp/x.png"]}, "field 'image_path' is not supported"),
    "cuda_generator": ({"generator_device": "cuda"}, "field 'generator_device'"),
    "extras": ({"extra_sampling_params": {"num_inference_steps": 8}}, "field 'extra_sampling_params' is not supported"),
    "sde_type": ({"rollout_sde_type": "euler"}, "rollout_sde_type must be one of ('sde', 'cps', 'ode'), got 'euler'"),
    "noise_zero": ({"rollout_noise_level": 0}, "True log-probability computation requires a non-zero noise level."),
    "ode_log_prob": ({"rollout_sde_type": "ode"}, "p_ode is always 0"),
    "indices": ({"rollout_sde_step_indices": [0, -1]}, "field 'rollout_sde_step_indices'"),
    "unknown": ({"rollout_steps": 2}, "unknown field(s) 'rollout_steps'"),
    "no_prompt": ({"prompt": ""}, "prompt is required"),
    "group_too_large": ({"num_outputs_per_prompt": 65}, "field 'num_outputs_per_prompt' must be an integer between 1 and 64"),
    "batch_pixels": ({"num_outputs_per_prompt": 24, "width": 1024, "height": 1024},
                     "must be at most 16777216 pixels per request (a batch of 64 at 512x512, 16 at 1024x1024), got 24 x 1024x1024"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_fields_refit_cannot_honour_are_refused_with_sglangs_error_shape(server, case):
    fields, message = BAD[case]
    r = server.post("/rollout/generate", {"prompt": "a red fox", "seed": 1, **fields})
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"], r.text


def test_a_flow_grpo_sized_group_is_one_request(server):
    out = post(server, num_outputs_per_prompt=24, num_inference_steps=2)
    assert len(out) == 24 and [s["seed"] for s in out] == [3] * 24
    images = [s["generated_output"] for s in out]
    assert all(not torch.equal(images[0], x) for x in images[1:])  # seed + i: every sample its own noise


def test_rollouts_during_updates_name_the_weights_of_all_their_steps(server, ckpt):
    reference = {}
    for version, path in (("A", ckpt.base), ("B", ckpt.second)):
        server.update(path, weight_version=version)
        reference[version] = post(server)[0]["generated_output"]
    assert not torch.equal(reference["A"], reference["B"])
    seen, errors = [], []

    def roll():
        try:
            for _ in range(6):
                seen.append(post(server)[0])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=roll) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(6):
        version, path = ("A", ckpt.base) if i % 2 == 0 else ("B", ckpt.second)
        server.update(path, weight_version=version)
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(seen) == 12
    for s in seen:  # every step of a response used the weights it names (a mix would give another image)
        assert torch.equal(s["generated_output"], reference[s["weight_version"]]), s["weight_version"]
    server.update(ckpt.base, weight_version="after-rollouts")
    assert set(server.checksums()) == set(MODULES)
