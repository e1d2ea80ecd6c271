#!/usr/bin/env python3
"""Colocated trainer (issue 15) on one GPU: a trainer process holding FLUX.2-klein-4B (every module, 16 GB) on the
same GPU as `refit serve` shares its tensors over CUDA IPC (POST /update_weights_from_tensor, SGLang's payload:
torch's multiprocessing reductions, base64), then asks refit to release and resume its device memory. Measured in
the same run:

  * the device-to-device copy of the same 16 GB inside the trainer (torch clone): the ceiling of staging;
  * refit's update end to end, per tensor and as flattened buckets, with the reply's phase timings and the pause;
  * release: the GPU memory refit uses before and after (cudaMemGetInfo, from the trainer's side as well);
  * resume against the pinned host-to-device rate measured in the trainer;
  * correctness: /get_weights_checksum after the update equals SGLang's formula over the trainer's tensors; with a
    LoRA merged, a release/resume round trip leaves it unchanged and an unmerge afterwards gives the base back.

Run on the GPU machine after `scripts/device-build refit`:
    python3 bench/colocated_gpu.py --refit-bin build-gpu/apps/refit --model /tmp/flux2-klein-4b [--repeat 3]
"""
import argparse
import base64
import hashlib
import io
import json
import statistics
import tempfile
import time
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)
from safetensors.torch import load_file

from lora_gpu import linear_weights, write_adapter
from serving import ensure_model, post, refit_server

MODULES = ("text_encoder", "transformer", "vae")


def payload(obj):
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


def bucket(named):
    """SGLang's FlattenedTensorBucket layout, one per dtype: a uint8 buffer plus metadata objects."""
    import types
    flat = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in named])
    meta, offset = [], 0
    for name, t in named:
        n = t.numel() * t.element_size()
        meta.append(types.SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=offset, end_idx=offset + n, numel=n))
        offset += n
    return {"flattened_tensor": flat, "metadata": meta}


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # the VAE's BatchNorm buffers: not in SGLang's formula


def sglang_checksum(named):
    """SGLang's compute_weights_checksum: the parameters (no buffers) by name, name bytes then raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(((n, t) for n, t in named if not n.endswith(BUFFERS)), key=lambda x: x[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gpu_used():
    free, total = torch.cuda.mem_get_info()
    return total - free


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refit-bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    ensure_model(a.refit_bin, a.model)
    torch.cuda.set_device(0)
    results = {}
    by_module = {}
    for m in MODULES:
        sd = {}
        for f in sorted((Path(a.model) / m).glob("*.safetensors")):
            sd.update(load_file(str(f), device="cuda:0"))
        # The trainer's new weights: the checkpoint, slightly changed, in the dtype refit holds (bf16).
        by_module[m] = [(k, (v.float() * 1.001).to(torch.bfloat16) if v.is_floating_point() else v) for k, v in sorted(sd.items())]
    total = sum(t.numel() * t.element_size() for ts in by_module.values() for _, t in ts)
    results["bytes"] = total
    print(f"trainer: {sum(len(v) for v in by_module.values())} tensors, {total / 1e9:.2f} GB on cuda:0", flush=True)

    # Ceilings, measured here: a D2D copy of the same tensors, and the pinned H2D rate.
    d2d = []
    for _ in range(a.repeat + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        copies = [t.clone() for ts in by_module.values() for _, t in ts]
        torch.cuda.synchronize()
        d2d.append(time.perf_counter() - t0)
        del copies
    results["d2d_copy_s"] = statistics.median(d2d[1:])
    pinned = torch.empty(2 << 30, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(pinned, device="cuda:0")
    h2d = []
    for _ in range(a.repeat + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        h2d.append(pinned.numel() / (time.perf_counter() - t0))
    results["pinned_h2d_gbps"] = statistics.median(h2d[1:]) / 1e9
    del pinned, dev
    torch.cuda.empty_cache()
    print(f"ceilings: D2D copy of {total / 1e9:.2f} GB {results['d2d_copy_s']:.4f} s; pinned H2D {results['pinned_h2d_gbps']:.1f} GB/s",
          flush=True)

    work = Path(tempfile.mkdtemp(prefix="refit-colocated-bench-"))
    with refit_server(a.refit_bin, ["--model-path", a.model, "--device", "cuda:0"], work) as url:
        runs = {"per_tensor": [], "bucket": []}
        for r in range(a.repeat + 1):
            for mode in runs:
                if mode == "per_tensor":
                    obj = {m: ts for m, ts in by_module.items()}
                    body = {"serialized_named_tensors": [payload(obj)], "weight_version": f"{mode}-{r}"}
                else:
                    obj = {m: bucket(ts) for m, ts in by_module.items()}
                    body = {"serialized_named_tensors": [payload(obj)], "load_format": "flattened_bucket", "weight_version": f"{mode}-{r}"}
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                status, reply = post(url, "/update_weights_from_tensor", body)
                s = time.perf_counter() - t0
                assert status == 200, reply
                del obj
                if r:
                    runs[mode].append({"end_to_end_s": s, **reply["timings"]})
        results["update"] = {mode: {k: statistics.median(x.get(k, 0.0) for x in xs) for k in xs[0]} for mode, xs in runs.items()}
        print("update:", results["update"], flush=True)
        _, sums = post(url, "/get_weights_checksum", {})
        results["checksum_matches"] = {m: sums[m] == sglang_checksum(by_module[m]) for m in MODULES}
        print("checksums equal the trainer's:", results["checksum_matches"], flush=True)
        assert all(results["checksum_matches"].values()), (results["checksum_matches"], sums)

        # A rank-16 LoRA merged before the release: its kept base values must leave the GPU too, and come back.
        adapter = work / "adapter"
        write_adapter(adapter, linear_weights(Path(a.model) / "transformer"), 16, seed=1)
        status, reply = post(url, "/v1/set_lora", {"lora_nickname": "bench", "lora_path": str(adapter)})
        assert status == 200, reply
        _, merged = post(url, "/get_weights_checksum", {})

        mem = []
        for r in range(a.repeat):
            before = gpu_used()
            status, rel = post(url, "/release_memory_occupation", {})
            assert status == 200 and rel["sleeping"], rel
            released = gpu_used()
            status, gen = post(url, "/v1/images/generations", {"prompt": "a fox", "size": "256x256", "num_inference_steps": 2})
            assert status == 503, (status, gen)
            t0 = time.perf_counter()
            status, res = post(url, "/resume_memory_occupation", {})
            resume_s = time.perf_counter() - t0
            assert status == 200 and not res["sleeping"], res
            mem.append({"release_s": rel["seconds"], "moved_bytes": rel["moved_bytes"], "gpu_used_before": before,
                        "gpu_used_released": released, "freed_bytes": before - released, "resume_s": res["seconds"],
                        "resume_end_to_end_s": resume_s, "resume_gbps": res["moved_bytes"] / res["seconds"] / 1e9})
        results["memory"] = {k: statistics.median(x[k] for x in mem) for k in mem[0]}
        results["memory"]["first_release_s"] = mem[0]["release_s"]
        _, after = post(url, "/get_weights_checksum", {})
        results["checksum_after_round_trip_unchanged"] = after == merged
        assert after == merged, (after, merged)
        status, reply = post(url, "/v1/unmerge_lora_weights", {})
        assert status == 200, reply
        _, unmerged = post(url, "/get_weights_checksum", {})
        results["unmerge_after_round_trip_gives_base"] = unmerged["transformer"] == sums["transformer"]
        assert results["unmerge_after_round_trip_gives_base"], (unmerged, sums)
        status, gen = post(url, "/v1/images/generations", {"prompt": "a fox", "size": "256x256", "num_inference_steps": 2, "seed": 1})
        results["generates_after_resume"] = status == 200
    gb = total / 1e9
    print()
    print(f"| {gb:.2f} GB, trainer and refit on one H200                 | seconds | ratio |")
    print("|----------------------------------------------------------|---------|-------|")
    print(f"| D2D copy of the same tensors in the trainer (ceiling)     | {results['d2d_copy_s']:7.4f} | 1.000 |")
    for mode, t in results["update"].items():
        print(f"| refit update {mode:10} end to end                      | {t['end_to_end_s']:7.4f} | {t['end_to_end_s'] / results['d2d_copy_s']:5.2f} |")
        print(f"|   plan {t.get('plan', 0):.4f}, receive (open handles) {t.get('receive', 0):.4f}, validate {t.get('validate', 0):.4f}, "
              f"stage {t.get('stage', 0):.4f}, pause {t.get('pause', 0) * 1e3:.1f} ms")
    m = results["memory"]
    print(f"| release (LoRA merged): {m['moved_bytes'] / 1e9:.2f} GB to pinned host memory   | {m['release_s']:7.3f} |       |"
          f" (first {m['first_release_s']:.3f} s)")
    print(f"|   GPU memory in use: {m['gpu_used_before'] / 1e9:.2f} GB before, {m['gpu_used_released'] / 1e9:.2f} GB released "
          f"({m['freed_bytes'] / 1e9:.2f} GB freed; the trainer's own {gb:.2f} GB included)")
    print(f"| resume: {m['resume_gbps']:.1f} GB/s vs pinned H2D {results['pinned_h2d_gbps']:.1f} GB/s           | {m['resume_s']:7.3f} |"
          f" {m['resume_gbps'] / results['pinned_h2d_gbps']:5.2f} |")
    print("checksums after the update equal the trainer's:", results["checksum_matches"],
          "| unchanged after release/resume:", results["checksum_after_round_trip_unchanged"],
          "| unmerge afterwards gives the base:", results["unmerge_after_round_trip_gives_base"],
          "| generates after resume:", results["generates_after_resume"])
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
