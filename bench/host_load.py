#!/usr/bin/env python3
"""Host-load benchmark: refit's load_to_host vs Python's safetensors.torch.load_file, same files, same run.

    python3 bench/host_load.py [--dir DIR] [--size-gb 2.2] [--bench-bin PATH] [--repeat 5] [--threads N]

Writes (or reuses) a sharded Diffusers-style component folder of random FLUX-like weights, warms the
page cache, then per repetition runs, back to back so they see the same cache state:
  * Python, in a fresh subprocess: load_file on every shard with the default (mmap) backend, timing
    only the load calls; then touching every page of the result (mmap maps lazily, so load_file alone
    copies nothing); and, in another subprocess, load_file(backend="pread"), which copies like refit;
  * `bench_host_load --json --repeat 1`: the page-cache read ceiling and refit's loader.
Prints GB/s (1e9 bytes) and ratios, best and median. Exits non-zero only on errors, not on a missed
goal. Record each run in bench/RESULTS.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HIDDEN, MLP, HEAD_DIM = 3072, 9216, 128
SHARD_BYTES = 10**9
PREFIX = "diffusion_pytorch_model"

# Runs in a fresh interpreter per repetition, so the previous repetition's memory is gone.
PYTHON_LOAD = r"""
import json, sys, time, torch
from safetensors.torch import load_file
files, backend, touch = json.loads(sys.argv[1])
start = time.perf_counter()
loaded = [load_file(f, backend=backend) for f in files]
load_s = time.perf_counter() - start
touch_s = 0.0
if touch:
    start = time.perf_counter()
    for tensors in loaded:
        for t in tensors.values():
            flat = t.reshape(-1).view(torch.uint8)
            flat[::4096].sum(); flat[-1:].sum()  # one byte per page, and the tail page
    touch_s = time.perf_counter() - start
nbytes = sum(t.numel() * t.element_size() for d in loaded for t in d.values())
print(json.dumps({"load_s": load_s, "touch_s": touch_s, "bytes": nbytes, "tensors": sum(map(len, loaded))}))
"""


def plan_tensors(size_gb):
    """(name, shape, dtype) of a FLUX-like transformer, whole blocks until the size is reached."""
    import torch
    bf16, f32 = torch.bfloat16, torch.float32
    plan = [("x_embedder.weight", (HIDDEN, 64), bf16), ("x_embedder.bias", (HIDDEN,), f32),
            ("context_embedder.weight", (HIDDEN, 4096), bf16), ("proj_out.weight", (64, HIDDEN), bf16)]
    total, block = 0, 0
    while total < size_gb * 1e9:
        p = f"transformer_blocks.{block}."
        block_tensors = [(p + "norm1.linear.weight", (6 * HIDDEN, HIDDEN), bf16)]
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            block_tensors += [(p + f"attn.{proj}.weight", (HIDDEN, HIDDEN), bf16), (p + f"attn.{proj}.bias", (HIDDEN,), f32)]
        block_tensors += [(p + "attn.norm_q.weight", (HEAD_DIM,), f32), (p + "attn.norm_k.weight", (HEAD_DIM,), f32),
                          (p + "ff.net.0.proj.weight", (MLP, HIDDEN), bf16), (p + "ff.net.0.proj.bias", (MLP,), f32),
                          (p + "ff.net.2.weight", (HIDDEN, MLP), bf16), (p + "ff.net.2.bias", (HIDDEN,), f32)]
        plan += block_tensors
        total = sum(nbytes(shape, dt) for _, shape, dt in plan)
        block += 1
    return plan


def nbytes(shape, dt):
    import math
    return math.prod(shape) * dt.itemsize


def split_shards(plan):
    shards = [[]]
    for entry in plan:
        if shards[-1] and sum(nbytes(s, d) for _, s, d in shards[-1]) + nbytes(entry[1], entry[2]) > SHARD_BYTES:
            shards.append([])
        shards[-1].append(entry)
    n = len(shards)
    return {f"{PREFIX}-{k + 1:05d}-of-{n:05d}.safetensors": s for k, s in enumerate(shards)}


def ensure_checkpoint(folder, size_gb):
    """Returns the shard paths; writes the checkpoint unless the folder already holds this one."""
    import torch
    from safetensors.torch import save_file
    shards = split_shards(plan_tensors(size_gb))
    total = sum(nbytes(s, d) for entries in shards.values() for _, s, d in entries)
    index_path = folder / f"{PREFIX}.safetensors.index.json"
    paths = [folder / name for name in shards]
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("metadata", {}).get("total_size") == total and all(p.exists() for p in paths):
            print(f"reusing checkpoint in {folder}", flush=True)
            return paths
    folder.mkdir(parents=True, exist_ok=True)
    index_path.unlink(missing_ok=True)  # written last: its presence marks a complete checkpoint
    torch.manual_seed(0)
    weight_map = {}
    for path, entries in zip(paths, shards.values()):
        print(f"writing {path} ({len(entries)} tensors)", flush=True)
        tensors = {name: torch.randn(shape, dtype=dt) for name, shape, dt in entries}
        tmp = path.with_name("." + path.name)  # refit's layout reader skips dot files
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        del tensors
        weight_map.update({name: path.name for name, _, _ in entries})
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "note": "random bench weights"}))
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths


def warm_page_cache(paths):
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def run_json(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"host_load.py: {what} failed (exit {r.returncode}):\n{r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="component folder (default: a reusable folder under /tmp)")
    ap.add_argument("--size-gb", type=float, default=2.2)
    ap.add_argument("--bench-bin", type=Path, default=Path("build/bench/bench_host_load"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="refit and ceiling threads (default: all cores)")
    args = ap.parse_args()
    if not args.bench_bin.exists():
        sys.exit(f"host_load.py: {args.bench_bin} not found; build it with cmake --build build --target bench_host_load")
    folder = args.dir or Path(tempfile.gettempdir()) / f"refit-bench-host-load-{args.size_gb:g}gb"

    paths = ensure_checkpoint(folder, args.size_gb)
    warm_page_cache(paths)
    files = [str(p) for p in paths]
    bench_cmd = [str(args.bench_bin), str(folder), "--json", "--repeat", "1"]
    if args.threads:
        bench_cmd += ["--threads", str(args.threads)]

    refit_modes = ("refit_copy", "refit_reuse", "refit_mapped", "refit_mapped_touch")
    gbps = {k: [] for k in ("ceiling", "py_mmap", "py_mmap_touch", "py_pread") + refit_modes}
    for rep in range(args.repeat):
        mmap = run_json([sys.executable, "-c", PYTHON_LOAD, json.dumps([files, "mmap", True])], "python load_file (mmap)")
        pread = run_json([sys.executable, "-c", PYTHON_LOAD, json.dumps([files, "pread", False])], "python load_file (pread)")
        ours = run_json(bench_cmd, "bench_host_load")
        size = ours["tensor_bytes"]
        for py in (mmap, pread):
            if py["bytes"] != size or py["tensors"] != ours["tensors"]:
                sys.exit(f"host_load.py: python loaded {py['tensors']} tensors / {py['bytes']} bytes, "
                         f"refit {ours['tensors']} / {size}")
        gbps["ceiling"].append(ours["ceiling"]["best_gbps"])
        for mode in refit_modes:
            gbps[mode].append(ours[mode]["best_gbps"])
        gbps["py_mmap"].append(size / mmap["load_s"] / 1e9)
        gbps["py_mmap_touch"].append(size / (mmap["load_s"] + mmap["touch_s"]) / 1e9)
        gbps["py_pread"].append(size / pread["load_s"] / 1e9)
        print(f"repetition {rep + 1}/{args.repeat}: " + "  ".join(f"{k} {v[-1]:.2f}" for k, v in gbps.items()), flush=True)

    best = {k: max(v) for k, v in gbps.items()}
    median = {k: statistics.median(v) for k, v in gbps.items()}
    print(f"\ncheckpoint {folder}: {len(files)} shards, {ours['tensors']} tensors, {size} tensor bytes "
          f"({ours['file_bytes']} file bytes); refit threads {ours['threads']}, {args.repeat} repetitions")
    rows = [("page-cache ceiling (pread, pre-touched buffer)", "ceiling"),
            ("python load_file (default: lazy mmap)", "py_mmap"),
            ("python load_file + touch every page", "py_mmap_touch"),
            ("python load_file(backend='pread')", "py_pread"),
            ("refit load_to_host (copy, fresh tensors)", "refit_copy"),
            ("refit read_into (copy, reused tensors)", "refit_reuse"),
            ("refit load_to_host (mapped)", "refit_mapped"),
            ("refit load_to_host (mapped) + touch", "refit_mapped_touch")]
    print(f"| {'GB/s':<48} | {'best':>8} | {'median':>8} |\n|{'-' * 50}|{'-' * 10}|{'-' * 10}|")
    for label, key in rows:
        print(f"| {label:<48} | {best[key]:8.2f} | {median[key]:8.2f} |")
    # Like for like: lazy against lazy, touched against touched, copying against copying.
    pairs = [("refit mapped / python load_file", "refit_mapped", "py_mmap"),
             ("refit mapped+touch / python load_file+touch", "refit_mapped_touch", "py_mmap_touch"),
             ("refit copy / python pread", "refit_copy", "py_pread"),
             ("refit reused copy / python pread", "refit_reuse", "py_pread"),
             ("refit reused copy / page-cache ceiling", "refit_reuse", "ceiling")]
    print(f"\n| {'ratio':<48} | {'best':>8} | {'median':>8} |\n|{'-' * 50}|{'-' * 10}|{'-' * 10}|")
    for label, ours_key, peer in pairs:
        print(f"| {label:<48} | {best[ours_key] / best[peer]:8.3f} | {median[ours_key] / median[peer]:8.3f} |")
    verdicts = [(label, median[o] >= median[p]) for label, o, p in pairs[:4]]
    print("\ngoal refit >= python (median, like for like): " +
          ", ".join(f"{label.split(' / ')[0]} {'MET' if ok else 'NOT MET'}" for label, ok in verdicts))


if __name__ == "__main__":
    main()
