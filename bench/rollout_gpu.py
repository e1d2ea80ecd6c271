#!/usr/bin/env python3
"""Rollout cost (issue 16): POST /rollout/generate against a plain POST /v1/images/generations of the same image on
the same running `refit serve`, in the same run. Run on the GPU machine after `scripts/device-build`.

    python3 bench/rollout_gpu.py --refit-bin build-gpu/apps/refit --model /tmp/flux2-klein-4b [--size 1024] [--steps 4]

For each of: plain generate (PNG), rollout with log-probs only, rollout + debug tensors, rollout + debug + DiT
trajectory, it prints the median wall time of --repeat requests and the ratio to the plain generate, and the
response size. Samples are decoded (msgpack + safetensors) to check every tensor arrived.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgpack
from safetensors.torch import load

from serving import ensure_model


def post(url, path, body, timeout=900):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refit-bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    ensure_model(a.refit_bin, a.model)
    work = Path(tempfile.mkdtemp(prefix="refit-rollout-bench-"))
    log = open(work / "server.log", "wb")
    server = subprocess.Popen([a.refit_bin, "serve", "--model-path", a.model, "--device", a.device, "--port", "0",
                               "--port-file", str(work / "port")], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(1200):
            if (work / "port").exists() and (work / "port").read_text().endswith("\n"):
                break
            if server.poll() is not None:
                sys.exit("refit serve exited:\n" + (work / "server.log").read_text()[-3000:])
            time.sleep(0.25)
        url = f"http://127.0.0.1:{int((work / 'port').read_text())}"
        base = {"prompt": "a red fox in the snow", "seed": 3, "num_inference_steps": a.steps}
        cases = {
            "plain generate (png)": ("/v1/images/generations", {**base, "size": f"{a.size}x{a.size}"}),
            "rollout, log-probs only": ("/rollout/generate", {**base, "width": a.size, "height": a.size, "rollout_debug_mode": False}),
            "rollout + debug tensors": ("/rollout/generate", {**base, "width": a.size, "height": a.size}),
            "rollout + debug + trajectory": ("/rollout/generate", {**base, "width": a.size, "height": a.size,
                                                                    "rollout_return_dit_trajectory": True}),
        }
        results = {}
        for name, (path, body) in cases.items():
            post(url, path, body)  # warm-up (kernels, allocator)
            times, size = [], 0
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                raw = post(url, path, body)
                times.append(time.perf_counter() - t0)
                size = len(raw)
            if path == "/rollout/generate":
                sample = msgpack.unpackb(raw, raw=False)[0]
                lp = load(sample["rollout_log_probs"]["data"])["t"]
                assert lp.shape == (a.steps,), lp.shape
            results[name] = {"median_s": statistics.median(times), "bytes": size}
        plain = results["plain generate (png)"]["median_s"]
        print(f"| {'request (' + str(a.size) + 'x' + str(a.size) + ', ' + str(a.steps) + ' steps)':40} | median s | x plain | reply MB |")
        print(f"|{'-' * 42}|----------|---------|----------|")
        for name, r in results.items():
            print(f"| {name:40} | {r['median_s']:8.3f} | {r['median_s'] / plain:7.3f} | {r['bytes'] / 1e6:8.2f} |")
        if a.out:
            a.out.write_text(json.dumps(results, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
