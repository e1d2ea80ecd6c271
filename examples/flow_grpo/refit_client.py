"""The rollout engine's side: start `refit serve` (or attach to one), and speak its HTTP API.

Every call raises RefitError with the endpoint, the HTTP status and refit's message when it does not succeed, so the
loop stops at the first failure and says where.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import msgpack
import requests
import torch
from safetensors.torch import load as load_safetensors


MAX_OUTPUTS_PER_REQUEST = 64  # refit's bound on num_outputs_per_prompt


class RefitError(RuntimeError):
    """A request refit refused or could not serve; the message names the endpoint and refit's reason."""


def decode(obj):
    """SGLang's client-side decoding of a rollout reply: every {"__tensor__": true, "data": <safetensors bytes>} map
    back to a tensor, recursively."""
    if isinstance(obj, dict):
        if obj.get("__tensor__"):
            return load_safetensors(obj["data"])["t"]
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def _die_with_parent():  # runs in the server's child process: the server goes when the trainer goes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RefitServer:
    """`refit serve` started by the trainer on a free loopback port; its log goes to <work_dir>/refit-serve.log."""

    def __init__(self, refit_bin: str, model_path: Path, work_dir: Path, device: str, dtype: str,
                 extra_args: list[str] | None = None, startup_timeout: float = 600.0, threads: int = 0):
        work_dir.mkdir(parents=True, exist_ok=True)
        self.port_file = work_dir / "refit-serve.port"
        self.port_file.unlink(missing_ok=True)
        self.log_path = work_dir / "refit-serve.log"
        self.args = [refit_bin, "serve", "--model-path", str(model_path), "--host", "127.0.0.1", "--port", "0",
                     "--port-file", str(self.port_file), "--device", device, "--dtype", dtype, *(extra_args or [])]
        self._log = open(self.log_path, "wb")
        env = dict(os.environ)
        if threads > 0:  # libtorch's CPU thread pools (a busy machine runs small models faster on fewer threads)
            env["OMP_NUM_THREADS"] = str(threads)
        try:
            self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        except OSError as e:
            raise RefitError(f"cannot start {refit_bin} (pass --refit-bin): {e}") from e
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RefitError(f"refit serve exited with code {self.proc.returncode} before listening; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            text = self.port_file.read_text() if self.port_file.exists() else ""
            if text.endswith("\n"):
                self.url = f"http://127.0.0.1:{int(text)}"
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RefitError(f"refit serve did not listen within {startup_timeout:.0f} s; log {self.log_path}")
            time.sleep(0.05)

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class RefitClient:
    """refit's post-training API, SGLang's field names."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 3600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # loopback: whatever HTTP(S)_PROXY says
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _post(self, path: str, body: dict | None = None, method: str = "POST") -> requests.Response:
        try:
            return self.session.request(method, self.url + path, json=body, timeout=self.timeout)
        except requests.RequestException as e:
            raise RefitError(f"{method} {path}: cannot reach {self.url}: {e}") from e

    def _json(self, path: str, body: dict | None = None, method: str = "POST") -> dict:
        reply = self._post(path, body, method)
        try:
            payload = reply.json()
        except ValueError:
            payload = None
        ok = reply.status_code == 200 and isinstance(payload, dict) and payload.get("success", True) is not False
        if not ok:
            detail = reply.text[:1000]
            if isinstance(payload, dict):
                detail = payload.get("message") or payload.get("detail") or detail
            raise RefitError(f"{method} {path}: HTTP {reply.status_code}: {detail}")
        return payload

    # -- state
    def health(self) -> dict:
        return self._json("/health", method="GET")

    def model_info(self) -> dict:
        return self._json("/get_model_info", method="GET")

    def checksum(self, module: str = "transformer") -> str:
        reply = self._json("/get_weights_checksum", {"module_names": [module]})
        if reply.get(module) in (None, "not_found"):
            raise RefitError(f"POST /get_weights_checksum: no checksum for module '{module}': {reply}")
        return reply[module]

    # -- rollouts
    def rollout(self, prompt: str, seed: int, group_size: int, width: int, height: int, steps: int,
                noise_level: float, sde_steps: list[int] | None, return_env: bool) -> list[dict]:
        """One group: group_size samples of one prompt (sample i drawn with seed + i), with the sampler's trajectory
        and each SDE step's log-probability (sde_steps: the 0-based stochastic steps, the others ODE; None: all)."""
        samples = []
        for offset in range(0, group_size, MAX_OUTPUTS_PER_REQUEST):  # sample i is seed + i either way
            n = min(MAX_OUTPUTS_PER_REQUEST, group_size - offset)
            samples += self._rollout_request(prompt, seed + offset, n, width, height, steps, noise_level, sde_steps,
                                             return_env and offset == 0)
        return samples

    def plain_samples(self, prompt: str, seed: int, count: int, width: int, height: int, steps: int) -> list[dict]:
        """The deterministic (ODE) samples of the same seeds: rollout=false, the plain sampler from the same initial
        noise."""
        samples = []
        for offset in range(0, count, MAX_OUTPUTS_PER_REQUEST):
            n = min(MAX_OUTPUTS_PER_REQUEST, count - offset)
            samples += self._rollout_request(prompt, seed + offset, n, width, height, steps, rollout=False)
        return samples

    def _rollout_request(self, prompt, seed, n, width, height, steps, noise_level=0.7, sde_steps=None,
                         return_env=False, rollout=True):
        body = {"prompt": prompt, "seed": seed, "num_outputs_per_prompt": n, "width": width, "height": height,
                "num_inference_steps": steps, "rollout": rollout}
        if rollout:
            body.update({"rollout_sde_type": "sde", "rollout_noise_level": noise_level,
                         "rollout_log_prob_no_const": False, "rollout_debug_mode": False,
                         "rollout_return_dit_trajectory": True, "rollout_return_denoising_env": return_env})
            if sde_steps is not None:
                body["rollout_sde_step_indices"] = sde_steps
        reply = self._post("/rollout/generate", body)
        if reply.status_code != 200 or reply.headers.get("Content-Type") != "application/msgpack":
            raise RefitError(f"POST /rollout/generate: HTTP {reply.status_code}: {reply.text[:1000]}")
        samples = decode(msgpack.unpackb(reply.content, raw=False))
        if len(samples) != n:
            raise RefitError(f"POST /rollout/generate: asked for {n} samples of {prompt!r}, got {len(samples)}")
        return samples

    # -- weights
    def update_from_disk(self, model_path: Path, weight_version: str, **fields) -> dict:
        return self._json("/update_weights_from_disk", {
            "model_path": str(model_path), "target_modules": ["transformer"], "weight_version": weight_version,
            "flush_cache": True, **fields})

    def update_from_tensor(self, payload: str, weight_version: str, **fields) -> dict:
        return self._json("/update_weights_from_tensor", {
            "serialized_named_tensors": [payload], "target_modules": ["transformer"], "weight_version": weight_version,
            "flush_cache": True, **fields})

    def set_lora(self, nickname: str, path: Path, weight_version: str) -> dict:
        reply = self._post("/v1/set_lora", {"lora_nickname": nickname, "lora_path": str(path), "target": "transformer",
                                            "strength": 1.0, "weight_version": weight_version})
        payload = reply.json() if reply.headers.get("Content-Type", "").startswith("application/json") else {}
        if reply.status_code != 200 or payload.get("status") != "ok":
            detail = payload.get("detail") or reply.text[:1000]
            raise RefitError(f"POST /v1/set_lora: HTTP {reply.status_code}: {detail}")
        return payload

    def release_memory(self) -> dict:
        return self._json("/release_memory_occupation", {})

    def resume_memory(self) -> dict:
        return self._json("/resume_memory_occupation", {})


def default_work_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"refit-flow-grpo-{os.getuid()}"
