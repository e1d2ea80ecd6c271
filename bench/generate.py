#!/usr/bin/env python3
"""Time per image: refit's FLUX.2-klein pipeline against Diffusers (eager) on the same checkpoint, same run.

    python3 bench/generate.py MODEL_DIR [--device cuda] [--size 1024] [--steps 4] [--repeat 3]
        [--bench-bin build/bench/bench_generate] [--out results.json]

Both load the model once, generate one warm-up image, then time `repeat` images (synchronised). Prints
seconds per image, best and median, and the ratio Diffusers / refit (above 1: refit is faster).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

DIFFUSERS = r"""
import json, sys, time, torch
from diffusers import Flux2KleinPipeline
model, device, size, steps, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
t0 = time.perf_counter()
pipe = Flux2KleinPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
pipe.set_progress_bar_config(disable=True)
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
sync()
load_s = time.perf_counter() - t0
kw = dict(prompt="a photograph of a red fox in fresh snow, golden hour", height=size, width=size,
          num_inference_steps=steps, output_type="np")
pipe(generator=torch.Generator("cpu").manual_seed(0), **kw)
sync()
runs = []
for _ in range(repeat):
    t = time.perf_counter()
    pipe(generator=torch.Generator("cpu").manual_seed(0), **kw)
    sync()
    runs.append(time.perf_counter() - t)
print(json.dumps({"load_s": load_s, "runs_s": runs}))
"""


def run_json(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"generate.py: {what} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--bench-bin", default="build/bench/bench_generate")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    ours = run_json([a.bench_bin, a.model, "--device", a.device, "--size", str(a.size), "--steps", str(a.steps),
                     "--repeat", str(a.repeat)], "bench_generate")
    ref = run_json([sys.executable, "-c", DIFFUSERS, a.model, a.device, str(a.size), str(a.steps), str(a.repeat)], "diffusers")
    rows = {"refit": ours, "diffusers eager": ref}
    print(f"{a.model}: {a.size}x{a.size}, {a.steps} steps, {a.device}, {a.repeat} timed images after one warm-up")
    print(f"| {'pipeline':<16} | {'load s':>8} | {'best s/img':>10} | {'median s/img':>12} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 12}|{'-' * 14}|")
    for name, r in rows.items():
        print(f"| {name:<16} | {r['load_s']:8.2f} | {min(r['runs_s']):10.3f} | {statistics.median(r['runs_s']):12.3f} |")
    ratio = statistics.median(ref["runs_s"]) / statistics.median(ours["runs_s"])
    print(f"\ndiffusers / refit time per image (median): {ratio:.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"refit": ours, "diffusers": ref, "ratio_diffusers_over_refit": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
