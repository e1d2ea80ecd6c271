"""Helpers of the HTTP integration suite: the real `refit serve` binary on a free loopback port, and tiny checkpoints
written by `refit make-model` (plus derived ones written here with Python's safetensors).

Checkpoints live in one session directory laid out for the allowed-root tests:
    allowed/base       seed 1
    allowed/second     base with seed 2's transformer (differs from base only in transformer weights)
    extra/perturbed    base with the first vae shard's floating tensors + 0.01
    outside/seed2      seed 2 (every module differs from base)
    outside/corrupted  base with seed 2's transformer and the first vae shard truncated by 2 bytes
"""
import base64
import ctypes
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REFIT = os.environ.get("REFIT_BIN", "refit")
STARTUP_TIMEOUT_S = float(os.environ.get("REFIT_STARTUP_TIMEOUT", "120"))
HTTP_TIMEOUT_S = 300
MODULES = ("text_encoder", "transformer", "vae")
# Small enough that one generation takes well under a second on one CPU core.
GEN = {"size": "32x32", "num_inference_steps": 2}


def http() -> requests.Session:
    """A session that talks to loopback directly, whatever HTTP(S)_PROXY the environment sets."""
    session = requests.Session()
    session.trust_env = False
    return session


def _die_with_parent():
    """Runs in the server's child process: SIGKILL it when pytest dies (say, killed by CTest's timeout)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run(*args, timeout=300):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


def run_parallel(commands, timeout=300):
    """Runs commands concurrently (each refit start loads libtorch for a few seconds); returns their stdouts."""
    procs = [subprocess.Popen([str(a) for a in c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outs = []
    for c, p in zip(commands, procs):
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, c))} failed ({p.returncode}):\n{err}")
        outs.append(out)
    return outs


def first_shard(module_dir: Path) -> Path:
    shards = sorted(module_dir.glob("*.safetensors"))
    assert shards, f"no safetensors in {module_dir}"
    return shards[0]


def perturb_first_shard(module_dir: Path):
    """Rewrites the first sorted shard with every floating tensor + 0.01 (computed in fp32, stored in its dtype)."""
    shard = first_shard(module_dir)
    tensors = load_file(str(shard))
    out = {}
    for name, t in tensors.items():
        out[name] = (t.float() + 0.01).to(t.dtype) if t.is_floating_point() else t
    with safe_open(str(shard), "pt") as f:
        metadata = f.metadata()
    shard.unlink()  # a copy of base: never write through to base's file
    save_file(out, str(shard), metadata=metadata)


def truncate_first_shard(module_dir: Path, nbytes=2):
    shard = first_shard(module_dir)
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[:-nbytes])


def replace_module(dst: Path, src: Path, module: str):
    shutil.rmtree(dst / module)
    shutil.copytree(src / module, dst / module)


class Checkpoints:
    def __init__(self, root: Path):
        self.root = root
        self.allowed = root / "allowed"
        self.extra = root / "extra"
        self.outside = root / "outside"
        self.base = self.allowed / "base"
        self.second = self.allowed / "second"
        self.perturbed = self.extra / "perturbed"
        self.seed2 = self.outside / "seed2"
        self.corrupted = self.outside / "corrupted"
        self.disk = {}  # str(path) -> {module: sha256 hex}, from `refit checksum --dtype fp32 --json`


class Server:
    """One `refit serve` process on an ephemeral loopback port; stderr goes to a log file shown on failure."""

    def __init__(self, model_path, workdir: Path, *extra, api_key=None):
        self.model_path = str(model_path)
        self.workdir = workdir
        self.api_key = api_key
        self.port_file = workdir / "port"
        self.log_path = workdir / "server.log"
        placement = [] if "--devices" in map(str, extra) else ["--device", "cpu"]
        args = [REFIT, "serve", "--model-path", self.model_path, "--host", "127.0.0.1", "--port", "0",
                "--port-file", str(self.port_file), *placement, "--dtype", "fp32", *map(str, extra)]
        if api_key:
            args += ["--api-key", api_key]
        self.args = args
        self._log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if k != "REFIT_API_KEY"}  # only api_key may set a key
        self.cwd = str(workdir)  # relative model paths resolve against the server's working directory
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     cwd=self.cwd, preexec_fn=_die_with_parent)
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _fail(self, why):
        self.kill()
        raise AssertionError(f"refit serve {why}\ncommand: {' '.join(self.args)}\n--- server log ---\n{self.log()}")

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"exited with code {self.proc.returncode} before writing its port file")
            if self.port_file.exists():
                text = self.port_file.read_text()
                if text.endswith("\n"):
                    port = int(text.strip())
                    if not 0 < port < 65536:
                        self._fail(f"wrote port {port}")
                    return port
            time.sleep(0.05)
        self._fail(f"did not write {self.port_file} within {STARTUP_TIMEOUT_S} s")

    def headers(self, key=None):
        key = key if key is not None else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def get(self, path, **kw):
        with http() as session:
            return session.get(self.url + path, timeout=kw.pop("timeout", HTTP_TIMEOUT_S), **kw)

    def post(self, path, body=None, *, data=None, key=None, headers=None, timeout=HTTP_TIMEOUT_S):
        h = dict(self.headers(key))
        h.update(headers or {})
        with http() as session:
            if data is not None:
                h.setdefault("Content-Type", "application/json")
                return session.post(self.url + path, data=data, headers=h, timeout=timeout)
            return session.post(self.url + path, json=body, headers=h, timeout=timeout)

    def checksums(self, modules=None, key=None, worker=None):
        body = {"module_names": modules}
        if worker is not None:
            body["worker"] = worker
        r = self.post("/get_weights_checksum", body, key=key)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def update(self, model_path, expect=200, **fields):
        r = self.post("/update_weights_from_disk", {"model_path": str(model_path), **fields})
        assert r.status_code == expect, f"update {model_path} {fields}: {r.status_code} {r.text}"
        body = r.json()
        assert body["success"] is (expect == 200), body
        return body

    def info(self):
        r = self.get("/get_model_info")
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def generate(self, seed, prompt="a red fox in the snow", **fields):
        """Returns (png bytes, weight_version) of one image."""
        body = {"prompt": prompt, "seed": seed, "response_format": "b64_json", **GEN, **fields}
        r = self.post("/v1/images/generations", body)
        assert r.status_code == 200, f"generation {body}: {r.status_code} {r.text}"
        reply = r.json()
        assert len(reply["data"]) == 1, reply
        png = base64.b64decode(reply["data"][0]["b64_json"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        return png, reply["weight_version"]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        """Sends sig and waits for the exit; kills the server if it does not stop within timeout."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"refit serve ignored {sig.name} for {timeout} s\n{self.log()}")
        self._log.close()
        return self.proc.returncode


def start_server(tmp_path_factory, model_path, *extra, api_key=None):
    return Server(model_path, tmp_path_factory.mktemp("server"), *extra, api_key=api_key)


def parse_metrics(text):
    """Prometheus text format 0.0.4 -> {(name, frozenset(labels.items())): value}; enough for refit's metrics."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$')
    label = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?\s*')
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = sample.match(line)
        assert m, f"unparsable metrics line: {line!r}"
        labels = {}
        if m.group(2):
            pos = 0
            body = m.group(2).strip()
            while pos < len(body):
                lm = label.match(body, pos)
                assert lm, f"unparsable labels in {line!r}"
                labels[lm.group(1)] = lm.group(2).replace('\\"', '"').replace("\\\\", "\\")
                pos = lm.end()
        out[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return out


def promtool_check(promtool, text):
    """`promtool check metrics` must exit 0: no parse error and no lint finding."""
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, f"promtool check metrics exited {check.returncode}:\n{check.stdout}{check.stderr}\n--- /metrics ---\n{text}"


def metric(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


class TrainerProcess:
    """A trainer script (trainer.py, tensor_trainer.py) in its own process, with SGLang's wheel (`site`) on its path;
    call() sends one JSON command and returns its JSON reply (json_lines.serve on the other side)."""

    def __init__(self, script, tmp_path, site, timeout=120):
        assert (Path(site) / "sglang").is_dir(), f"SGLang's wheel is not installed in {site}: run scripts/setup"
        env = dict(os.environ, PYTHONPATH=f"{site}:{os.environ.get('PYTHONPATH', '')}")
        self.timeout = timeout
        self.log_path = Path(tmp_path) / (Path(script).stem + ".log")
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, text=True)

    def call(self, timeout=None, **cmd):
        timeout = timeout or self.timeout
        self.send(**cmd)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"trainer did not answer {cmd['op']} within {timeout} s\n{self.log_path.read_text()}"
        line = self.proc.stdout.readline()
        assert line, f"trainer exited ({self.proc.poll()})\n{self.log_path.read_text()}"
        reply = json.loads(line)
        assert "exception" not in reply, f"{reply['exception']}\n{self.log_path.read_text()}"
        return reply

    def send(self, **cmd):
        """A command without waiting for its answer (e.g. one the trainer exits on)."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()
