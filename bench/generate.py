#!/usr/bin/env python3
"""Time per image: refit's FLUX.2-klein pipeline against Diffusers, eager and torch.compile, same checkpoint, same run.

    python3 bench/generate.py MODEL_DIR [--device cuda] [--size 1024] [--steps 4] [--repeat 3]
        [--bench-bin build/bench/bench_generate] [--attention auto,flash] [--compile] [--profile]
        [--work DIR] [--out results.json]

Each pipeline loads the model once, generates one warm-up image (for torch.compile: the compilation), then times
`repeat` images (synchronised). refit runs once per attention kernel choice (pipeline/models/compute_tuning.hpp)
on the same loaded model. Prints seconds per image, best and median, each
one's ratio to Diffusers eager and to Diffusers compiled (below 1: refit is faster), and how far each image is from
Diffusers eager's (largest and mean difference of 8-bit pixels; same prompt, seed and initial noise). --profile adds
the GPU time per kernel of one image, refit's (each choice) and Diffusers eager's, grouped by kind, and the first
choice's whole profiler trace (CPU and GPU timeline) as WORK/refit-trace.json.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

DIFFUSERS = r"""
import json, sys, time, torch
import numpy as np
from PIL import Image
from diffusers import Flux2KleinPipeline
model, device, size, steps, repeat, mode, png, profile = sys.argv[1:9]
size, steps, repeat = int(size), int(steps), int(repeat)
dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
t0 = time.perf_counter()
pipe = Flux2KleinPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
pipe.set_progress_bar_config(disable=True)
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
sync()
load_s = time.perf_counter() - t0
if mode == "compile":
    pipe.transformer = torch.compile(pipe.transformer)
kw = dict(prompt="a photograph of a red fox in fresh snow, golden hour", height=size, width=size,
          num_inference_steps=steps, output_type="np")
t = time.perf_counter()
pipe(generator=torch.Generator("cpu").manual_seed(0), **kw)
sync()
warmup_s = time.perf_counter() - t
runs = []
for i in range(repeat):
    t = time.perf_counter()
    out = pipe(generator=torch.Generator("cpu").manual_seed(0), **kw)
    sync()
    runs.append(time.perf_counter() - t)
    if i == 0 and png:
        Image.fromarray((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)).save(png)
result = {"load_s": load_s, "warmup_s": warmup_s, "runs_s": runs}
if profile == "1":
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe(generator=torch.Generator("cpu").manual_seed(0), **kw)
        sync()
    kernels = {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            n, ms = kernels.get(e.name(), (0, 0.0))
            kernels[e.name()] = (n + 1, ms + e.duration_ns() / 1e6)
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    result["profile"] = {"gpu_busy_ms": sum(v[1] for v in kernels.values()),
                         "kernels": [{"name": k[:160], "count": v[0], "ms": v[1]} for k, v in rows]}
print(json.dumps(result))
"""

# Kernel name -> kind, first match wins (cuBLAS/CUTLASS GEMMs, the attention kernels, convolutions, norms, copies).
KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*sdp|softmax"),
    ("convolution", r"conv|implicit_gemm|wgrad|dgrad|nchwToNhwc|nhwcToNchw|cudnn"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul"),
    ("norm", r"norm|rms|welford"),
    ("copy / cat / transpose", r"copy|cat|Memcpy|Memset|transpose|permute|contiguous|direct_copy"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|mul|add|reduce"),
]


def kind_of(name):
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def summarise(profile):
    by_kind = {}
    for k in profile["kernels"]:
        by_kind[kind_of(k["name"])] = by_kind.get(kind_of(k["name"]), 0.0) + k["ms"]
    return by_kind


def run_json(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"generate.py: {what} failed ({r.returncode}):\n{r.stderr[-4000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def png_of(work, row):
    """The image a table row's pipeline wrote: "refit cudnn" -> refit-cudnn.png, "diffusers eager" -> diffusers-eager.png."""
    return work / (row.replace(" ", "-") + ".png")


def pixel_diff(a_png, b_png):
    import numpy as np
    from PIL import Image
    a = np.asarray(Image.open(a_png).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(b_png).convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        return None
    d = np.abs(a - b)
    return {"max_abs": int(d.max()), "mean_abs": float(d.mean())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--bench-bin", default="build/bench/bench_generate")
    ap.add_argument("--attention", default="auto", help="refit's attention kernel choices, comma-separated (auto, cudnn, flash, ...)")
    ap.add_argument("--compile", action="store_true", help="also Diffusers with torch.compile (of the transformer, default mode)")
    ap.add_argument("--profile", action="store_true", help="GPU time per kernel of one image, refit's and Diffusers eager's")
    ap.add_argument("--work", default="/tmp/refit-generate-bench")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    common = [a.model, a.device, str(a.size), str(a.steps), str(a.repeat)]

    ours_cmd = [a.bench_bin, a.model, "--device", a.device, "--size", str(a.size), "--steps", str(a.steps),
                "--repeat", str(a.repeat), "--attention", a.attention, "--png-prefix", str(work / "refit-")]
    ours = run_json(ours_cmd + (["--profile", "--trace", str(work / "refit-trace.json")] if a.profile else []), "bench_generate")
    eager = run_json([sys.executable, "-c", DIFFUSERS, *common, "eager", str(png_of(work, "diffusers eager")),
                      "1" if a.profile else "0"], "diffusers eager")
    report(a, ours, eager, None, work)  # before compiling, which takes long: these numbers are safe first
    if a.compile:
        compiled = run_json([sys.executable, "-c", DIFFUSERS, *common, "compile", str(png_of(work, "diffusers compile")), "0"],
                            "diffusers torch.compile")
        if compiled:
            print()
            report(a, ours, eager, compiled, work)


def report(a, ours, eager, compiled, work):
    rows = {}
    if ours:
        for name, r in ours["attention"].items():
            rows[f"refit {name}"] = dict(r, load_s=ours["load_s"])
    if eager:
        rows["diffusers eager"] = eager
    if compiled:
        rows["diffusers compile"] = compiled
    print(f"{a.model}: {a.size}x{a.size}, {a.steps} steps, {a.device}, {a.repeat} timed images after one warm-up")
    print(f"| {'pipeline':<30} | {'load s':>7} | {'best s/img':>10} | {'median s/img':>12} | {'/ eager':>7} | {'/ compile':>9} | {'pixels vs eager (max, mean)':>27} |")
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 12}|{'-' * 14}|{'-' * 9}|{'-' * 11}|{'-' * 29}|")
    summary = {}
    for name, r in rows.items():
        med = statistics.median(r["runs_s"])
        vs_eager = med / statistics.median(eager["runs_s"]) if eager else float("nan")
        vs_compile = med / statistics.median(compiled["runs_s"]) if compiled else float("nan")
        png = png_of(work, name)
        diff = pixel_diff(png, png_of(work, "diffusers eager")) if eager and png.exists() else None
        diff_s = f"{diff['max_abs']:>3}, {diff['mean_abs']:.3f}" if diff else "-"
        print(f"| {name:<30} | {r['load_s']:7.2f} | {min(r['runs_s']):10.3f} | {med:12.3f} | {vs_eager:7.3f} | {vs_compile:9.3f} | {diff_s:>27} |")
        summary[name] = {"median_s": med, "over_eager": vs_eager, "over_compile": vs_compile, "pixels_vs_eager": diff}
    refit_rows = [n for n in rows if n.startswith("refit")]
    for name in refit_rows[1:]:  # the attention kernels against each other: the spread of bf16 rounding alone
        first = refit_rows[0]
        diff = pixel_diff(png_of(work, name), png_of(work, first))
        if diff:
            print(f"{name} against {first}: pixels differ by at most {diff['max_abs']}, {diff['mean_abs']:.3f} on average")
            summary[name]["pixels_vs_first_refit"] = diff
    if compiled:
        print(f"\ndiffusers torch.compile: first call (compilation) {compiled['warmup_s']:.1f} s")
    elif a.profile:
        profiles = {f"refit {n}": r["profile"] for n, r in (ours or {}).get("attention", {}).items() if "profile" in r}
        if eager and "profile" in eager:
            profiles["diffusers eager"] = eager["profile"]
        for name, p in profiles.items():
            kinds = summarise(p)
            print(f"\nGPU time of one image, {name}: {p['gpu_busy_ms']:.1f} ms busy" +
                  (f" in {p['wall_s'] * 1e3:.1f} ms" if "wall_s" in p else "") + "; by kind: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
            for k in p["kernels"][:12]:
                print(f"    {k['ms']:8.2f} ms {k['count']:6d}x  {k['name'][:110]}")
    sys.stdout.flush()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"refit": ours, "diffusers": eager, "diffusers_compile": compiled, "summary": summary}, f, indent=1)

if __name__ == "__main__":
    main()
