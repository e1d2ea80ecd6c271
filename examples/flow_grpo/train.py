#!/usr/bin/env python3
"""Flow-GRPO with refit as the rollout engine: the reward goes up, and refit serves every new policy transactionally.

The trainer holds the policy as Diffusers' Flux2Transformer2DModel (full weights, or frozen with a PEFT LoRA), starts
`refit serve` (or attaches to one with --url) and, per iteration K = 1, 2, ...:

  1. rollout: POST /rollout/generate, a group of --group-size samples per prompt, SDE steps with their log-probs and
     the trajectory (the prompt embeddings come from refit's denoising_env, once per prompt);
  2. score:   a reward per image (JPEG compressibility as in DDPO, or a colour target) and group-relative advantages;
  3. train:   recompute the log-probs of the returned trajectories under the trainer's policy (differentiable) and take
              --inner-steps clipped policy-gradient steps (for a colocated run, refit's memory is released meanwhile);
  4. push:    send the new weights to refit (disk, set_lora, distributed or tensor), tagged weight_version = K.

Checked every iteration (an error stops the run, naming what differed): the first inner step's policy ratio is 1
(refit's log-probs equal the trainer's), every rollout carries the weight_version pushed last, and refit's
/get_weights_checksum equals the trainer's weights (for LoRA: base + scaling * B @ A). Writes reward_curve.png,
samples.png (first and last iteration) and history.json to --out.

  python3 examples/flow_grpo/train.py                               # CPU, tiny random model, 64x64, JPEG reward
  python3 examples/flow_grpo/train.py --device cuda --model /tmp/flux2-klein-4b --size 512 --mode lora
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parents[1]

import torch  # noqa: E402

from policy import Policy  # noqa: E402
from refit_client import RefitClient, RefitError, RefitServer, default_work_dir  # noqa: E402
from rewards import REWARDS, make_reward, to_uint8  # noqa: E402
from weight_push import TRANSPORTS, make_transport  # noqa: E402

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a bowl of ripe cherries", "an astronaut riding a horse",
           "a quiet forest lake", "a city street in the rain", "a plate of sushi", "a snowy mountain cabin"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SERVED_DTYPE_NAMES = {"float": "fp32", "float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16",
                      "half": "fp16", "float16": "fp16", "fp16": "fp16"}


class CheckError(RuntimeError):
    """refit and the trainer disagree: a log-prob, a weight_version or a checksum."""


def check_failed(args, message: str):
    """Raises, or with --check-failures report prints the failure and keeps it for the exit status."""
    if args.check_failures == "raise":
        raise CheckError(message)
    print(f"flow-grpo: CHECK FAILED: {message}", file=sys.stderr, flush=True)
    args.failures.append(message)


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts


class PromptCache:
    """Prompt embeddings from refit's denoising_env, asked for the first time a prompt is rolled out (the text encoder
    is frozen, so they never change)."""

    def __init__(self, device):
        self.device, self.embeds = device, {}

    def needs(self, prompt: str) -> bool:
        return prompt not in self.embeds

    def add(self, prompt: str, sample: dict):
        env = sample.get("denoising_env") or {}
        if env.get("neg_cond_kwargs") is not None:
            raise CheckError("refit ran classifier-free guidance (a base checkpoint); this trainer handles distilled "
                             "FLUX.2-klein checkpoints only")
        self.embeds[prompt] = env["pos_cond_kwargs"]["encoder_hidden_states"].to(self.device)


def rollout_iteration(client, prompts, args, iteration, cache, expected_version):
    """All groups of one iteration; returns the samples (dicts) in order, each with its prompt index."""
    samples = []
    for p, prompt in enumerate(prompts):
        seed = args.seed * 1_000_003 + iteration * 10_007 + p * args.group_size
        group = client.rollout(prompt, seed, args.group_size, args.width, args.height, args.steps, args.noise_level,
                               args.sde_step_indices, return_env=cache.needs(prompt))
        if cache.needs(prompt):
            cache.add(prompt, group[0])
        baselines = (client.plain_samples(prompt, seed, args.group_size, args.width, args.height, args.steps)
                     if args.ode_baseline else [None] * len(group))
        for i, (s, b) in enumerate(zip(group, baselines)):
            for what, x in (("rollout", s), ("ODE baseline sample", b)):
                if x is not None and x.get("weight_version") != expected_version:
                    check_failed(args, f"iteration {iteration}: {what} {i} of {prompt!r} carries weight_version "
                                       f"{x.get('weight_version')!r}, but the trainer pushed {expected_version!r} last")
            if s.get("dit_trajectory") is None or s.get("rollout_log_probs") is None:
                raise CheckError(f"iteration {iteration}: rollout {i} of {prompt!r} has no trajectory or log-probs")
            samples.append({"prompt": prompt, "prompt_index": p, "weight_version": s["weight_version"],
                            "image": s["generated_output"],
                            "latents": s["dit_trajectory"]["latents"], "sigmas": s["dit_trajectory"]["sigmas"],
                            "timesteps": s["dit_trajectory"]["timesteps"], "log_probs": s["rollout_log_probs"],
                            "baseline_image": b["generated_output"] if b is not None else None})
    return samples


def group_advantages(rewards: torch.Tensor, groups: int, clip: float) -> torch.Tensor:
    """GRPO's advantages: (r - mean of its group) / (std of its group + 1e-4), clipped to ±clip."""
    r = rewards.view(groups, -1)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True, unbiased=False) + 1e-4)
    return adv.clamp(-clip, clip).view(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def token_grid(seq: int, width: int, height: int) -> tuple[int, int]:
    h = round(math.sqrt(seq * height / width))
    if h * (seq // h) != seq:
        raise CheckError(f"cannot lay {seq} latent tokens out as a {width}x{height} image")
    return h, seq // h


def make_batches(samples, cache, policy, args):
    """The iteration's trajectories on the trainer's device, in micro-batches."""
    from diffusers import Flux2KleinPipeline

    dev = policy.device
    sigmas, timesteps = samples[0]["sigmas"], samples[0]["timesteps"]
    for s in samples:
        if not (torch.equal(s["sigmas"], sigmas) and torch.equal(s["timesteps"], timesteps)):
            raise CheckError("the rollouts of one iteration ran on different sigma schedules")
    latents = torch.stack([s["latents"] for s in samples])  # [N, T+1, seq, C]
    seq, channels = latents.shape[2:]
    h, w = token_grid(seq, args.width, args.height)
    img_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, channels, h, w))[0].to(dev)
    batches = []
    for start in range(0, len(samples), args.micro_batch):
        part = samples[start:start + args.micro_batch]
        embeds = torch.stack([cache.embeds[s["prompt"]] for s in part])
        batches.append({"index": torch.arange(start, start + len(part)),
                        "latents": latents[start:start + len(part)].to(dev),
                        "sigmas": sigmas.to(dev), "timesteps": timesteps.to(dev), "prompt_embeds": embeds,
                        "txt_ids": Flux2KleinPipeline._prepare_text_ids(embeds).to(dev),
                        "img_ids": img_ids.expand(len(part), -1, -1)})
    return batches


def train_iteration(policy, optimizer, batches, old_log_probs, advantages, args, iteration):
    """--inner-steps clipped policy-gradient steps over every (sample, SDE step); returns the statistics. The first
    inner step runs on the weights that made the rollouts, so its ratios must all be 1."""
    steps = args.sde_step_indices if args.sde_step_indices is not None else list(range(old_log_probs.shape[1]))
    old_log_probs = old_log_probs[:, steps]  # ODE steps draw nothing and score 0: nothing to train there
    N, T = old_log_probs.shape
    old, adv = old_log_probs.to(policy.device), advantages.to(policy.device)
    stats = {}
    for inner in range(args.inner_steps):
        optimizer.zero_grad(set_to_none=True)
        new = torch.zeros(N, T, device=policy.device)
        loss_total = 0.0
        for batch in batches:
            idx = batch["index"].to(policy.device)
            for k in range(T):
                lp = policy.step_log_prob(batch, steps[k], args.noise_level)
                ratio = torch.exp(lp - old[idx, k])
                a = adv[idx]
                clipped = ratio.clamp(1 - args.clip_range, 1 + args.clip_range)
                loss = torch.maximum(-a * ratio, -a * clipped).sum() / (N * T)
                loss.backward()
                loss_total += loss.item()
                new[idx, k] = lp.detach()
        ratio = torch.exp(new - old)
        if inner == 0:
            err = (ratio - 1).abs()
            worst = int(err.argmax())
            stats["ratio_max_err"] = err.max().item()
            stats["log_prob_max_diff"] = (new - old).abs().max().item()
            if not stats["ratio_max_err"] <= args.ratio_tolerance:
                mine, refits = new.view(-1)[worst].item(), old.view(-1)[worst].item()
                check_failed(
                    args, f"iteration {iteration}: policy ratio {ratio.view(-1)[worst].item():.6f} at sample "
                    f"{worst // T} step {steps[worst % T]} before any update (trainer log-prob {mine:.6f}, refit's "
                    f"{refits:.6f}); |ratio - 1| must be <= {args.ratio_tolerance:g}: the trainer and refit do not "
                    "compute the same policy")
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable, args.max_grad_norm).item()
        if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            raise CheckError(f"iteration {iteration}, inner step {inner}: loss {loss_total} / grad norm {grad_norm}")
        optimizer.step()
        stats.update(loss=loss_total, grad_norm=grad_norm, approx_kl=(0.5 * (new - old) ** 2).mean().item(),
                     clip_frac=((ratio - 1).abs() > args.clip_range).float().mean().item())
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def push_and_check(client, transport, policy, version: str, args) -> dict:
    t0 = time.perf_counter()
    reply = transport.push(policy, version)
    push_s = time.perf_counter() - t0
    if reply.get("weight_version") != version:
        check_failed(args, f"push of weight_version {version!r}: refit reports weight_version "
                           f"{reply.get('weight_version')!r}")
    t0 = time.perf_counter()
    served, mine = client.checksum("transformer"), policy.checksum()
    check_s = time.perf_counter() - t0
    if served != mine:
        kind = "base + LoRA merged" if policy.mode == "lora" else "full weights"
        check_failed(args, f"after pushing weight_version {version!r}: refit's transformer checksum {served} differs "
                           f"from the trainer's {mine} ({kind}, {policy.served_dtype})")
    timings = reply.get("timings") or {}
    return {"push_s": push_s, "pause_s": float(timings.get("pause", float("nan"))), "check_s": check_s,
            "served_checksum": served, "trainer_checksum": mine}


def ensure_model(args) -> Path:
    if args.model:
        return args.model.resolve()
    folder = (args.work_dir / f"model-{args.preset}-seed{args.model_seed}").resolve()
    if not (folder / "model_index.json").exists():
        print(f"flow-grpo: writing a random-weights {args.preset} checkpoint to {folder}", flush=True)
        try:
            run = subprocess.run([args.refit_bin, "make-model", "--preset", args.preset, "--seed",
                                  str(args.model_seed), "--out", str(folder)], capture_output=True, text=True)
        except OSError as e:
            raise RefitError(f"cannot run {args.refit_bin} (pass --refit-bin): {e}") from e
        if run.returncode != 0:
            raise RefitError(f"refit make-model failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    return folder


def served_dtype_of(client) -> str:
    for m in client.model_info().get("modules", []):
        if m.get("name") == "transformer":
            name = str(m.get("dtype", "")).lower().removeprefix("torch.")
            if name in SERVED_DTYPE_NAMES:
                return SERVED_DTYPE_NAMES[name]
    raise RefitError("/get_model_info names no transformer dtype; pass --dtype")


def connect(args, device):
    """Attaches to --url (the trainer loads --model, or the checkpoint refit says it serves) or starts `refit serve` on
    the checkpoint; returns (server or None, client, checkpoint, refit's dtype name)."""
    if args.url:
        client = RefitClient(args.url, args.api_key, args.http_timeout)
        client.health()
        model = args.model.resolve() if args.model else Path(client.model_info()["model_path"]).resolve()
        return None, client, model, served_dtype_of(client) if args.dtype == "auto" else args.dtype
    model = ensure_model(args)
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    server = RefitServer(args.refit_bin, model, args.work_dir, "cuda" if device.type == "cuda" else "cpu", dtype_name,
                         args.serve_arg, threads=args.threads)
    client = RefitClient(server.url, args.api_key, args.http_timeout)
    client.health()
    return server, client, model, dtype_name


def fmt_s(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f} s"


def iteration_prompts(args, it: int) -> list[str]:
    if not args.rotate_prompts:
        return args.prompts[:args.prompts_per_iteration]
    n = args.prompts_per_iteration
    return [args.prompts[(it * n + j) % len(args.prompts)] for j in range(n)]


def one_iteration(it, args, client, policy, optimizer, transport, reward_fn, cache, colocate):
    """Rollout, score, train (refit released when colocated), push and check; returns (the record, the samples'
    images and rewards for the sample grid)."""
    row, t_iteration = {"iteration": it}, time.perf_counter()
    prompts = iteration_prompts(args, it)
    t0 = time.perf_counter()
    samples = rollout_iteration(client, prompts, args, it, cache, expected_version=str(it - 1))
    row["rollout_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rewards = reward_fn(torch.stack([s["image"] for s in samples]))
    if args.ode_baseline:  # minus the reward of the same seed's ODE sample: what the SDE steps' noise changed
        gains = rewards - reward_fn(torch.stack([s["baseline_image"] for s in samples]))
        advantages = group_advantages(gains, len(prompts), args.adv_clip)
    else:
        advantages = group_advantages(rewards, len(prompts), args.adv_clip)
    row["score_s"] = time.perf_counter() - t0
    row.update(reward_mean=rewards.mean().item(), reward_std=rewards.std(unbiased=False).item(),
               rollout_versions=sorted({s["weight_version"] for s in samples}))
    panel = {"iteration": it, "prompts": prompts,
             "images": [[to_uint8(samples[p * args.group_size + i]["image"]) for i in range(args.group_size)]
                        for p in range(len(prompts))],
             "rewards": rewards.view(len(prompts), -1).tolist()}

    if colocate:
        t0 = time.perf_counter()
        client.release_memory()
        row["release_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    old_log_probs = torch.stack([s["log_probs"] for s in samples]).float()
    batches = make_batches(samples, cache, policy, args)
    row.update(train_iteration(policy, optimizer, batches, old_log_probs, advantages, args, it))
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    row["train_s"] = time.perf_counter() - t0
    del batches, samples
    if colocate:
        t0 = time.perf_counter()
        client.resume_memory()
        row["resume_s"] = time.perf_counter() - t0

    row.update(push_and_check(client, transport, policy, str(it), args))
    row["weight_version"] = str(it)
    row["iteration_s"] = time.perf_counter() - t_iteration
    return row, panel


def log_line(row, args) -> str:
    it = row["iteration"]
    colo = f", release {fmt_s(row['release_s'])} resume {fmt_s(row['resume_s'])}" if "release_s" in row else ""
    ratio_ok = "ok" if row["ratio_max_err"] <= args.ratio_tolerance else "FAILED"
    sums_ok = "ok" if row["served_checksum"] == row["trainer_checksum"] else "FAILED"
    return (f"iter {it:3d} | reward {row['reward_mean']:+.4f} ± {row['reward_std']:.4f} | ratio-1 "
            f"{row['ratio_max_err']:.1e} {ratio_ok} | kl {row['approx_kl']:.2e} clip {row['clip_frac']:.2f} | loss "
            f"{row['loss']:+.4f} grad {row['grad_norm']:.3f} | rollout {fmt_s(row['rollout_s'])} score "
            f"{fmt_s(row['score_s'])} train {fmt_s(row['train_s'])} push {fmt_s(row['push_s'])} (pause "
            f"{fmt_s(row['pause_s'])}){colo} | v{it} checksum {sums_ok} ({fmt_s(row['check_s'])})")


def run(args) -> list[dict]:
    """The whole run; returns one record per iteration (also written to <out>/history.json)."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    server, client, model, dtype_name = connect(args, device)
    history, panels = [], {}
    try:
        served_dtype = DTYPES[dtype_name]
        if args.ratio_tolerance is None:
            args.ratio_tolerance = 1e-3 if served_dtype == torch.float32 else 1e-2
        policy = Policy(model, args.mode, device, served_dtype, args.lora_rank, args.lora_alpha, args.seed)
        if args.optimizer == "sgd":  # moves each weight by its gradient: little drift where the reward says nothing
            optimizer = torch.optim.SGD(policy.trainable, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
        else:
            optimizer = torch.optim.AdamW(policy.trainable, lr=args.lr, weight_decay=args.weight_decay)
        reward_fn = make_reward(args.reward, args.target_color)
        colocate = args.colocate if args.colocate is not None else args.transport == "tensor"
        print(f"flow-grpo: refit {client.url} serving {model} ({dtype_name}); trainer on {device}, mode {args.mode} "
              f"({sum(p.numel() for p in policy.trainable):,} trainable parameters), transport {args.transport}"
              f"{', colocated' if colocate else ''}, reward {args.reward}; {args.prompts_per_iteration} prompts x "
              f"{args.group_size} samples, {args.width}x{args.height}, {args.steps} steps", flush=True)
        transport = make_transport(args.transport, client, policy, args.work_dir, model)
        try:
            initial = push_and_check(client, transport, policy, "0", args)
            print(f"flow-grpo: pushed the initial policy as weight_version 0 in {initial['push_s']:.3f} s; refit's "
                  f"checksum {initial['served_checksum'][:16]}..., the trainer's {initial['trainer_checksum'][:16]}...",
                  flush=True)
            cache = PromptCache(device)
            for it in range(1, args.iterations + 1):
                row, panel = one_iteration(it, args, client, policy, optimizer, transport, reward_fn, cache, colocate)
                history.append(row)
                if it in (1, args.iterations):
                    panels[it] = panel
                print(log_line(row, args), flush=True)
        finally:
            transport.close()
    finally:
        if server is not None:
            server.stop()

    (args.out / "history.json").write_text(json.dumps(history, indent=1))
    if not args.no_plots:
        import plots

        title = (f"Flow-GRPO on refit: {args.reward} reward, {args.mode} weights, {args.transport} push, "
                 f"{args.prompts_per_iteration}x{args.group_size} samples/iteration")
        plots.reward_curve(history, args.out / "reward_curve.png", title)
        plots.sample_grid(panels[1], panels[args.iterations], args.out / "samples.png")
    first, last = history[0], history[-1]
    per_iter = sum(h["iteration_s"] for h in history) / len(history)
    print(f"flow-grpo: {len(history)} iterations; mean reward {first['reward_mean']:+.4f} (iteration 1) -> "
          f"{last['reward_mean']:+.4f} (iteration {last['iteration']}); {per_iter:.2f} s per iteration; "
          f"results in {args.out}", flush=True)
    return history


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default unless it is None or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = ap.add_argument_group("refit")
    g.add_argument("--url", help="attach to a running `refit serve` (default: start one on a free loopback port)")
    g.add_argument("--api-key", default=os.environ.get("REFIT_API_KEY"), help="refit's admin key, if it has one")
    g.add_argument("--refit-bin", default=os.environ.get("REFIT_BIN", str(REPO / "build" / "apps" / "refit")),
                   help="the refit binary (default: $REFIT_BIN, else build/apps/refit)")
    g.add_argument("--serve-arg", action="append", default=[], help="extra argument for `refit serve` (repeatable)")
    g.add_argument("--model", type=Path, help="checkpoint folder that refit serves and the trainer loads "
                   "(default: a random-weights --preset checkpoint written under --work-dir)")
    g.add_argument("--preset", default="flux2-klein-tiny", help="`refit make-model` preset when --model is not given")
    g.add_argument("--model-seed", type=int, default=1, help="seed of the random-weights checkpoint")
    g.add_argument("--http-timeout", type=float, default=3600.0, help="seconds per HTTP request")
    g = ap.add_argument_group("trainer")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="the trainer's device; refit runs on the same kind (default: cuda when there is one)")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="dtype refit holds the transformer in (auto: fp32 on a CPU, bf16 on a GPU; with --url: "
                        "refit's)")
    g.add_argument("--mode", choices=["lora", "full"], default=None,
                   help="train a LoRA or every weight (default: full on a CPU, lora on a GPU)")
    g.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling alpha (scaling = alpha / rank)")
    g.add_argument("--transport", choices=TRANSPORTS, default="disk", help="how new weights reach refit")
    g.add_argument("--colocate", action=argparse.BooleanOptionalAction, default=None,
                   help="release refit's memory during the training step (default: on with --transport tensor)")
    g.add_argument("--lr", type=float, default=1e-2, help="learning rate")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd: with momentum 0.9")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    g.add_argument("--inner-steps", type=int, default=4, help="optimizer steps per iteration, each over every sample")
    g.add_argument("--micro-batch", type=int, default=8, help="samples per forward/backward")
    g.add_argument("--clip-range", type=float, default=0.2, help="PPO clip of the policy ratio")
    g.add_argument("--adv-clip", type=float, default=5.0, help="advantages are clipped to ±this")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient norm clip")
    g.add_argument("--ratio-tolerance", type=float, default=None,
                   help="largest |ratio - 1| allowed before the first update (default: 1e-3 fp32, 1e-2 bf16)")
    g.add_argument("--check-failures", choices=["raise", "report"], default="raise",
                   help="raise: stop at the first failed check; report: print it, go on, exit 1 at the end "
                        "(benchmarks that must still report their timings)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the trainer's torch and of the refit it starts (default: 1 with --device cpu, "
                        "which keeps a CPU run deterministic and is fastest for the tiny model; else torch's)")
    g = ap.add_argument_group("rollouts and reward")
    g.add_argument("--reward", choices=sorted(REWARDS), default="jpeg")
    g.add_argument("--target-color", default="1,0,0", help="for --reward color: 'r,g,b' in [0, 1] or '#rrggbb'")
    g.add_argument("--iterations", type=int, default=30)
    g.add_argument("--prompts", nargs="+", default=PROMPTS, help="the prompt set (default: 8 built-in prompts)")
    g.add_argument("--prompts-per-iteration", type=int, default=2)
    g.add_argument("--rotate-prompts", action=argparse.BooleanOptionalAction, default=True,
                   help="walk through --prompts across iterations (else always the first ones)")
    g.add_argument("--group-size", type=int, default=8, help="samples per prompt (GRPO's group)")
    g.add_argument("--size", type=int, default=64, help="image width and height")
    g.add_argument("--steps", type=int, default=6, help="sampling steps")
    g.add_argument("--sde-steps", type=int, default=3,
                   help="only the first N sampling steps are stochastic (and trained), the rest ODE (0: all)")
    g.add_argument("--noise-level", type=float, default=0.7, help="SDE noise level (Flow-GRPO's eta)")
    g.add_argument("--ode-baseline", action=argparse.BooleanOptionalAction, default=False,
                   help="variance reduction: score each sample against the ODE sample of its seed (same initial "
                        "noise, rollout=false) before the group normalization, so the advantage reflects what the SDE "
                        "steps chose rather than the initial noise (an extra plain rollout per group)")
    g.add_argument("--seed", type=int, default=0, help="seeds the rollouts (sample seeds), the LoRA init and torch")
    g = ap.add_argument_group("output")
    g.add_argument("--work-dir", type=Path, default=default_work_dir(), help="checkpoints, pushed weights, refit's log")
    g.add_argument("--out", type=Path, default=None, help="reward_curve.png, samples.png, history.json "
                   "(default: <work-dir>/results)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNGs (history.json only)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.mode = args.mode or ("lora" if device.type == "cuda" else "full")
    args.width = args.height = args.size
    if not 0 <= args.sde_steps <= args.steps:
        ap.error(f"--sde-steps must be in 0..--steps ({args.steps})")
    args.sde_step_indices = list(range(args.sde_steps)) if 0 < args.sde_steps < args.steps else None
    if args.threads is None:
        args.threads = 1 if device.type == "cpu" else 0
    args.out = args.out or args.work_dir / "results"
    args.failures = []
    if args.iterations < 1 or args.group_size < 2 or args.prompts_per_iteration < 1 or args.inner_steps < 1:
        ap.error("--iterations, --prompts-per-iteration and --inner-steps must be >= 1 and --group-size >= 2")
    if args.transport == "set_lora" and args.mode != "lora":
        ap.error("--transport set_lora pushes an adapter: use it with --mode lora")
    if args.prompts_per_iteration > len(args.prompts):
        ap.error(f"--prompts-per-iteration {args.prompts_per_iteration} exceeds the {len(args.prompts)} --prompts")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (CheckError, RefitError) as e:
        print(f"flow-grpo: error: {e}", file=sys.stderr)
        return 1
    if args.failures:
        print(f"flow-grpo: {len(args.failures)} check(s) failed; the first: {args.failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
