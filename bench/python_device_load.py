#!/usr/bin/env python3
"""The Python reference path for loading weights to a GPU, as SGLang's updater does it: safetensors
safe_open + get_tensor + param.copy_ into CUDA tensors of the same shapes, on the same files.

    python3 bench/python_device_load.py COMPONENT_DIR [--repeat 3]   -> JSON with GB/s (best, median)
"""
import argparse
import glob
import json
import os
import statistics
import time

import torch
from safetensors import safe_open


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.dir, "*.safetensors")))
    params = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                params[k] = torch.empty(sl.get_shape(), dtype=getattr(torch, {"BF16": "bfloat16", "F32": "float32", "F16": "float16", "I64": "int64"}[sl.get_dtype()]), device="cuda")
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    runs = []
    for r in range(a.repeat + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for f in files:
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    params[k].copy_(h.get_tensor(k))
        torch.cuda.synchronize()
        if r > 0:
            runs.append(time.perf_counter() - t)
    print(json.dumps({"bytes": nbytes, "python_gbps": {"best": nbytes / min(runs) / 1e9, "median": nbytes / statistics.median(runs) / 1e9}}))


if __name__ == "__main__":
    main()
