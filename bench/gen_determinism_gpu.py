#!/usr/bin/env python3
"""Are images deterministic per GPU, equal across GPUs, and does it matter whether two workers generate at once?
Starts `refit serve` on cuda:0 alone, cuda:1 alone, and both (--devices cuda:0,cuda:1), generates the same request
several times (sequentially, and on the two-worker server also two at a time) and prints which images are equal.

    python3 bench/gen_determinism_gpu.py --refit-bin build-gpu/apps/refit --work /tmp/refit-det
"""
import argparse
import hashlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serving import post, refit_server  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refit-bin", default="build-gpu/apps/refit")
    ap.add_argument("--work", default="/tmp/refit-det")
    ap.add_argument("--preset", default="flux2-klein-4b")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--gpus", default="cuda:0,cuda:1")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, other = work / f"{a.preset}-A", work / f"{a.preset}-B"
    for path, seed in ((model, 1), (other, 2)):
        if not (path / "model_index.json").exists():
            subprocess.run([a.refit_bin, "make-model", "--preset", a.preset, "--seed", str(seed), "--out", str(path)], check=True)
    body = {"prompt": "a lighthouse on a cliff", "seed": 11, "size": a.size, "num_inference_steps": 4}

    def one(url):
        status, r = post(url, "/v1/images/generations", body)
        assert status == 200, r
        return r.get("worker", 0), hashlib.sha256(r["data"][0]["b64_json"].encode()).hexdigest()[:12]

    seen = {}
    g0, g1 = a.gpus.split(",")
    for name, devices in (("gpu0", g0), ("gpu1", g1), ("both", a.gpus)):
        d = work / name
        d.mkdir(exist_ok=True)
        (d / "port").unlink(missing_ok=True)
        with refit_server(a.refit_bin, ["--model-path", str(model), "--devices", devices], d) as url:
            seq = [one(url) for _ in range(3)]
            print(f"{name:5s} sequential: {seq}")
            seen[name + " sequential"] = {h for _, h in seq}
            if name == "both":
                for k in range(3):
                    with ThreadPoolExecutor(2) as pool:
                        pair = list(pool.map(lambda _: one(url), range(2)))
                    print(f"{name:5s} two at once, round {k}: {pair}")
                    for w, h in pair:
                        seen.setdefault(f"both concurrent worker {w}", set()).add(h)
                # Then after two staged disk updates (B, then A again): the same weights as before.
                for target in (other, model):
                    status, r = post(url, "/update_weights_from_disk", {"model_path": str(target), "mode": "staged"})
                    assert status == 200, r
                for k in range(4):
                    with ThreadPoolExecutor(2) as pool:
                        pair = list(pool.map(lambda _: one(url), range(2)))
                    print(f"{name:5s} after updates, two at once, round {k}: {pair}")
                    for w, h in pair:
                        seen.setdefault(f"after updates, worker {w}", set()).add(h)
                seq = [one(url) for _ in range(3)]
                print(f"{name:5s} after updates, sequential: {seq}")
                seen["after updates, sequential"] = {h for _, h in seq}
    print("distinct images per case:", {k: sorted(v) for k, v in seen.items()})
    everything = set().union(*seen.values())
    print(f"all equal: {len(everything) == 1} ({len(everything)} distinct)")


if __name__ == "__main__":
    main()
