#!/usr/bin/env python3
"""Are images deterministic per GPU, equal across GPUs, and does it matter whether two workers generate at once?
Starts `refit serve` on cuda:0 alone, cuda:1 alone, and both (--devices cuda:0,cuda:1), generates the same request
several times (sequentially, and on the two-worker server also two at a time) and prints which images are equal.

    python3 bench/gen_determinism_gpu.py --refit-bin build-gpu/apps/refit --work /tmp/refit-det
"""
import argparse
import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serving import ensure_model, post, refit_server  # noqa: E402


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
    model = ensure_model(a.refit_bin, work / f"{a.preset}-A", a.preset, 1)
    other = ensure_model(a.refit_bin, work / f"{a.preset}-B", a.preset, 2)
    body = {"prompt": "a lighthouse on a cliff", "seed": 11, "size": a.size, "num_inference_steps": 4}

    def one(url):
        status, r = post(url, "/v1/images/generations", body)
        assert status == 200, r
        return r.get("worker", 0), hashlib.sha256(r["data"][0]["b64_json"].encode()).hexdigest()[:12]

    seen = {}

    def sequential(url, label, n=3):
        seq = [one(url) for _ in range(n)]
        print(f"{label}, sequential: {seq}")
        seen[label + ", sequential"] = {h for _, h in seq}

    def two_at_once(url, label, rounds):
        for k in range(rounds):
            with ThreadPoolExecutor(2) as pool:
                pair = list(pool.map(lambda _: one(url), range(2)))
            print(f"{label}, two at once, round {k}: {pair}")
            for w, h in pair:
                seen.setdefault(f"{label}, worker {w}", set()).add(h)

    g0, g1 = a.gpus.split(",")
    for name, devices in (("gpu0", g0), ("gpu1", g1), ("both", a.gpus)):
        d = work / name
        d.mkdir(exist_ok=True)
        (d / "port").unlink(missing_ok=True)
        with refit_server(a.refit_bin, ["--model-path", str(model), "--devices", devices], d) as url:
            sequential(url, name)
            if name == "both":
                two_at_once(url, name, 3)
                # Then after two staged disk updates (B, then A again): the same weights as before.
                for target in (other, model):
                    status, r = post(url, "/update_weights_from_disk", {"model_path": str(target), "mode": "staged"})
                    assert status == 200, r
                two_at_once(url, "both after updates", 4)
                sequential(url, "both after updates")
    print("distinct images per case:", {k: sorted(v) for k, v in seen.items()})
    everything = set().union(*seen.values())
    print(f"all equal: {len(everything) == 1} ({len(everything)} distinct)")


if __name__ == "__main__":
    main()
