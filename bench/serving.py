"""What the GPU benchmarks share: a running `refit serve` and JSON requests to it."""
import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def ensure_model(refit_bin, model, preset="flux2-klein-4b", seed=1):
    """Writes a checkpoint of PRESET with SEED's random weights (flux2-klein-4b: the FLUX.2-klein-4B shapes, 16 GB) at
    MODEL unless one is there; returns MODEL."""
    if not (Path(model) / "model_index.json").exists():
        subprocess.run([refit_bin, "make-model", "--preset", preset, "--seed", str(seed), "--out", str(model)], check=True)
    return Path(model)


def post(url, path, body, timeout=900):
    """POST JSON; returns (HTTP status, decoded reply) for successes and HTTP errors alike."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextlib.contextmanager
def refit_server(refit_bin, args, work, env=None, start_timeout_s=600):
    """Starts `refit serve ARGS` on a free port (log in WORK/server.log), yields its URL, stops it afterwards."""
    work = Path(work)
    log = open(work / "server.log", "wb")
    server = subprocess.Popen([refit_bin, "serve", *map(str, args), "--port", "0", "--port-file", str(work / "port")],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + start_timeout_s
        while not ((work / "port").exists() and (work / "port").read_text().endswith("\n")):
            if server.poll() is not None or time.time() > deadline:
                sys.exit("refit serve did not start:\n" + (work / "server.log").read_text()[-4000:])
            time.sleep(0.25)
        yield f"http://127.0.0.1:{int((work / 'port').read_text())}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
