#!/usr/bin/env python3
"""Distributed weight updates (issue 14) on two GPUs: a trainer on GPU 0 broadcasts FLUX.2-klein-4B (every module,
16 GB) to `refit serve` on GPU 1 over NCCL. Measured in the same run:

  * torch's own broadcast of the same tensors between the same two GPUs (a bare receiving rank on GPU 1): the ceiling;
  * refit's update end to end (POST /update_weights_from_distributed to its reply, the broadcast included), one
    broadcast per tensor and one flattened bucket, with the reply's phase timings;
  * the same updates while a client keeps generating: the pause it sees, and how long the update waited for the
    denoising work in flight ("drain");
  * refit's disk path (update_weights_from_disk of the same checkpoint, warm page cache);
  * correctness: after pushing perturbed weights, refit's /get_weights_checksum equals SGLang's checksum formula over
    the trainer's tensors; a trainer that sends one tensor short fails the update within --weight-sync-timeout, leaves
    the weights as they were, and a new group works afterwards.

Run on the GPU machine (2 GPUs) after `scripts/device-build refit`:
    python3 bench/distributed_gpu.py --refit-bin build-gpu/apps/refit --model /tmp/flux2-klein-4b [--repeat 3]
"""
import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))
from refit_trainer import WeightGroup, WeightSync, _post_all, flatten  # noqa: E402
from serving import post, refit_server  # noqa: E402

MODULES = ("text_encoder", "transformer", "vae")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sglang_checksum(named):
    """SGLang's compute_weights_checksum formula: sha256 over (name, bytes) sorted by name."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda x: x[0]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def peer(port, spec_file, repeat):
    """Rank 1 on GPU 1 for torch's own broadcast: receives the tensors per tensor, then as one bucket, repeat + 1 times."""
    torch.cuda.set_device(1)
    spec = json.loads(Path(spec_file).read_text())
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=300))
    opts = dist.ProcessGroupNCCL.Options()
    pg = dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", dist.PrefixStore("peer/", dist.PrefixStore("peer", store))), 1, 2, opts)
    bufs = [torch.empty(s, dtype=getattr(torch, d), device="cuda:1") for d, s in spec["tensors"]]
    bucket = torch.empty(spec["bytes"], dtype=torch.uint8, device="cuda:1")
    done = torch.zeros(1, device="cuda:1")
    bo = dist.BroadcastOptions()
    bo.rootRank = 0
    for _ in range(repeat + 1):
        for group in (bufs, [bucket]):
            for w in [pg.broadcast([b], bo) for b in group]:
                w.wait()
            pg.allreduce([done]).wait()
    torch.cuda.synchronize()
    pg.abort()


def timed_broadcast(pg_group, tensors):
    """Rank 0: all broadcasts posted then awaited, then a one-element allreduce so that rank 1 has them too."""
    t0 = time.perf_counter()
    pg_group.broadcast(tensors)
    done = torch.zeros(1, device="cuda:0")
    pg_group._pg.allreduce([done]).wait()
    torch.cuda.synchronize(0)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refit-bin")
    ap.add_argument("--model", default="/tmp/flux2-klein-4b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--peer", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer:
        return peer(a.peer, a.spec, a.repeat)
    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    model = Path(a.model)
    if not (model / "model_index.json").exists():
        subprocess.run([a.refit_bin, "make-model", "--preset", "flux2-klein-4b", "--seed", "1", "--out", str(model)], check=True)
    torch.cuda.set_device(0)
    named = []
    for m in MODULES:
        for f in sorted((model / m).glob("*.safetensors")):
            named += [(f"{m}.{n}", t) for n, t in sorted(load_file(str(f), device="cuda:0").items())]
    tensors = [t for _, t in named]
    total = sum(t.numel() * t.element_size() for t in tensors)
    bucket = flatten(tensors)
    print(f"trainer: {len(named)} tensors, {total / 1e9:.2f} GB on cuda:0", flush=True)
    results = {"bytes": total, "tensors": len(named)}

    # --- torch's own broadcast, GPU 0 -> GPU 1 (the ceiling)
    work = Path(tempfile.mkdtemp(prefix="refit-dist-bench-"))
    spec = work / "spec.json"
    spec.write_text(json.dumps({"tensors": [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors], "bytes": total}))
    port = free_port()
    rank1 = subprocess.Popen([sys.executable, __file__, "--peer", str(port), "--spec", str(spec), "--repeat", str(a.repeat)])
    g = WeightGroup("127.0.0.1", port, 2, "peer", "nccl", timedelta(seconds=300), "cuda:0")
    peer_t = {"per_tensor": [], "bucket": []}
    for r in range(a.repeat + 1):
        for mode, ts in (("per_tensor", tensors), ("bucket", [bucket])):
            s = timed_broadcast(g, ts)
            print(f"torch broadcast {mode} round {r}: {s:.3f} s", flush=True)
            if r:
                peer_t[mode].append(s)
    rank1.wait(timeout=120)
    g.destroy()
    results["torch_broadcast_s"] = {k: statistics.median(v) for k, v in peer_t.items()}
    print("torch broadcast:", results["torch_broadcast_s"], flush=True)

    # --- refit on GPU 1
    env = dict(os.environ)
    with refit_server(a.refit_bin, ["--model-path", model, "--device", "cuda:1", "--weight-sync-timeout", "20"], work,
                      env=env, start_timeout_s=1200) as url:
        print("refit serve is up; joining", flush=True)
        sync = WeightSync([url], "127.0.0.1", free_port(), backend="nccl", group_name="bench", device="cuda:0")
        body = {"names": [n for n, _ in named], "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
                "shapes": [list(t.shape) for t in tensors], "group_name": "bench", "target_modules": list(MODULES)}

        def push(as_bucket, version, send=None):
            b = dict(body, weight_version=version, load_format="flattened_bucket" if as_bucket else None)
            t0 = time.perf_counter()
            threads, replies = _post_all([url], "/update_weights_from_distributed", [b], 900)
            sync.group.broadcast([bucket] if as_bucket else tensors[:send])
            for t in threads:
                t.join()
            return time.perf_counter() - t0, replies[0]

        # First idle (the ratio against torch's broadcast), then while a client keeps generating (the pause it sees;
        # "drain" is the wait for the denoising work in flight before the swap).
        stop = threading.Event()
        generated = [0]

        def load():
            while not stop.is_set():
                s, _ = post(url, "/v1/images/generations", {"prompt": "a fox", "size": "512x512", "num_inference_steps": 4, "seed": 1})
                generated[0] += s == 200
        refit_t = {}
        for loaded in (False, True):
            if loaded:
                gen = threading.Thread(target=load, daemon=True)
                gen.start()
            for mode, as_bucket in (("per_tensor", False), ("bucket", True)):
                key = mode + ("_under_load" if loaded else "")
                print(f"refit {key}: warm-up", flush=True)
                _, (status, reply) = push(as_bucket, "warm")
                assert status == 200, reply
                runs = []
                for r in range(a.repeat):
                    s, (status, reply) = push(as_bucket, f"{key}-{r}")
                    assert status == 200 and reply["success"], reply
                    runs.append({"end_to_end_s": s, **reply["timings"]})
                refit_t[key] = {k: statistics.median(x.get(k, 0.0) for x in runs) for k in runs[0]}
                refit_t[key]["pause_max_s"] = max(x.get("pause", 0.0) for x in runs)
                print(f"refit {key}:", refit_t[key], flush=True)
        disk = []
        for r in range(a.repeat + 1):
            t0 = time.perf_counter()
            status, reply = post(url, "/update_weights_from_disk", {"model_path": str(model), "weight_version": f"disk-{r}"})
            assert status == 200, reply
            if r:
                disk.append(time.perf_counter() - t0)
        stop.set()
        gen.join(timeout=120)
        results["refit"] = refit_t
        results["disk_s"] = statistics.median(disk)
        results["generations_during"] = generated[0]

        # Correctness: perturbed weights in, SGLang's checksum of the trainer's tensors out.
        perturbed = [(n, (t.float() + 1e-2).to(t.dtype) if t.is_floating_point() else t) for n, t in named if n.startswith("transformer.")]
        status, reply = sync.push([(n.removeprefix("transformer."), t) for n, t in perturbed], target_module="transformer",
                                  weight_version="perturbed")[0]
        assert status == 200, reply
        _, sums = post(url, "/get_weights_checksum", {"module_names": ["transformer"]})
        expected = sglang_checksum([(n.removeprefix("transformer."), t) for n, t in perturbed])
        results["checksum_matches"] = sums["transformer"] == expected
        print("checksum after a perturbed push equals the trainer's:", results["checksum_matches"], flush=True)
        assert results["checksum_matches"], (sums, expected)
        del perturbed

        # A trainer one tensor short: refit gives up after --weight-sync-timeout (20 s), aborts its communicator and
        # keeps its weights; a new group works afterwards.
        _, before = post(url, "/get_weights_checksum", {"module_names": ["vae"]})
        vae = [(n.removeprefix("vae."), t) for n, t in named if n.startswith("vae.")]
        vbody = {"names": [n for n, _ in vae], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in vae],
                 "shapes": [list(t.shape) for _, t in vae], "group_name": "bench", "target_modules": ["vae"]}
        t0 = time.perf_counter()
        threads, replies = _post_all([url], "/update_weights_from_distributed", [vbody], 900)
        sync.group.broadcast([t for _, t in vae][:-1])
        for t in threads:
            t.join()
        status, reply = replies[0]
        results["short_trainer"] = {"status": status, "seconds": time.perf_counter() - t0, "message": reply["message"]}
        print("one tensor short:", results["short_trainer"], flush=True)
        assert status == 400 and "was destroyed" in reply["message"], reply
        sync.group.destroy()
        _, after = post(url, "/get_weights_checksum", {"module_names": ["vae"]})
        assert after == before, (before, after)
        sync = WeightSync([url], "127.0.0.1", free_port(), backend="nccl", group_name="again", device="cuda:0")
        status, reply = sync.push(vae, target_module="vae", weight_version="again")[0]
        results["new_group_after_failure"] = status == 200
        assert status == 200, reply
        sync.close()
    gb = total / 1e9
    print()
    print(f"| {gb:.2f} GB, {len(named)} tensors, GPU 0 -> GPU 1          | median s |  GB/s  | / torch broadcast |")
    print("|----------------------------------------------|----------|--------|-------------------|")
    for mode in ("per_tensor", "bucket"):
        tb = results["torch_broadcast_s"][mode]
        print(f"| torch broadcast, {mode:28} | {tb:8.3f} | {gb / tb:6.1f} |             1.000 |")
        for key in (mode, mode + "_under_load"):
            e2e = results["refit"][key]["end_to_end_s"]
            print(f"| refit update end to end, {key:20} | {e2e:8.3f} | {gb / e2e:6.1f} | {tb / e2e:17.3f} |")
            r = results["refit"][key]
            phases = ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k not in ("end_to_end_s", "total", "pause_max_s"))
            print(f"|   {phases} (pause max {r['pause_max_s'] * 1000:.1f} ms)")
    print(f"| refit disk path (warm), same checkpoint       | {results['disk_s']:8.3f} | {gb / results['disk_s']:6.1f} |                   |")
    print(f"generations completed during the updates: {results['generations_during']}")
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
