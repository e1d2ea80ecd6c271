#!/usr/bin/env python3
"""Weight-update benchmark through HTTP on a running `refit serve`, with ceilings and the Python reference
path measured in the same run (issue 6). Run on the GPU machine after `scripts/device-build`.

    python3 bench/update_gpu.py --refit-bin build-gpu/apps/refit --load-bin build-gpu/bench/bench_device_load \
        --work /tmp/refit-update-bench [--device cuda] [--repeat 3]

It writes two flux2-klein-4b checkpoints (A, B) with `refit make-model`, starts `refit serve` on A, and measures:
  * POST /update_weights_from_disk, all modules, warm page cache, alternating A/B (staged): per phase and end to end;
  * the same with target_modules=["transformer"];
  * all modules warm with check_finite on and off, interleaved (the cost of refusing NaN/Inf while staging);
  * all modules cold (page cache dropped first), when this machine lets root drop it;
  * the generation pause per update while a client generates continuously;
and, on the same files: the page-cache -> pinned and pinned host-to-device ceilings (bench_device_load) and the
Python path (safetensors + param.copy_, bench/python_device_load.py). Prints a table of GB/s and ratios.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serving import ensure_model, post  # noqa: E402


def drop_page_cache():
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm(folder):
    for f in Path(folder).rglob("*.safetensors"):
        with open(f, "rb", buffering=0) as h:
            while h.read(256 << 20):
                pass


def pause_under_load(url, update, current, repeat):
    """The generation pause of `repeat` updates while a client generates continuously, and the client's gaps."""
    stop = threading.Event()
    gaps = []

    def client():
        last = time.perf_counter()
        while not stop.is_set():
            post(url, "/v1/images/generations", {"prompt": "a fox", "size": "512x512", "num_inference_steps": 4, "seed": 1})
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    t = threading.Thread(target=client)
    t.start()
    time.sleep(2.0)  # let the client reach steady state before measuring
    pauses = []
    try:
        for _ in range(repeat):
            current = "B" if current == "A" else "A"
            pauses.append(update(current, mode="staged")["timings"]["pause"])
    finally:
        stop.set()
        t.join()
    return pauses, gaps


def total_bytes(reply):
    return sum(m["bytes"] for m in reply["modules"] if m.get("worker", 0) == 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refit-bin", default="build-gpu/apps/refit")
    ap.add_argument("--load-bin", default="build-gpu/bench/bench_device_load")
    ap.add_argument("--work", default="/tmp/refit-update-bench")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="warm updates and the loader's ceilings only: no Python path, cold reads, check_finite or load test")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = {name: ensure_model(a.refit_bin, work / f"klein-4b-{name}", seed=seed) for name, seed in (("A", 1), ("B", 2))}
    results = {}

    # Ceilings and the Python path on B's transformer (7.75 GB).
    warm(ckpt["B"] / "transformer")
    results["ceilings"] = json.loads(subprocess.run([a.load_bin, str(ckpt["B"] / "transformer"), "--threads", "16", "--repeat", "3",
                                                     "--cold", "0" if a.quick else "1"],
                                                    check=True, capture_output=True, text=True).stdout)
    results["python"] = {"python_gbps": {"median": float("nan")}} if a.quick else json.loads(subprocess.run(
        [sys.executable, str(HERE / "python_device_load.py"), str(ckpt["B"] / "transformer"), "--repeat", "2"],
        check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    log = open(work / "server.log", "w")
    server = subprocess.Popen([a.refit_bin, "serve", "--model-path", str(ckpt["A"]), "--device", a.device, "--port", "0",
                               "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not port_file.exists() or not port_file.read_text().strip():
            if server.poll() is not None or time.time() > deadline:
                sys.exit("update_gpu.py: server did not start; see " + str(work / "server.log"))
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"

        def update(target, **extra):
            status, r = post(url, "/update_weights_from_disk", {"model_path": str(ckpt[target]), "weight_version": target, **extra})
            if status != 200:
                sys.exit(f"update_gpu.py: update to {target} failed: {status} {r}")
            return r

        warm(ckpt["A"])
        warm(ckpt["B"])
        runs = {"all_warm": [], "transformer_warm": [], "all_cold": [], "finite_on": [], "finite_off": []}
        current = "A"
        for _ in range(a.repeat):
            current = "B" if current == "A" else "A"
            runs["all_warm"].append(update(current, mode="staged"))
        for _ in range(0 if a.quick else a.repeat):  # interleaved, so that drift affects both alike
            for check in (True, False):
                current = "B" if current == "A" else "A"
                runs["finite_on" if check else "finite_off"].append(update(current, mode="staged", check_finite=check))
        for _ in range(a.repeat):
            current = "B" if current == "A" else "A"
            runs["transformer_warm"].append(update(current, mode="staged", target_modules=["transformer"]))
        cold_ok = not a.quick
        for _ in range(0 if a.quick else min(a.repeat, 2)):
            current = "B" if current == "A" else "A"
            if not drop_page_cache():
                cold_ok = False
                break
            runs["all_cold"].append(update(current, mode="staged"))

        # Pause under load: a client generates continuously while updates run.
        pauses, gaps = (([], []) if a.quick else pause_under_load(url, update, current, a.repeat))
        results["runs"] = runs
        results["pause_under_load_s"] = pauses
        results["generation_gap_s"] = {"median": statistics.median(gaps), "max": max(gaps)} if gaps else {}
    finally:
        server.terminate()
        server.wait(timeout=60)

    def gbps(rs, key="total"):
        return statistics.median(total_bytes(r) / r["timings"][key] / 1e9 for r in rs) if rs else float("nan")

    h2d = results["ceilings"]["pinned_h2d_gbps"]["median"]
    read = results["ceilings"]["page_cache_to_pinned_gbps"]["median"]
    py = results["python"]["python_gbps"]["median"]
    print(f"| {'measure (median)':<52} | {'value':>10} |\n|{'-' * 54}|{'-' * 12}|")
    c = results["ceilings"]
    ring = c.get("ring", {})
    print(f"machine: last-level cache {c.get('llc_mib', '?')} MiB; the server's staging ring {ring.get('slots', '?')} x "
          f"{ring.get('slot_mib', '?')} MiB ({ring.get('source', '?')})")
    rows = [("page cache -> pinned, 16 threads, 64 MiB chunks (GB/s)", read),
            ("page cache -> pinned, ring-slot chunks (GB/s)", c.get("page_cache_to_pinned_ring_chunk_gbps", {}).get("median", float("nan"))),
            ("DRAM memcpy, 16 threads (GB/s)", c.get("dram_memcpy_gbps", {}).get("best", float("nan"))),
            ("loader alone, LLC-sized ring (GB/s)", c.get("refit_device_loader_gbps", {}).get("median", float("nan"))),
            ("loader alone, 32 x 32 MiB ring (GB/s)", c.get("refit_device_loader_32x32mib_ring_gbps", {}).get("median", float("nan"))),
            ("pinned host -> device (GB/s)", h2d),
            ("Python path: safetensors + param.copy_ (GB/s)", py),
            ("refit HTTP update, all modules, warm, end to end (GB/s)", gbps(runs["all_warm"])),
            ("refit HTTP update, transformer only, warm (GB/s)", gbps(runs["transformer_warm"])),
            ("refit HTTP update, all modules, cold (GB/s)", gbps(runs["all_cold"]) if cold_ok else float("nan"))]
    for label, v in rows:
        if v == v:  # --quick leaves some unmeasured (NaN)
            print(f"| {label:<52} | {v:10.2f} |")
    w = runs["all_warm"]
    for phase in ("plan", "validate", "stage", "drain", "pause", "commit", "finish", "total"):
        print(f"| {'all modules warm: ' + phase + ' (s)':<52} | {statistics.median(r['timings'].get(phase, 0) for r in w):10.4f} |")
    median = lambda rs, key: statistics.median(r["timings"].get(key, 0) for r in rs)
    for key in ("stage", "total") if runs["finite_on"] else ():
        on, off = median(runs["finite_on"], key), median(runs["finite_off"], key)
        print(f"| {'all modules warm, check_finite on: ' + key + ' (s)':<52} | {on:10.4f} |")
        print(f"| {'all modules warm, check_finite off: ' + key + ' (s)':<52} | {off:10.4f} |")
        print(f"| {'check_finite on / off: ' + key:<52} | {on / off if off else float('nan'):10.3f} |")
    if pauses:
        print(f"| {'generation pause per update under load, median (ms)':<52} | {statistics.median(pauses) * 1e3:10.2f} |")
        print(f"| {'generation pause per update under load, max (ms)':<52} | {max(pauses) * 1e3:10.2f} |")
    warm_gbps = gbps(runs["all_warm"])
    if a.quick:
        print(f"\nwarm end to end / pinned H2D ceiling: {warm_gbps / h2d:.3f} (--quick: no Python path, cold read or load test)")
    else:
        cold = f"{gbps(runs['all_cold']):.2f} GB/s" if cold_ok else "not measurable here (cannot drop the page cache)"
        print(f"\nwarm end to end / pinned H2D ceiling: {warm_gbps / h2d:.3f}; / Python path: {warm_gbps / py:.2f}x; cold: {cold}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
