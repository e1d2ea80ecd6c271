"""A real PyTorch trainer process for the distributed-update tests: rank 0 of a torch.distributed group that
`refit serve` workers join, driven by JSON lines on stdin (one reply line each on stdout).

It makes its group with SGLang's own init_custom_process_group (what SGLang's RL trainers call; from the SGLang
wheel scripts/setup installs into .deps-py/sglang) or with refit's helper (clients/python/refit_trainer.py), posts
SGLang's HTTP requests from threads while it broadcasts, as those trainers do, and reports SGLang's own checksum
(compute_weights_checksum) of what it sent. Commands:

  {"op": "init", "servers": [[url, rank_offset], ...], "world_size": W, "group": G, "backend": "gloo", "port": P,
   "helper": "sglang" | "refit", "timeout_s": T, "make_group": true}
  {"op": "update", "servers": [url, ...], "group": G, "tensors": [[name, file, key], ...] | "file.safetensors",
   "dtype": "float32" (floating tensors), "bucket": false, "fields": {...}, "send": N (broadcast only the first N),
   "die_after": N (exit after N broadcasts completed), "die_posting": true (exit right after posting them all)}
  {"op": "destroy", "servers": [url, ...], "group": G}
  {"op": "quit"}
"""
import json
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import requests
import torch
from safetensors.torch import load_file

import json_lines  # beside this script

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "clients" / "python"))

groups = {}  # name -> (kind, group)


def post_all(urls_bodies, path):
    """POSTs each (url, body) from its own thread; returns a function that waits and gives [(status, json)]."""
    out = [None] * len(urls_bodies)

    def one(i, url, body):
        try:
            with requests.Session() as s:
                s.trust_env = False
                r = s.post(url + path, json=body, timeout=600)
            out[i] = [r.status_code, r.json()]
        except Exception as e:  # reported to the test, which decides
            out[i] = [0, {"error": f"{type(e).__name__}: {e}"}]

    threads = [threading.Thread(target=one, args=(i, u, b), daemon=True) for i, (u, b) in enumerate(urls_bodies)]
    for t in threads:
        t.start()

    def wait():
        for t in threads:
            t.join()
        return out
    return wait


def make_group(cmd):
    timeout = timedelta(seconds=cmd.get("timeout_s", 60))
    if cmd.get("helper", "sglang") == "sglang":
        from sglang.srt.utils.common import init_custom_process_group
        pg = init_custom_process_group(backend=cmd["backend"], init_method=f"tcp://127.0.0.1:{cmd['port']}",
                                       world_size=cmd["world_size"], rank=0, group_name=cmd["group"], timeout=timeout)
        return "sglang", pg
    from refit_trainer import WeightGroup
    return "refit", WeightGroup("127.0.0.1", cmd["port"], cmd["world_size"], cmd["group"], cmd["backend"], timeout)


def broadcast(kind, group, tensors, die_after=None, die_posting=False):
    works = []
    for i, t in enumerate(tensors):
        if kind == "sglang":
            works.append(torch.distributed.broadcast(t, src=0, group=group, async_op=True))
        else:
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank = 0
            works.append(group._pg.broadcast([t], opts))
        if die_after is not None:
            works[-1].wait()
            if i + 1 == die_after:
                os._exit(3)
    if die_posting:
        os._exit(3)
    for w in works:
        w.wait()


def load_tensors(spec, dtype):
    if isinstance(spec, str):
        named = sorted(load_file(spec).items())
    else:
        named = [(name, load_file(f)[key]) for name, f, key in spec]
    dt = getattr(torch, dtype) if dtype else None
    return [(n, t.to(dt) if dt is not None and t.is_floating_point() else t) for n, t in named]


def handle(cmd):
    op = cmd["op"]
    if op == "init":
        bodies = [(url, {"master_address": "127.0.0.1", "master_port": cmd["port"], "rank_offset": off,
                         "world_size": cmd["world_size"], "group_name": cmd["group"], "backend": cmd["backend"]})
                  for url, off in cmd["servers"]]
        wait = post_all(bodies, "/init_weights_update_group")
        error = None
        if cmd.get("make_group", True):
            try:
                groups[cmd["group"]] = make_group(cmd)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        return {"replies": wait(), "error": error}
    if op == "update":
        named = load_tensors(cmd["tensors"], cmd.get("dtype"))
        body = {"names": [n for n, _ in named], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
                "shapes": [list(t.shape) for _, t in named], "group_name": cmd["group"], **cmd.get("fields", {})}
        if cmd.get("bucket"):
            body["load_format"] = "flattened_bucket"
        wait = post_all([(u, body) for u in cmd["servers"]], "/update_weights_from_distributed")
        kind, group = groups[cmd["group"]]
        tensors = [t.contiguous() for _, t in named][: cmd.get("send", len(named))]
        t0 = time.monotonic()
        if cmd.get("bucket"):
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
            tensors = [FlattenedTensorBucket(named_tensors=named).get_flattened_tensor()]
        broadcast(kind, group, tensors, cmd.get("die_after"), cmd.get("die_posting", False))
        sent_s = time.monotonic() - t0
        from sglang.multimodal_gen.runtime.loader.weight_utils import compute_weights_checksum
        return {"replies": wait(), "checksum": compute_weights_checksum(named), "sent_s": sent_s}
    if op == "destroy":
        wait = post_all([(u, {"group_name": cmd["group"]}) for u in cmd["servers"]], "/destroy_weights_update_group")
        replies = wait()
        if cmd["group"] in groups:
            kind, group = groups.pop(cmd["group"])
            if kind == "sglang":
                torch.distributed.destroy_process_group(group)
            else:
                group.destroy()
            del group
        return {"replies": replies}
    raise ValueError(f"unknown op {op!r}")


def main():
    json_lines.serve(handle)


if __name__ == "__main__":
    main()
