#!/usr/bin/env python3
"""Layerwise offload on the GPU machine (issue 7), on flux2-klein-4b checkpoints made with `refit make-model`.

    python3 bench/offload_gpu.py --part generate|update --refit-bin build-gpu/apps/refit \
        --bench-bin build-gpu/bench/bench_generate --work /tmp/refit-update-bench [--out results.json]

generate: time per 1024x1024 image and device memory (held after loading, peak while generating) without offload and
          with prefetch 1 and 2, all measured in this run; and whether `refit generate` writes the same PNG bytes
          with and without offload.
update:   `refit serve --dit-layerwise-offload` on A: HTTP updates A->B (staged, first and later ones; in place),
          transformer checksum against `refit checksum` of the disk, a checkpoint with a truncated VAE refused with
          checksums unchanged, and the served image after the update against `refit generate` on B without offload.
Exits non-zero when a correctness check fails.
"""
import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from update_gpu import post  # same folder: JSON POST returning (status, reply)


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


def checkpoints(refit, work):
    ckpt = {}
    for name, seed in (("A", 1), ("B", 2)):
        ckpt[name] = work / f"klein-4b-{name}"
        if not (ckpt[name] / "model_index.json").exists():
            subprocess.run([refit, "make-model", "--preset", "flux2-klein-4b", "--seed", str(seed), "--out", str(ckpt[name])],
                           check=True, capture_output=True)
    return ckpt


def part_generate(a, ckpt, failures):
    rows = []
    for prefetch in (0, 1, 2):
        cmd = [a.bench_bin, str(ckpt["A"]), "--device", "cuda", "--size", "1024", "--steps", "4", "--repeat", "3"]
        if prefetch:
            cmd += ["--offload-prefetch", str(prefetch)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    # The pinned host-to-device ceiling of this machine, measured now: offload copies every block once per
    # transformer call, so with little compute per block the copies set the pace.
    ceiling = json.loads(subprocess.run([a.load_bin, str(ckpt["A"] / "transformer"), "--threads", "16", "--repeat", "3"],
                                        check=True, capture_output=True, text=True).stdout)["pinned_h2d_gbps"]["median"]
    base = rows[0]
    print(f"pinned host-to-device ceiling: {ceiling:.1f} GB/s")
    print(f"{'offload':>12} {'s/image':>8} {'x plain':>8} {'GB held':>8} {'GB peak':>8} {'peak x plain':>12} {'GB copied':>9} "
          f"{'copy GB/s':>9} {'x H2D':>6}")
    for r in rows:
        name = f"prefetch {int(r['offload_prefetch'])}" if r["offload_prefetch"] else "off"
        copied = r.get("offload_copied_bytes_per_image", 0) / 1e9
        rate = copied / r["median_s"]
        print(f"{name:>12} {r['median_s']:8.3f} {r['median_s'] / base['median_s']:8.3f} {r['device_bytes_after_load'] / 1e9:8.2f} "
              f"{r['device_bytes_peak_generating'] / 1e9:8.2f} {r['device_bytes_peak_generating'] / base['device_bytes_peak_generating']:12.3f} "
              f"{copied:9.2f} {rate:9.1f} {rate / ceiling:6.3f}")

    pngs = {}
    for offload in (False, True):
        out = a.work / f"fox-{'offload' if offload else 'plain'}.png"
        cmd = [a.refit_bin, "generate", "--model-path", str(ckpt["A"]), "--prompt", "a red fox in fresh snow", "--device", "cuda",
               "--size", "1024x1024", "--seed", "0", "-o", str(out)]
        if offload:
            cmd += ["--dit-layerwise-offload"]
        subprocess.run(cmd, check=True, capture_output=True)
        pngs[offload] = hashlib.sha256(out.read_bytes()).hexdigest()
    same = pngs[False] == pngs[True]
    print(f"refit generate 1024x1024 PNG sha256 without offload {pngs[False][:16]}, with offload {pngs[True][:16]}: "
          f"{'identical' if same else 'DIFFERENT'}")
    if not same:
        failures.append("images differ with and without offload")
    return {"runs": rows, "pinned_h2d_gbps": ceiling, "png_sha256": {"plain": pngs[False], "offload": pngs[True]}}


def part_update(a, ckpt, failures):
    work = a.work
    corrupt = work / "klein-4b-corrupt"
    if corrupt.exists():
        shutil.rmtree(corrupt)
    subprocess.run(["cp", "-al", str(ckpt["B"]), str(corrupt)], check=True)  # hard links: instant
    vae = next((corrupt / "vae").glob("*.safetensors"))
    data = vae.read_bytes()
    vae.unlink()
    vae.write_bytes(data[:-2])

    disk = {k: json.loads(subprocess.run([a.refit_bin, "checksum", str(ckpt[k]), "--dtype", "bf16", "--json"], check=True,
                                         capture_output=True, text=True).stdout) for k in ("A", "B")}
    port_file = work / "port-offload"
    port_file.unlink(missing_ok=True)
    log = open(work / "server-offload.log", "w")
    server = subprocess.Popen([a.refit_bin, "serve", "--model-path", str(ckpt["A"]), "--device", "cuda", "--port", "0",
                               "--port-file", str(port_file), "--dit-layerwise-offload"], stdout=log, stderr=subprocess.STDOUT)
    results = {}
    try:
        deadline = time.time() + 300
        while not port_file.exists() or not port_file.read_text().strip():
            if server.poll() is not None or time.time() > deadline:
                sys.exit("offload_gpu.py: server did not start; see " + str(work / "server-offload.log"))
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        gen = {"prompt": "a red fox in fresh snow", "size": "1024x1024", "seed": 0, "response_format": "b64_json"}

        def checksums():
            status, r = post(url, "/get_weights_checksum", {})
            assert status == 200, r
            return r

        def update(target, **extra):
            t = time.perf_counter()
            status, r = post(url, "/update_weights_from_disk", {"model_path": str(target), **extra})
            r["http_s"] = time.perf_counter() - t
            r["status"] = status
            return r

        if checksums() != disk["A"]:
            failures.append("server checksums after start differ from disk A")
        post(url, "/v1/images/generations", gen)
        updates = []
        for target, mode in (("B", "staged"), ("A", "staged"), ("B", "staged"), ("A", "in_place"), ("B", "in_place")):
            r = update(ckpt[target], mode=mode, weight_version=target)
            if r["status"] != 200:
                failures.append(f"update to {target} ({mode}) failed: {r}")
                continue
            ok = checksums() == disk[target]
            if not ok:
                failures.append(f"checksums after update to {target} ({mode}) differ from disk")
            tr = next(m for m in r["modules"] if m["name"] == "transformer")
            updates.append({"to": target, "mode": r["mode"], "total_s": r["timings"]["total"], "http_s": r["http_s"],
                            "pause_s": r["timings"].get("pause"), "stage_s": r["timings"].get("stage"),
                            "bytes": sum(m["bytes"] for m in r["modules"]), "transformer_s": tr["seconds"],
                            "checksums_equal_disk": ok})
        print(f"{'to':>3} {'mode':>9} {'total s':>8} {'stage s':>8} {'pause s':>8} {'GB/s':>6} checksums==disk")
        for u in updates:
            print(f"{u['to']:>3} {u['mode']:>9} {u['total_s']:8.3f} {u['stage_s'] or 0:8.3f} {u['pause_s'] or 0:8.4f} "
                  f"{u['bytes'] / u['total_s'] / 1e9:6.2f} {u['checksums_equal_disk']}")
        results["updates"] = updates

        before = checksums()
        bad = update(corrupt, weight_version="corrupt")
        unchanged = checksums() == before == disk["B"]
        print(f"truncated VAE: HTTP {bad['status']}, checksums unchanged: {unchanged}; message: {bad.get('message', '')[:160]}")
        if bad["status"] != 400 or not unchanged:
            failures.append("the corrupted checkpoint was not refused cleanly")
        results["corrupted"] = {"status": bad["status"], "unchanged": unchanged}

        status, img = post(url, "/v1/images/generations", gen)
        served = base64.b64decode(img["data"][0]["b64_json"])
        info = get(url, "/get_model_info")
        results["offload_info"] = info.get("layerwise_offload")
    finally:
        server.terminate()
        server.wait(timeout=120)
    out = work / "fox-B-plain.png"
    subprocess.run([a.refit_bin, "generate", "--model-path", str(ckpt["B"]), "--prompt", gen["prompt"], "--device", "cuda",
                    "--size", "1024x1024", "--seed", "0", "-o", str(out)], check=True, capture_output=True)
    same = out.read_bytes() == served
    print(f"image served after the update with offload == `refit generate` on B without offload: {same}")
    if not same:
        failures.append("the image after the update differs from a fresh pipeline's on B")
    results["image_after_update_equals_fresh"] = same
    print("offload state:", json.dumps(results["offload_info"]))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["generate", "update"], required=True)
    ap.add_argument("--refit-bin", default="build-gpu/apps/refit")
    ap.add_argument("--bench-bin", default="build-gpu/bench/bench_generate")
    ap.add_argument("--load-bin", default="build-gpu/bench/bench_device_load")
    ap.add_argument("--work", type=Path, default=Path("/tmp/refit-update-bench"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoints(a.refit_bin, a.work)
    failures = []
    results = part_generate(a, ckpt, failures) if a.part == "generate" else part_update(a, ckpt, failures)
    results["failures"] = failures
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
