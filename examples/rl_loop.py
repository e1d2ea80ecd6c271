#!/usr/bin/env python3
"""An RL-style update loop against a running `refit serve`, with plain HTTP (requests).

Each iteration does what a trainer and its sampler do around a policy update:

  1. "train": copy the latest checkpoint to a new step folder and perturb the transformer's floating
     tensors (safetensors + torch), each file written to a temporary name and renamed, the folder
     itself published by a rename, so the server only ever sees complete checkpoints;
  2. POST /update_weights_from_disk with target_modules=["transformer"], weight_version "step-K";
  3. POST /get_weights_checksum and compare the transformer's checksum with
     `refit checksum STEP_DIR --module transformer --dtype DTYPE --json` computed from disk;
  4. POST /v1/images/generations and check that the image carries weight_version "step-K".

It prints the update time and the generation pause of every iteration and exits non-zero on the first
failure, naming the step and what went wrong.

  python3 examples/rl_loop.py --url http://127.0.0.1:30010 --iterations 3 --work-dir /tmp/refit-rl

Step numbers continue from the highest step-K folder already in --work-dir, so a second run resumes.

The server must be able to read --work-dir (and, with --allowed-model-root, it must lie inside one).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODULE = "transformer"


class LoopError(Exception):
    """A failed step; the message says which and why."""


# ------------------------------------------------------------------------------------------------
# The server


class RefitServer:
    def __init__(self, url: str, api_key: str | None, timeout: float):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        try:
            reply = self.session.request(method, self.url + path, json=body, timeout=self.timeout)
        except requests.RequestException as e:
            raise LoopError(f"{method} {path}: cannot reach {self.url}: {e}") from e
        try:
            payload = reply.json()
        except ValueError:
            payload = None
        if reply.status_code != 200 or not isinstance(payload, dict):
            detail = payload.get("message") if isinstance(payload, dict) else reply.text[:500]
            raise LoopError(f"{method} {path}: HTTP {reply.status_code}: {detail}")
        return payload

    def health(self) -> dict:
        return self._call("GET", "/health")

    def model_info(self) -> dict:
        return self._call("GET", "/get_model_info")

    def update(self, model_path: Path, version: str) -> dict:
        return self._call("POST", "/update_weights_from_disk", {
            "model_path": str(model_path),
            "target_modules": [MODULE],
            "weight_version": version,
            "flush_cache": True,
        })

    def checksums(self, modules: list[str]) -> dict:
        return self._call("POST", "/get_weights_checksum", {"module_names": modules})

    def generate(self, prompt: str, size: str, steps: int, seed: int) -> dict:
        return self._call("POST", "/v1/images/generations", {
            "prompt": prompt,
            "n": 1,
            "size": size,
            "num_inference_steps": steps,
            "seed": seed,
            "response_format": "b64_json",
        })


# ------------------------------------------------------------------------------------------------
# The "trainer"


def perturb_file(path: Path, step: int, scale: float) -> int:
    """Adds seeded noise (scale x the tensor's RMS) to every floating tensor of one safetensors file,
    in its dtype; writes a temporary file next to it and renames it over the original."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    generator = torch.Generator().manual_seed(step * 1_000_003 + len(str(path)))
    changed = 0
    for name in sorted(tensors):
        t = tensors[name]
        if not t.is_floating_point() or t.numel() == 0:
            continue  # integer buffers such as num_batches_tracked keep their values
        x = t.to(torch.float32)
        rms = float(x.pow(2).mean().sqrt()) or 1.0
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        tensors[name] = (x + scale * rms * noise).to(t.dtype).contiguous()
        changed += 1
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return changed


def train_step(previous: Path, work_dir: Path, step: int, scale: float) -> Path:
    """Writes checkpoint `step-K` from `previous` with a perturbed transformer; returns its folder."""
    final = work_dir / f"step-{step:06d}"
    staging = work_dir / f".step-{step:06d}.writing"
    if final.exists():
        raise LoopError(f"step {step}: {final} already exists")
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run; never served
    shutil.copytree(previous, staging)
    files = sorted((staging / MODULE).glob("*.safetensors"))
    if not files:
        raise LoopError(f"step {step}: no {MODULE}/*.safetensors in {previous}")
    changed = sum(perturb_file(f, step, scale) for f in files)
    if changed == 0:
        raise LoopError(f"step {step}: {MODULE} of {previous} has no floating tensors to train")
    os.rename(staging, final)  # publish the finished checkpoint in one step
    return final


def next_step(work_dir: Path) -> int:
    """1 + the highest step-K folder already in work_dir, so a rerun continues instead of overwriting
    (and never deletes) the checkpoint the server may be serving."""
    steps = [int(p.name[5:]) for p in work_dir.glob("step-*") if p.name[5:].isdigit()]
    return max(steps, default=0) + 1


def disk_checksum(refit_bin: str, folder: Path, dtype: str) -> str:
    cmd = [refit_bin, "checksum", str(folder), "--module", MODULE, "--dtype", dtype, "--json"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise LoopError(f"cannot run {refit_bin} (pass --refit-bin): {e}") from e
    if run.returncode != 0:
        raise LoopError(f"{' '.join(cmd)} exited {run.returncode}: {run.stderr.strip()}")
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])[MODULE]
    except (IndexError, ValueError, KeyError) as e:
        raise LoopError(f"{' '.join(cmd)} printed no {MODULE} checksum: {run.stdout!r}") from e


# /get_model_info reports each module's dtype (libtorch names: Float, BFloat16, Half); `refit checksum --dtype`
# takes bf16, fp16, fp32.
DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32", "torch.float32": "fp32",
               "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
               "fp16": "fp16", "float16": "fp16", "f16": "fp16", "half": "fp16", "torch.float16": "fp16"}


def served_dtype(info: dict) -> str:
    for m in info.get("modules", []):
        if m.get("name") == MODULE:
            name = str(m.get("dtype", "")).lower()
            if name in DTYPE_NAMES:
                return DTYPE_NAMES[name]
            raise LoopError(f"the server reports {MODULE} dtype '{m.get('dtype')}'; pass --dtype bf16|fp16|fp32")
    raise LoopError(f"/get_model_info lists no module '{MODULE}'")


# ------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description="RL-style loop: write a checkpoint, refit the server's transformer, verify, sample.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:30010", help="refit serve base URL")
    parser.add_argument("--api-key", default=os.environ.get("REFIT_API_KEY"),
                        help="admin key of `refit serve --api-key` (default: $REFIT_API_KEY)")
    parser.add_argument("--iterations", "-k", type=int, default=3, help="number of update iterations")
    parser.add_argument("--from", dest="start", type=Path,
                        help="checkpoint to start training from (default: the model the server serves now)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/refit-rl"),
                        help="where the step-K checkpoints are written (readable by the server)")
    parser.add_argument("--keep", type=int, default=2,
                        help="step folders to keep in --work-dir, this run's and earlier runs' (older ones are deleted; 0 keeps all)")
    parser.add_argument("--noise", type=float, default=0.05,
                        help="perturbation per step, relative to each tensor's RMS")
    parser.add_argument("--refit-bin", default=str(Path(__file__).resolve().parents[1] / "build/apps/refit"),
                        help="the refit binary, for `refit checksum`")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="dtype the server holds the transformer in (auto: from /get_model_info)")
    parser.add_argument("--prompt", default="a red fox in the snow")
    parser.add_argument("--size", default="64x64", help="sample size WxH")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps")
    parser.add_argument("--seed", type=int, default=7, help="sampling seed (fixed, so images differ only by weights)")
    parser.add_argument("--image-dir", type=Path, help="save each iteration's sample as step-K.png here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per HTTP request")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")

    server = RefitServer(args.url, args.api_key, args.timeout)
    try:
        return run_loop(server, args)
    except LoopError as e:
        print(f"rl_loop: error: {e}", file=sys.stderr)
        return 1


def prune(work_dir: Path, keep: int, serving: Path):
    """Deletes all but the newest `keep` step-K folders in work_dir, this run's and earlier runs' alike; never the
    folder the server serves now (the source it re-reads should an in-place rollback need it)."""
    steps = sorted((int(p.name[5:]), p) for p in work_dir.glob("step-*") if p.name[5:].isdigit() and p.is_dir())
    for _, old in steps[:-keep]:
        if old.resolve() != serving.resolve():
            shutil.rmtree(old, ignore_errors=True)


def run_loop(server: RefitServer, args: argparse.Namespace) -> int:
    server.health()
    info = server.model_info()
    dtype = served_dtype(info) if args.dtype == "auto" else args.dtype
    current = (args.start or Path(info["model_path"])).resolve()
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    if args.image_dir:
        args.image_dir.mkdir(parents=True, exist_ok=True)
    print(f"server {args.url}: serving {info['model_path']} (weight_version {info['weight_version']}, "
          f"{MODULE} in {dtype}); training from {current} into {work_dir}")

    first = next_step(work_dir)
    rows = []
    previous_png = None
    for step in range(first, first + args.iterations):
        version = f"step-{step}"
        t0 = time.perf_counter()
        folder = train_step(current, work_dir, step, args.noise)
        train_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        reply = server.update(folder, version)
        request_s = time.perf_counter() - t0
        if reply.get("success") is not True:
            raise LoopError(f"step {step}: update replied success={reply.get('success')}: {reply.get('message')}")
        if reply.get("weight_version") != version:
            raise LoopError(f"step {step}: update reports weight_version {reply.get('weight_version')!r}, "
                            f"asked for {version!r}")
        timings = reply.get("timings", {})

        served = server.checksums([MODULE]).get(MODULE)
        expected = disk_checksum(args.refit_bin, folder, dtype)
        if served != expected:
            raise LoopError(f"step {step}: the server's {MODULE} checksum {served} differs from "
                            f"`refit checksum {folder} --dtype {dtype}` {expected}")

        image = server.generate(args.prompt, args.size, args.steps, args.seed)
        if image.get("weight_version") != version:
            raise LoopError(f"step {step}: the sample carries weight_version {image.get('weight_version')!r}, "
                            f"expected {version!r}")
        try:
            png = base64.b64decode(image["data"][0]["b64_json"], validate=True)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise LoopError(f"step {step}: the generation reply holds no base64 image: {e}") from e
        if not png.startswith(PNG_MAGIC):
            raise LoopError(f"step {step}: the generated image is not a PNG")
        if png == previous_png:
            raise LoopError(f"step {step}: the sample is byte-identical to the previous step's, "
                            "although the transformer changed")
        previous_png = png
        if args.image_dir:
            (args.image_dir / f"{version}.png").write_bytes(png)

        row = {"step": step, "train_s": train_s, "update_s": timings.get("total", request_s),
               "pause_s": timings.get("pause", float("nan")), "request_s": request_s,
               "sample_s": image.get("inference_time_s", float("nan")), "checksum": served}
        rows.append(row)
        print(f"step {step}: trained in {train_s:.2f} s; update {row['update_s']:.3f} s "
              f"(pause {row['pause_s']:.4f} s, request {request_s:.3f} s, mode {reply.get('mode', '?')}); "
              f"{MODULE} {served[:16]}… matches disk; sample {row['sample_s']:.2f} s with {version}")

        current = folder
        if args.keep > 0:
            prune(work_dir, args.keep, current)

    print()
    print(f"{'step':>4}  {'update s':>9}  {'pause s':>9}  {'request s':>9}  {'sample s':>8}  checksum")
    for r in rows:
        print(f"{r['step']:>4}  {r['update_s']:>9.4f}  {r['pause_s']:>9.4f}  {r['request_s']:>9.4f}  "
              f"{r['sample_s']:>8.3f}  {r['checksum'][:16]}…")
    print(f"{len(rows)} iterations ok; the server now serves {current} as step-{rows[-1]['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
