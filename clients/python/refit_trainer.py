"""Push a trainer's weights to refit (or SGLang) servers over torch.distributed, without SGLang installed.

refit serves SGLang's three calls: POST /init_weights_update_group, /update_weights_from_distributed and
/destroy_weights_update_group. The trainer is rank 0 of a torch.distributed group and hosts its rendezvous
store; each server worker joins as one more rank. Trainers that have SGLang use its
`init_custom_process_group`; this module builds the same group (the same store keys: a TCPStore, then the
prefixes group_name, group_name + "/", then "cpu/" or "cuda/") from torch's public classes only, and does
the HTTP side with the standard library.

    from refit_trainer import WeightSync

    sync = WeightSync(["http://127.0.0.1:30010"], master_address="127.0.0.1", master_port=29600,
                      backend="nccl", group_name="weights")          # every server joins, then the group is made
    reply = sync.push(model.named_parameters(), target_module="transformer", weight_version="step-7")
    sync.close()                                                      # the servers leave, the group goes

`push` announces the tensors (names, dtypes, shapes), broadcasts them in that order (one broadcast each,
or one uint8 "flattened_bucket" broadcast with bucket=True) and returns every server's reply. refit applies
them as one transaction: all modules on all workers, or none; a refused announcement (a wrong name or
shape) is answered with HTTP 400 after refit has received and dropped the broadcast, so the group stays
usable.
"""
import json
import threading
import urllib.error
import urllib.request
from datetime import timedelta

import torch
import torch.distributed as dist


def flatten(tensors):
    """SGLang's flattened_bucket layout: the tensors' bytes back to back, in order, as one uint8 tensor."""
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


class WeightGroup:
    """Rank 0 of a weight-update group, made as SGLang's init_custom_process_group makes it. Creating it blocks
    until every other rank (the servers' workers) has joined."""

    def __init__(self, master_address, master_port, world_size, group_name="weight_update_group", backend="nccl",
                 timeout=timedelta(minutes=10), device=None):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
        self.backend, self.group_name = backend, group_name
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self._store = dist.TCPStore(master_address, master_port, world_size, is_master=True, timeout=timeout,
                                    wait_for_workers=True)
        group_store = dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, self._store))
        if backend == "gloo":
            self._pg = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", group_store), 0, world_size, timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", group_store), 0, world_size, options)

    def broadcast(self, tensors):
        """Broadcasts each tensor from rank 0, in order (all posted, then awaited)."""
        works = []
        for t in tensors:
            t = t.detach().contiguous()
            if t.device != self.device:
                t = t.to(self.device)
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            works.append((t, self._pg.broadcast([t], opts)))
        for _, w in works:
            w.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def destroy(self):
        """Leaves the group. NCCL: aborts the communicator, which is local (a graceful finalize would wait for
        the other ranks, which may already have left) and ends any operation still waiting on a peer."""
        if self._pg is not None:
            if self.backend == "nccl":
                self._pg.abort()
            self._pg = None
            self._store = None


def _post(url, path, body, timeout):
    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"success": False, "message": raw.decode(errors="replace")}


def _post_all(urls, path, bodies, timeout):
    """POSTs to every server at once (each from its own thread); returns the threads and their result slots."""
    results = [None] * len(urls)

    def one(i):
        try:
            results[i] = _post(urls[i], path, bodies[i], timeout)
        except Exception as e:  # the trainer must not hang on a server that does not answer
            results[i] = (0, {"success": False, "message": f"{type(e).__name__}: {e}"})

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(urls))]
    for t in threads:
        t.start()
    return threads, results


class WeightSync:
    """A trainer's connection to one or more servers: every worker of every server joins one group.

    workers: the number of workers (ranks) of each server, in order (refit: its --workers); server i's
    ranks start at rank_offset = 1 + sum(workers[:i])."""

    def __init__(self, servers, master_address, master_port, backend="nccl", group_name="weight_update_group",
                 workers=None, timeout=timedelta(minutes=10), http_timeout=3600.0, device=None):
        self.servers = list(servers)
        self.group_name = group_name
        self.http_timeout = http_timeout
        workers = list(workers or [1] * len(self.servers))
        offsets = [1 + sum(workers[:i]) for i in range(len(self.servers))]
        world_size = 1 + sum(workers)
        # Clear a group of the same name a failed run may have left (an unknown group is only a 400).
        threads, _ = _post_all(self.servers, "/destroy_weights_update_group", [{"group_name": group_name}] * len(self.servers),
                               http_timeout)
        for t in threads:
            t.join()
        bodies = [{"master_address": master_address, "master_port": master_port, "rank_offset": o, "world_size": world_size,
                   "group_name": group_name, "backend": backend} for o in offsets]
        # The servers' joins must be in flight before rank 0 creates the store and waits for them.
        threads, results = _post_all(self.servers, "/init_weights_update_group", bodies, http_timeout)
        try:
            self.group = WeightGroup(master_address, master_port, world_size, group_name, backend, timeout, device)
        finally:
            for t in threads:
                t.join()
        failed = [(u, r) for u, r in zip(self.servers, results) if r[0] != 200]
        if failed:
            self.group.destroy()
            raise RuntimeError(f"servers could not join group {group_name!r}: {failed}")

    def push(self, named_tensors, target_module=None, bucket=False, weight_version=None, **fields):
        """Announces and broadcasts `named_tensors` ((name, tensor) pairs, names as the module names them);
        returns [(status, reply)] per server. Extra fields (flush_cache, abort_all_requests, mode, ...) pass on."""
        named = [(n, t.detach()) for n, t in named_tensors]
        body = {"names": [n for n, _ in named], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
                "shapes": [list(t.shape) for _, t in named], "group_name": self.group_name,
                "load_format": "flattened_bucket" if bucket else None, **fields}
        if target_module is not None:
            body["target_modules"] = [target_module]
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        threads, results = _post_all(self.servers, "/update_weights_from_distributed", [body] * len(self.servers),
                                     self.http_timeout)
        tensors = [t for _, t in named]
        self.group.broadcast([flatten(tensors)] if bucket else tensors)
        for t in threads:
            t.join()
        return results

    def close(self):
        threads, results = _post_all(self.servers, "/destroy_weights_update_group",
                                     [{"group_name": self.group_name}] * len(self.servers), self.http_timeout)
        for t in threads:
            t.join()
        self.group.destroy()
        return results
