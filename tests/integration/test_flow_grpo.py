"""The Flow-GRPO example (examples/flow_grpo) end to end on the tiny preset: the real `refit serve` started by the
trainer, 3 iterations of rollout -> reward -> clipped policy-gradient steps -> push, through every transport that runs
on a CPU (disk, torch.distributed over Gloo, shared tensors with release/resume, LoRA merge over each, set_lora).

Every iteration must show: the first inner step's policy ratio is 1 (refit's log-probs = the trainer's differentiable
recomputation, <= 1e-3), every rollout carries the weight_version pushed last, refit's /get_weights_checksum equals
the trainer's weights (base + LoRA merged for LoRA), loss and gradient norm are finite and the weights changed. Where
the pushed weights are on disk, an oracle independent of the trainer agrees: `refit checksum` of the pushed folder,
PEFT's merge_and_unload of the pushed adapter. And each check fails, naming what differs, when refit and the trainer
really disagree.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the Gloo group advertises loopback, whatever the host name

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "flow_grpo"))
import train  # noqa: E402
import weight_push  # noqa: E402
from policy import sglang_checksum  # noqa: E402

REFIT = os.environ.get("REFIT_BIN", str(REPO / "build" / "apps" / "refit"))
ITERATIONS = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow-grpo-ckpt") / "tiny"
    subprocess.run([REFIT, "make-model", "--preset", "flux2-klein-tiny", "--seed", "1", "--out", str(out),
                    "--threads", "1"], check=True, capture_output=True)
    return out


def args_for(checkpoint, work_dir, mode, transport, *extra):
    """Small enough for a few seconds per iteration on one core: 2 prompts x 4 samples, 32x32, 2 steps of which the
    first is stochastic (the second, an ODE step, scores 0 and is not trained)."""
    return train.parse_args(["--model", str(checkpoint), "--refit-bin", REFIT, "--work-dir", str(work_dir),
                             "--mode", mode, "--transport", transport, "--iterations", str(ITERATIONS),
                             "--prompts-per-iteration", "2", "--group-size", "4", "--size", "32", "--steps", "2", "--sde-steps", "1",
                             "--inner-steps", "2", "--threads", "1", "--device", "cpu", "--seed", "3", "--no-plots",
                             *extra])


def assert_every_iteration_checked(history, colocated=False):
    assert [h["iteration"] for h in history] == list(range(1, ITERATIONS + 1))
    checksums = []
    for h in history:
        it = h["iteration"]
        assert h["rollout_versions"] == [str(it - 1)], h
        assert h["weight_version"] == str(it)
        assert h["ratio_max_err"] <= 1e-3, h
        assert h["served_checksum"] == h["trainer_checksum"], h
        assert math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0, h
        assert math.isfinite(h["reward_mean"]) and h["reward_std"] > 0, h
        assert ("release_s" in h and "resume_s" in h) == colocated, h
        checksums.append(h["served_checksum"])
    assert len(set(checksums)) == ITERATIONS, "every push must change the served weights"


def peft_merged_checksum(checkpoint, adapter):
    from diffusers import Flux2Transformer2DModel
    from peft import PeftModel

    base = Flux2Transformer2DModel.from_pretrained(str(checkpoint / "transformer"), torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    return sglang_checksum(list(merged.named_parameters()))


def test_full_weights_over_disk_with_plots(checkpoint, tmp_path):
    args = args_for(checkpoint, tmp_path, "full", "disk")
    args.no_plots = False
    history = train.run(args)
    assert_every_iteration_checked(history)
    # refit's own reading of the last folder the trainer wrote agrees with what it serves.
    last = tmp_path / "pushed" / f"step-{ITERATIONS}"
    out = subprocess.run([REFIT, "checksum", str(last), "--module", "transformer", "--dtype", "fp32", "--json"],
                         check=True, capture_output=True, text=True).stdout
    assert f'"{history[-1]["served_checksum"]}"' in out, out
    for name in ("reward_curve.png", "samples.png"):
        assert (tmp_path / "results" / name).read_bytes()[:8] == PNG_MAGIC, name
    assert (tmp_path / "results" / "history.json").stat().st_size > 0


@pytest.mark.parametrize("transport", ["disk", "set_lora"])
def test_lora_merged_from_an_adapter_folder_equals_pefts_merge(checkpoint, tmp_path, transport):
    history = train.run(args_for(checkpoint, tmp_path, "lora", transport))
    assert_every_iteration_checked(history)
    adapter = tmp_path / "pushed" / f"step-{ITERATIONS}"
    assert (adapter / "adapter_config.json").exists()
    assert peft_merged_checksum(checkpoint, adapter) == history[-1]["served_checksum"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_distributed_over_gloo(checkpoint, tmp_path, mode):
    # --ode-baseline: the plain samples of the same seeds (rollout=false) must carry the pushed weight_version too.
    assert_every_iteration_checked(train.run(args_for(checkpoint, tmp_path, mode, "distributed", "--ode-baseline")))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_colocated_shared_tensors_release_and_resume_around_training(checkpoint, tmp_path, mode):
    history = train.run(args_for(checkpoint, tmp_path, mode, "tensor"))
    assert_every_iteration_checked(history, colocated=True)


# ---------------------------------------------------------------------------------------------------------------------
# The checks catch real disagreements.


def test_a_log_prob_that_is_not_the_trainers_fails_the_ratio_check(checkpoint, tmp_path, monkeypatch):
    real = train.rollout_iteration

    def skewed(*a, **kw):
        samples = real(*a, **kw)
        samples[5]["log_probs"] = samples[5]["log_probs"] + 0.01  # as if refit sampled another policy
        return samples

    monkeypatch.setattr(train, "rollout_iteration", skewed)
    with pytest.raises(train.CheckError,
                       match=r"iteration 1: policy ratio 0\.99\d+ at sample 5 step \d before any update"):
        train.run(args_for(checkpoint, tmp_path, "full", "disk"))


def test_a_rollout_of_other_weights_fails_the_version_check(checkpoint, tmp_path, monkeypatch):
    real = train.RefitClient.rollout

    def stale(self, *a, **kw):
        samples = real(self, *a, **kw)
        samples[-1]["weight_version"] = "stale"
        return samples

    monkeypatch.setattr(train.RefitClient, "rollout", stale)
    with pytest.raises(train.CheckError, match=r"iteration 1: rollout 3 of .* carries weight_version 'stale', but the "
                                               r"trainer pushed '0' last"):
        train.run(args_for(checkpoint, tmp_path, "full", "disk"))


def test_weights_changed_behind_the_trainers_back_fail_the_checksum_check(checkpoint, tmp_path, monkeypatch):
    real = weight_push.DiskPush.push

    def overwritten(self, policy, version):
        reply = real(self, policy, version)
        if version == "2":  # someone else loads the original transformer under the same version
            self.client.update_from_disk(checkpoint, version)
        return reply

    monkeypatch.setattr(weight_push.DiskPush, "push", overwritten)
    with pytest.raises(train.CheckError, match=r"after pushing weight_version '2': refit's transformer checksum "
                                               r"[0-9a-f]{64} differs from the trainer's [0-9a-f]{64} \(full weights"):
        train.run(args_for(checkpoint, tmp_path, "full", "disk"))
