#!/usr/bin/env python3
"""Read once per host, fan out (issue 18): a disk refit of flux2-klein-4b through HTTP on one GPU, on two GPUs that each
read the files (--no-read-once), and on two GPUs where the second copies what the first staged (the default), measured in
one run on the same warm page cache. Also checks, on the two-GPU read-once server, that both GPUs hold what one GPU
reading the checkpoint holds (module checksums) and compute byte-equal images.

    python3 bench/fanout_gpu.py --refit-bin build-gpu/apps/refit --work /tmp/refit-fanout [--repeat 3] [--out fanout.json]
"""
import argparse
import hashlib
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serving import ensure_model, post, refit_server  # noqa: E402
from update_gpu import warm  # noqa: E402


def get(url, path):
    import urllib.request
    with urllib.request.urlopen(url + path, timeout=600) as r:
        return json.load(r)


def run_config(a, work, ckpt, name, devices, extra):
    """Starts a server on A with `devices`, alternates staged updates B/A `repeat` times; returns the replies' timings."""
    out = {"devices": devices, "updates": []}
    (work / name).mkdir(exist_ok=True)
    (work / name / "port").unlink(missing_ok=True)  # a port file of an earlier run would be taken for this server's
    with refit_server(a.refit_bin, ["--model-path", str(ckpt["A"]), "--devices", devices, *extra], work / name) as url:
        current = "A"
        for _ in range(a.repeat + 1):  # the first update allocates; it is reported but not in the median
            current = "B" if current == "A" else "A"
            t0 = time.perf_counter()
            status, r = post(url, "/update_weights_from_disk", {"model_path": str(ckpt[current]), "mode": "staged"})
            wall = time.perf_counter() - t0
            if status != 200:
                sys.exit(f"fanout_gpu.py: {name}: update to {current} failed: {status} {r}")
            out["updates"].append({"total": r["timings"]["total"], "stage": r["timings"].get("stage"), "wall": wall,
                                   "bytes": sum(m["bytes"] for m in r["modules"] if m.get("worker", 0) == 0)})
        out["last"] = current
        if a.check:
            workers = len(devices.split(","))
            if name != "each":
                out["checksums"] = [post(url, "/get_weights_checksum", {"worker": w, "format": "refit"})[1] for w in range(workers)]
            size = "512x512" if "4b" in a.preset else "64x64"
            body = {"prompt": "a lighthouse on a cliff", "seed": 11, "size": size, "num_inference_steps": 4}
            by_worker = {}
            out["rounds"] = []
            for _ in range(3):  # rounds of one request per worker at once: each worker's repeats, and across workers
                with ThreadPoolExecutor(workers) as pool:
                    replies = list(pool.map(lambda _: post(url, "/v1/images/generations", body)[1], range(workers)))
                for r in replies:
                    by_worker.setdefault(r.get("worker", 0), []).append(r["data"][0]["b64_json"])
                out["rounds"].append([(r.get("worker", 0), hashlib.sha256(r["data"][0]["b64_json"].encode()).hexdigest()[:12])
                                      for r in replies])
            print(f"  {name}: images per round (worker, sha256): {out['rounds']}")
            out["image_workers"] = sorted(by_worker)
            out["images_repeat_equal"] = {str(w): len(set(v)) == 1 for w, v in by_worker.items()}
            out["images_equal"] = len({x for v in by_worker.values() for x in v}) == 1
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refit-bin", default="build-gpu/apps/refit")
    ap.add_argument("--work", default="/tmp/refit-fanout")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gpus", default="cuda:0,cuda:1")
    ap.add_argument("--preset", default="flux2-klein-4b", help="make-model preset (flux2-klein-tiny with --gpus cpu,cpu: a smoke test)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the checksum and image checks")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = {name: ensure_model(a.refit_bin, work / f"{a.preset}-{name}", a.preset, seed) for name, seed in (("A", 1), ("B", 2))}
    for folder in ckpt.values():
        warm(folder)
    first = a.gpus.split(",")[0]
    results = {
        "one_gpu": run_config(a, work, ckpt, "one", first, []),
        "two_gpus_each_reads": run_config(a, work, ckpt, "each", a.gpus, ["--no-read-once"]),
        "two_gpus_read_once": run_config(a, work, ckpt, "once", a.gpus, []),
    }

    def med(cfg, key="total"):
        return statistics.median(u[key] for u in results[cfg]["updates"][1:])

    gb = results["one_gpu"]["updates"][-1]["bytes"] / 1e9
    print(f"disk refit of {gb:.2f} GB per GPU, warm page cache, staged, median of {a.repeat} (HTTP reply's total)")
    for cfg in results:
        print(f"  {cfg:22s} {med(cfg):.3f} s  ({gb / med(cfg):.1f} GB/s per GPU)  stage {med(cfg, 'stage'):.3f} s")
    ratio_once = med("two_gpus_read_once") / med("one_gpu")
    ratio_each = med("two_gpus_each_reads") / med("one_gpu")
    print(f"  2 GPUs read once / 1 GPU:  {ratio_once:.3f}  (goal <= 1.10)")
    print(f"  2 GPUs each read / 1 GPU:  {ratio_each:.3f}")
    results["ratios"] = {"read_once_vs_one": ratio_once, "each_reads_vs_one": ratio_each}
    if a.check:
        one = results["one_gpu"]
        once = results["two_gpus_read_once"]
        same_ckpt = one["last"] == once["last"]
        equal = all(c == once["checksums"][0] for c in once["checksums"])
        print(f"  read-once checksums equal on both GPUs: {equal}; equal to one GPU's read of the same checkpoint: "
              f"{once['checksums'][0] == one['checksums'][0] if same_ckpt else 'n/a (other checkpoint)'}")
        for cfg in ("one_gpu", "two_gpus_each_reads", "two_gpus_read_once"):
            r = results[cfg]
            print(f"  {cfg}: images byte-equal across workers {r['image_workers']}: {r['images_equal']}; "
                  f"each worker's repeats equal: {r['images_repeat_equal']}")
        results["checks"] = {"checksums_equal": equal, "match_one_gpu": same_ckpt and once["checksums"][0] == one["checksums"][0],
                             "images_equal": once["images_equal"], "image_workers": once["image_workers"]}
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
