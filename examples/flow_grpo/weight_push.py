"""How the trainer's new weights reach refit, one class per transport. Each push is one refit transaction tagged with
weight_version and returns refit's reply (its "timings" hold the generation pause).

  disk         POST /update_weights_from_disk: a transformer folder (full) or a PEFT adapter folder with
               weight_update_mode "lora_merge" (lora)
  set_lora     POST /v1/set_lora with the adapter folder (lora only)
  distributed  POST /update_weights_from_distributed while the trainer broadcasts from rank 0 of a torch.distributed
               group refit joined (init_weights_update_group); Gloo on a CPU, NCCL on a GPU; lora: lora_merge
  tensor       POST /update_weights_from_tensor with torch's multiprocessing reductions (CPU: shared memory, the
               "file_system" strategy; GPU: CUDA IPC); the colocated transport; lora: lora_merge
"""
from __future__ import annotations

import base64
import io
import shutil
import socket
import sys
from pathlib import Path

from refit_client import RefitClient, RefitError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))

TRANSPORTS = ("disk", "set_lora", "distributed", "tensor")


def lora_fields(policy) -> dict:
    return {"weight_update_mode": "lora_merge", "lora_alpha": policy.lora_config.lora_alpha,
            "lora_rank": policy.lora_config.r}


class DiskPush:
    """Writes step-K folders under work_dir (keeping the newest two: refit may re-read the one it serves)."""

    def __init__(self, client: RefitClient, work_dir: Path, checkpoint: Path, set_lora: bool = False):
        self.client, self.work_dir, self.checkpoint, self.set_lora = client, work_dir / "pushed", checkpoint, set_lora
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []

    def push(self, policy, version: str) -> dict:
        folder = self.work_dir / f"step-{version}"
        if folder.exists():
            shutil.rmtree(folder)
        if policy.mode == "lora":
            policy.save_adapter(folder)
            if self.set_lora:
                return self.client.set_lora("flow-grpo", folder, version)
            reply = self.client.update_from_disk(folder, version, **lora_fields(policy))
        else:
            policy.save_full(folder / "transformer", self.checkpoint / "transformer")
            # refit reads the checkpoint's layout: model_index.json and a folder per component; only the
            # transformer is read (target_modules), the others link to the served checkpoint's.
            shutil.copyfile(self.checkpoint / "model_index.json", folder / "model_index.json")
            for component in sorted(self.checkpoint.iterdir()):
                if component.is_dir() and component.name != "transformer":
                    (folder / component.name).symlink_to(component.resolve(), target_is_directory=True)
            reply = self.client.update_from_disk(folder, version)
        self.written.append(folder)
        for old in self.written[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        self.written = self.written[-2:]
        return reply

    def close(self):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedPush:
    """Rank 0 of a weight-update group that refit's worker joins (refit's helper, clients/python/refit_trainer.py,
    which makes SGLang's init_custom_process_group's group from torch's public classes)."""

    def __init__(self, client: RefitClient, backend: str, group_name: str = "flow_grpo"):
        from refit_trainer import WeightSync

        self.client = client
        self.sync = WeightSync([client.url], master_address="127.0.0.1", master_port=free_port(), backend=backend,
                               group_name=group_name, http_timeout=client.timeout)

    def push(self, policy, version: str) -> dict:
        if policy.mode == "lora":
            named, fields = policy.lora_tensors(), lora_fields(policy)
        else:
            named, fields = policy.full_tensors(), {}
        device = self.sync.group.device
        named = [(n, t.to(device)) for n, t in named]
        (status, reply), = self.sync.push(named, target_module="transformer", weight_version=version,
                                          flush_cache=True, **fields)
        if status != 200 or reply.get("success") is not True:
            raise RefitError(f"POST /update_weights_from_distributed: HTTP {status}: {reply.get('message', reply)}")
        return reply

    def close(self):
        self.sync.close()


class TensorPush:
    """Shares the tensors with refit (the colocated transport). The shared copies live until refit has answered:
    refit copies them into its shadow weights during the request and keeps nothing."""

    def __init__(self, client: RefitClient):
        import torch.multiprocessing as mp

        self.client = client
        mp.set_sharing_strategy("file_system")  # CPU tensors by shared-memory name (file descriptors cannot cross HTTP)

    def push(self, policy, version: str) -> dict:
        import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler)
        from multiprocessing.reduction import ForkingPickler

        if policy.mode == "lora":
            named, fields = policy.lora_tensors(), lora_fields(policy)
        else:
            named, fields = policy.full_tensors(), {}
        shared = [(n, t.detach().clone()) for n, t in named]  # fresh storages: refit takes each segment over once
        buf = io.BytesIO()
        ForkingPickler(buf).dump(shared)
        payload = base64.b64encode(buf.getvalue()).decode()
        try:
            return self.client.update_from_tensor(payload, version, **fields)
        finally:
            del shared

    def close(self):
        pass


def make_transport(name: str, client: RefitClient, policy, work_dir: Path, checkpoint: Path):
    if name == "set_lora" and policy.mode != "lora":
        raise ValueError("--transport set_lora pushes an adapter: use it with --mode lora")
    if name in ("disk", "set_lora"):
        return DiskPush(client, work_dir, checkpoint, set_lora=name == "set_lora")
    if name == "distributed":
        return DistributedPush(client, "nccl" if policy.device.type == "cuda" else "gloo")
    if name == "tensor":
        return TensorPush(client)
    raise ValueError(f"unknown transport {name!r}; choose one of {TRANSPORTS}")
