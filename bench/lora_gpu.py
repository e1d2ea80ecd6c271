#!/usr/bin/env python3
"""LoRA merge cost (issue 17): POST /v1/set_lora of a rank-16/64/128 adapter on every linear weight of
FLUX.2-klein-4B's transformer blocks, against a full-weight refit of the same module (update_weights_from_disk,
target_modules ["transformer"]) on the same running `refit serve`, in the same run. Run on the GPU machine after
`scripts/device-build refit`:

    python3 bench/lora_gpu.py --refit-bin build-gpu/apps/refit --model /tmp/flux2-klein-4b [--repeat 3]

Each adapter is written in PEFT's format (adapter_config.json + adapter_model.safetensors, bf16 A/B). Per rank it
measures the first merge (which keeps a pinned host copy of the base of every weight it touches), later merges
(switching adapters: the kept base is reused), an unmerge (a copy of the kept base), all end to end through HTTP
with the reply's phase timings and the generation pause; and checks that unmerge gives the base checksum exactly.
"""
import argparse
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from serving import ensure_model, post, refit_server


def linear_weights(transformer_dir):
    """name -> [out, in] of every 2-D weight in the transformer blocks (what LoRA recipes target)."""
    out = {}
    for f in sorted(Path(transformer_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for name, e in header.items():
            if name != "__metadata__" and len(e["shape"]) == 2 and name.endswith(".weight") and "transformer_blocks." in name:
                out[name] = e["shape"]
    return out


def write_adapter(path, weights, rank, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (o, i) in weights.items():
        layer = "base_model.model." + name[: -len(".weight")]
        tensors[layer + ".lora_A.weight"] = (torch.randn(rank, i, generator=g) / i ** 0.5).to(torch.bfloat16)
        tensors[layer + ".lora_B.weight"] = (torch.randn(o, rank, generator=g) * 1e-3).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "use_rslora": False,
                                                          "bias": "none", "target_modules": sorted({n.split(".")[-2] for n in weights})}))
    return sum(t.numel() * 2 for t in tensors.values())


def timed(url, path, body):
    t0 = time.perf_counter()
    status, reply = post(url, path, body)
    s = time.perf_counter() - t0
    assert status == 200, (path, status, reply)
    return s, reply


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--refit-bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ranks", default="16,64,128")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    ensure_model(a.refit_bin, a.model)
    work = Path(tempfile.mkdtemp(prefix="refit-lora-bench-"))
    weights = linear_weights(Path(a.model) / "transformer")
    print(f"{len(weights)} linear weights in the transformer blocks, {sum(o * i for o, i in weights.values()) * 2 / 1e9:.2f} GB (bf16)", flush=True)
    adapters = {}
    for r in (int(x) for x in a.ranks.split(",")):
        for k in range(2):
            p = work / f"r{r}-{k}"
            size = write_adapter(p, weights, r, seed=r * 10 + k)
            adapters[(r, k)] = p
        print(f"rank {r}: adapter {size / 1e6:.1f} MB", flush=True)
    results = {"linear_weights": len(weights)}
    with refit_server(a.refit_bin, ["--model-path", a.model, "--device", a.device], work) as url:
        _, base = post(url, "/get_weights_checksum", {"module_names": ["transformer"]})
        full = []
        for i in range(a.repeat + 1):
            s, reply = timed(url, "/update_weights_from_disk", {"model_path": a.model, "target_modules": ["transformer"],
                                                                 "weight_version": f"full-{i}"})
            if i:
                full.append({"end_to_end_s": s, **reply["timings"]})
        results["full_refit"] = {k: statistics.median(x.get(k, 0.0) for x in full) for k in full[0]}
        print("full-weight refit of the transformer:", results["full_refit"], flush=True)
        for (r, k), path in sorted(adapters.items()):
            if k:
                continue
            runs = {"first_merge": [], "switch": [], "unmerge": []}
            for i in range(a.repeat):
                s, reply = timed(url, "/v1/set_lora", {"lora_nickname": f"r{r}-0", "lora_path": str(path)})
                runs["first_merge" if i == 0 else "switch"].append({"end_to_end_s": s, **reply["timings"]})
                s, reply = timed(url, "/v1/set_lora", {"lora_nickname": f"r{r}-1", "lora_path": str(adapters[(r, 1)])})
                runs["switch"].append({"end_to_end_s": s, **reply["timings"]})
                s, reply = timed(url, "/v1/unmerge_lora_weights", {})
                runs["unmerge"].append({"end_to_end_s": s, **reply["timings"]})
                _, sums = post(url, "/get_weights_checksum", {"module_names": ["transformer"]})
                assert sums["transformer"] == base["transformer"], (sums, base)
            results[f"rank_{r}"] = {name: {key: statistics.median(x.get(key, 0.0) for x in xs) for key in xs[0]} for name, xs in runs.items()}
            print(f"rank {r}:", results[f"rank_{r}"], flush=True)
        results["unmerge_restores_base_checksum"] = True
    f = results["full_refit"]["end_to_end_s"]
    print()
    print("| transformer of FLUX.2-klein-4B, H2D + merge on the GPU    | end to end s | x full refit | pause ms |")
    print("|-----------------------------------------------------------|--------------|--------------|----------|")
    print(f"| full-weight refit (update_weights_from_disk, warm cache)  | {f:12.3f} |        1.000 | {results['full_refit'].get('pause', 0) * 1e3:8.1f} |")
    for key, v in results.items():
        if not key.startswith("rank_"):
            continue
        for name, t in v.items():
            label = f"rank {key[5:]}: {name.replace('_', ' ')}"
            print(f"| {label:57} | {t['end_to_end_s']:12.3f} | {t['end_to_end_s'] / f:12.3f} | {t.get('pause', 0) * 1e3:8.1f} |")
    print("unmerge restored the base checksum exactly after every merge:", results["unmerge_restores_base_checksum"])
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
