"""Weights straight from a trainer (issue 14): SGLang's init_weights_update_group / update_weights_from_distributed /
destroy_weights_update_group against the real `refit serve`, with a real PyTorch trainer process (trainer.py) on the
other side of a Gloo group made by SGLang's own init_custom_process_group. Values are checked with SGLang's own
compute_weights_checksum of what the trainer sent, against servers started from the same weights on disk."""
import hashlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from harness import Server, TrainerProcess, http

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # servers and trainers advertise loopback, whatever the host name
HERE = Path(__file__).resolve().parent
SITE = Path(os.environ.get("SGLANG_SITE", HERE.parent.parent / ".deps-py" / "sglang"))
SYNC_TIMEOUT = 5  # refit serve --weight-sync-timeout for these servers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(ckpt_dir, module):
    files = sorted((Path(ckpt_dir) / module).glob("*.safetensors"))
    assert len(files) == 1, files
    return str(files[0])


class Trainer(TrainerProcess):
    """trainer.py in its own process."""

    def __init__(self, tmp_path):
        super().__init__(HERE / "trainer.py", tmp_path, SITE, timeout=120)


@pytest.fixture
def trainer(tmp_path):
    t = Trainer(tmp_path)
    yield t
    t.close()


@pytest.fixture(scope="module")
def dserver(tmp_path_factory, ckpt):
    s = Server(ckpt.base, tmp_path_factory.mktemp("dserver"), "--weight-sync-timeout", SYNC_TIMEOUT)
    yield s
    s.kill()


@pytest.fixture(scope="module")
def second_server(tmp_path_factory, ckpt):
    """Started from base with seed 2's transformer on disk: what a distributed update of that transformer must equal."""
    s = Server(ckpt.second, tmp_path_factory.mktemp("second"))
    yield s
    s.kill()


def init(trainer, servers, group="g", port=None, world_size=None, **kw):
    port = port or free_port()
    world_size = world_size or 1 + len(servers)
    r = trainer.call(op="init", servers=[[s.url, i + 1] for i, s in enumerate(servers)], world_size=world_size, group=group,
                     backend="gloo", port=port, timeout_s=30, **kw)
    return r, port


def update(trainer, servers, tensors, group="g", **kw):
    kw.setdefault("dtype", "float32")  # the servers hold fp32
    return trainer.call(op="update", servers=[s.url for s in servers], group=group, tensors=tensors, **kw)


def post_update(server, body, out):
    """POSTs an update from the test (while a trainer that will die broadcasts)."""
    with http() as s:
        r = s.post(server.url + "/update_weights_from_distributed", json=body, timeout=120)
    out.append((r.status_code, r.json()))


def announcement(ckpt_dir, module, group, **fields):
    with safe_open(shard(ckpt_dir, module), "pt") as f:
        names = sorted(f.keys())
        shapes = [list(f.get_slice(n).get_shape()) for n in names]
    return {"names": names, "dtypes": ["float32"] * len(names), "shapes": shapes, "group_name": group,
            "target_modules": [module], **fields}


def reset(server, ckpt):
    server.update(ckpt.base, weight_version="base")


def test_full_transformer_over_gloo_equals_the_same_weights_from_disk(dserver, second_server, trainer, ckpt):
    reset(dserver, ckpt)
    r, _ = init(trainer, [dserver])
    assert r["error"] is None and r["replies"] == [[200, {"success": True, "message": "Succeeded to initialize custom process group."}]]
    u = update(trainer, [dserver], shard(ckpt.seed2, "transformer"), fields={"target_modules": ["transformer"], "weight_version": "dist-1"})
    status, body = u["replies"][0]
    assert status == 200, body
    assert body["success"] and body["message"].startswith("Succeeded to update parameter online. Updated transformer from "
                                                          "distributed group 'g' on 1 worker(s)"), body
    assert body["weight_version"] == "dist-1" and set(body["timings"]) >= {"receive", "stage", "commit", "total"}
    after = dserver.checksums()
    # SGLang's checksum of what the trainer sent, SGLang's of what the server holds, and the disk's agree.
    assert after["transformer"] == u["checksum"] == ckpt.disk[str(ckpt.second)]["transformer"]
    assert after["vae"] == ckpt.disk[str(ckpt.base)]["vae"] and after["text_encoder"] == ckpt.disk[str(ckpt.base)]["text_encoder"]
    assert dserver.generate(seed=11)[0] == second_server.generate(seed=11)[0]
    info = dserver.info()
    assert info["weight_version"] == "dist-1" and Path(info["model_path"]) == Path(ckpt.base)
    # The default target is the transformer (SGLang's diffusion convention); a bf16 trainer converts to the fp32 weights.
    u = update(trainer, [dserver], shard(ckpt.base, "transformer"), dtype="bfloat16")
    assert u["replies"][0][0] == 200, u
    d = trainer.call(op="destroy", servers=[dserver.url], group="g")
    assert d["replies"] == [[200, {"success": True, "message": "Succeeded to destroy custom process group."}]]


def test_one_flattened_bucket_across_two_modules(dserver, trainer, ckpt):
    reset(dserver, ckpt)
    init(trainer, [dserver])
    tensors = [["transformer." + n, shard(ckpt.seed2, "transformer"), n] for n in
               safe_open(shard(ckpt.seed2, "transformer"), "pt").keys()]
    tensors += [["vae." + n, shard(ckpt.perturbed, "vae"), n] for n in safe_open(shard(ckpt.perturbed, "vae"), "pt").keys()]
    u = update(trainer, [dserver], tensors, bucket=True, fields={"target_modules": ["transformer", "vae"], "weight_version": "bucket"})
    status, body = u["replies"][0]
    assert status == 200, body
    assert "Updated transformer, vae from distributed group 'g'" in body["message"]
    after = dserver.checksums()
    assert after["transformer"] == ckpt.disk[str(ckpt.second)]["transformer"]
    assert after["vae"] == ckpt.disk[str(ckpt.perturbed)]["vae"]
    # Names must say their module when several are targeted.
    u = update(trainer, [dserver], [["x.weight", shard(ckpt.base, "vae"), tensors[-1][2]]],
               fields={"target_modules": ["transformer", "vae"]})
    status, body = u["replies"][0]
    assert status == 400 and "Tensor 'x.weight' names none of the target modules 'transformer', 'vae'" in body["message"], body
    assert "received and dropped; group 'g' is still usable" in body["message"], body
    assert dserver.checksums()["vae"] == ckpt.disk[str(ckpt.perturbed)]["vae"]
    trainer.call(op="destroy", servers=[dserver.url], group="g")


def test_a_refused_announcement_changes_nothing_and_keeps_the_group(dserver, trainer, ckpt):
    reset(dserver, ckpt)
    init(trainer, [dserver])
    before = dserver.checksums()
    with safe_open(shard(ckpt.seed2, "transformer"), "pt") as f:
        shapes = {n: f.get_slice(n).get_shape() for n in f.keys()}
    names = sorted(shapes)
    other = next(n for n in names if shapes[n] != shapes[names[1]])
    # A real name with another tensor's shape: refused before any byte lands in the module.
    tensors = [[names[0], shard(ckpt.seed2, "transformer"), names[0]], [names[1], shard(ckpt.seed2, "transformer"), other]]
    u = update(trainer, [dserver], tensors)
    status, body = u["replies"][0]
    shape_differs = "does not match the module's" in body["message"]
    assert status == 400 and f"tensor '{names[1]}'" in body["message"] and shape_differs, body
    assert "No weights were changed" in body["message"] and body["weight_version"] == "base"
    # A field refit does not know is named, and the broadcast is still taken.
    u = update(trainer, [dserver], shard(ckpt.seed2, "transformer"), fields={"lora_strength": 1.0})
    status, body = u["replies"][0]
    assert status == 400 and "unknown field(s) 'lora_strength'" in body["message"], body
    # Full weights announced as a LoRA adapter to merge: the first name that is no lora_A / lora_B is named.
    u = update(trainer, [dserver], shard(ckpt.seed2, "transformer"), fields={"weight_update_mode": "lora_merge"})
    status, body = u["replies"][0]
    assert status == 400 and f"tensor '{names[0]}' is not a LoRA weight" in body["message"], body
    assert "received and dropped; group 'g' is still usable" in body["message"], body
    u = update(trainer, [dserver], shard(ckpt.seed2, "transformer"), fields={"load_format": "direct"})
    assert u["replies"][0][0] == 400 and "field 'load_format' must be null" in u["replies"][0][1]["message"]
    assert dserver.checksums() == before
    # The group is still in step: the next update goes through.
    u = update(trainer, [dserver], shard(ckpt.seed2, "transformer"))
    assert u["replies"][0][0] == 200 and dserver.checksums()["transformer"] == u["checksum"]
    trainer.call(op="destroy", servers=[dserver.url], group="g")


def test_destroy_reinit_and_two_groups(dserver, trainer, ckpt):
    reset(dserver, ckpt)
    init(trainer, [dserver], group="a")
    init(trainer, [dserver], group="b")
    dup, _ = init(trainer, [dserver], group="a", make_group=False)
    assert dup["replies"][0][0] == 400 and "group 'a' already exists on worker 0; destroy it first" in dup["replies"][0][1]["message"]
    u = update(trainer, [dserver], shard(ckpt.seed2, "transformer"), group="b", fields={"weight_version": "via-b"})
    assert u["replies"][0][0] == 200 and dserver.info()["weight_version"] == "via-b"
    u = update(trainer, [dserver], shard(ckpt.base, "transformer"), group="a", fields={"weight_version": "via-a"})
    assert u["replies"][0][0] == 200 and dserver.checksums()["transformer"] == ckpt.disk[str(ckpt.base)]["transformer"]
    assert trainer.call(op="destroy", servers=[dserver.url], group="a")["replies"][0][0] == 200
    again = trainer.call(op="destroy", servers=[dserver.url], group="a")["replies"]
    assert again == [[400, {"success": False, "message": "The group to be destroyed does not exist."}]]
    r = dserver.post("/update_weights_from_distributed", announcement(ckpt.seed2, "transformer", "a"))
    assert r.status_code == 400 and "Group 'a' not in ['b'] on worker 0. Please call `init_weights_update_group` first" in r.json()["message"]
    init(trainer, [dserver], group="a")  # the same name again, on a new port
    u = update(trainer, [dserver], shard(ckpt.seed2, "transformer"), group="a")
    assert u["replies"][0][0] == 200
    for g in ("a", "b"):
        trainer.call(op="destroy", servers=[dserver.url], group=g)


def test_init_refusals(dserver, trainer):
    def init_body(**kw):
        body = {"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2, "group_name": "r",
                "backend": "gloo", **kw}
        r = dserver.post("/init_weights_update_group", body)
        return r.status_code, r.json()

    status, body = init_body(world_size=1)
    assert status == 400 and body["message"].startswith("Failed to initialize custom process group:"), body
    status, body = init_body(rank_offset=2)
    assert status == 400 and "world_size 2 has no room for this server's 1 worker rank(s) from rank_offset 2" in body["message"], body
    status, body = init_body(backend="nccl")
    assert status == 400 and "backend 'nccl' needs a GPU, and worker 0 runs on cpu; use 'gloo'" in body["message"], body
    status, body = init_body(backend="mpi")
    assert status == 400 and "field 'backend' must be \"nccl\" (the default) or \"gloo\"" in body["message"], body
    status, body = init_body(timeout=3)
    assert status == 400 and "unknown field(s) 'timeout'" in body["message"], body
    # Nobody hosts the store: refit gives up after --weight-sync-timeout and says why.
    status, body = init_body()
    assert status == 400 and body["message"].startswith("Failed to initialize custom process group: ") and "timed out" in body["message"], body
    r = dserver.post("/destroy_weights_update_group", {"group_name": "r"})
    assert r.status_code == 400 and r.json()["message"] == "The group to be destroyed does not exist."


@pytest.mark.parametrize("fault", ["die_between", "die_posting", "fewer"])
def test_a_failed_transfer_changes_nothing_and_leaves_the_group(dserver, trainer, tmp_path, ckpt, fault):
    reset(dserver, ckpt)
    before = dserver.checksums()
    init(trainer, [dserver])
    body = announcement(ckpt.seed2, "transformer", "g", weight_version="never")
    out = []
    poster = threading.Thread(target=post_update, args=(dserver, body, out))
    poster.start()
    n = len(body["names"])
    cmd = dict(op="update", servers=[], group="g", tensors=shard(ckpt.seed2, "transformer"), dtype="float32")
    if fault == "fewer":
        trainer.call(**cmd, send=n - 1, fields={})  # alive, but one tensor short: refit waits --weight-sync-timeout
    else:
        trainer.send(**cmd, **({"die_after": n // 2} if fault == "die_between" else {"die_posting": True}))
    poster.join(timeout=60)
    assert out, "the update did not answer"
    status, reply = out[0]
    assert status == 400 and reply["message"].startswith("Failed to receive weights on worker 0: broadcast "), reply
    assert "Group 'g' was destroyed on worker 0; call init_weights_update_group again" in reply["message"], reply
    assert "No weights were changed" in reply["message"] and reply["weight_version"] == "base"
    assert dserver.checksums() == before
    r = dserver.post("/destroy_weights_update_group", {"group_name": "g"})
    assert r.status_code == 400  # already left
    # A new trainer, a new group: updates work again.
    (tmp_path / "fresh").mkdir()
    fresh = Trainer(tmp_path / "fresh")
    try:
        init(fresh, [dserver])
        u = update(fresh, [dserver], shard(ckpt.seed2, "transformer"))
        assert u["replies"][0][0] == 200 and dserver.checksums()["transformer"] == u["checksum"]
        fresh.call(op="destroy", servers=[dserver.url], group="g")
    finally:
        fresh.close()


def test_two_workers_are_two_ranks(tmp_path_factory, trainer, ckpt):
    server = Server(ckpt.base, tmp_path_factory.mktemp("two"), "--workers", 2, "--weight-sync-timeout", SYNC_TIMEOUT)
    try:
        r, _ = init(trainer, [server], world_size=3)
        assert r["replies"][0] == [200, {"success": True, "message": "Succeeded to initialize custom process group."}]
        u = update(trainer, [server], shard(ckpt.seed2, "transformer"))
        status, body = u["replies"][0]
        assert status == 200 and "on 2 worker(s)" in body["message"], body
        assert {m["worker"] for m in body["modules"]} == {0, 1}
        for w in (0, 1):
            assert server.checksums(["transformer"], worker=w)["transformer"] == u["checksum"]
        trainer.call(op="destroy", servers=[server.url], group="g")
    finally:
        server.kill()


def test_refits_own_trainer_helper(dserver, trainer, ckpt, tmp_path):
    """clients/python/refit_trainer.py: the same group from torch's public classes, and its WeightSync client."""
    reset(dserver, ckpt)
    r, _ = init(trainer, [dserver], helper="refit")
    assert r["error"] is None and r["replies"][0][0] == 200
    u = update(trainer, [dserver], shard(ckpt.seed2, "transformer"))
    assert u["replies"][0][0] == 200 and dserver.checksums()["transformer"] == u["checksum"]
    trainer.call(op="destroy", servers=[dserver.url], group="g")
    script = f"""
import sys
sys.path.insert(0, {str(HERE.parent.parent / 'clients' / 'python')!r})
from refit_trainer import WeightSync
from safetensors.torch import load_file
named = sorted(load_file({shard(ckpt.base, 'transformer')!r}).items())
sync = WeightSync([{dserver.url!r}], "127.0.0.1", {free_port()}, backend="gloo", group_name="helper")
(status, body), = sync.push([(n, t.float()) for n, t in named], target_module="transformer", bucket=True, weight_version="helper")
assert status == 200 and body["success"], body
(status, body), = sync.close()
assert status == 200, body
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    assert dserver.checksums()["transformer"] == ckpt.disk[str(ckpt.base)]["transformer"]
    assert dserver.info()["weight_version"] == "helper"


# ---------------------------------------------------------------------------------------------------------------------
# weight_update_mode "lora_merge": the trainer broadcasts a PEFT adapter's lora_A / lora_B tensors and refit merges
# W + (B @ A) * lora_alpha / r into the transformer. The oracle is PEFT 0.21.2's own merge_and_unload of the same adapter
# on the same base checkpoint, checked with SGLang's checksum formula over the merged module's parameters.

LORA_RANK, LORA_ALPHA = 4, 8


def sglang_checksum(params):
    """SGLang's compute_weights_checksum: SHA-256 over the parameters sorted by name, each its UTF-8 name then the raw
    bytes of the contiguous tensor."""
    h = hashlib.sha256()
    for name in sorted(params, key=lambda n: n.encode()):
        h.update(name.encode())
        h.update(params[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory, ckpt):
    """A PEFT LoRA (r 4, lora_alpha 8, seeded random non-zero A and B in fp32) on every Linear of base's transformer
    blocks plus x_embedder and proj_out, saved as get_peft_model_state_dict gives it; and PEFT's merge of it at a
    strength (PEFT's LoraLayer.set_scale: scaling = strength * lora_alpha / r), as SGLang checksums of the merged module."""
    import copy
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    def checksum(model):
        params = dict(model.named_parameters())
        assert not [n for n in params if "lora_" in n or "base_layer" in n] and all(p.dtype == torch.float32 for p in params.values())
        return sglang_checksum(params)

    base = Flux2Transformer2DModel.from_pretrained(str(ckpt.base / "transformer"), torch_dtype=torch.float32)
    base_checksum = checksum(base)
    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks." in n]
    targets += ["x_embedder", "proj_out"]
    model = get_peft_model(base, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=targets))
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if "lora_" in n):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    assert len(state) == 2 * len(targets) and all(k.startswith("base_model.model.") for k in state)
    assert all(v.abs().min() > 0 for v in state.values())  # no zero lora_B: the adapter changes every layer it targets
    path = tmp_path_factory.mktemp("peft-lora") / "adapter.safetensors"
    save_file(state, str(path))

    merged = {}
    for strength in (1.0, 0.5):
        m = copy.deepcopy(model)
        for layer in m.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale("default", strength)
        merged[strength] = checksum(m.merge_and_unload())
    assert len({base_checksum, *merged.values()}) == 3
    return {"file": str(path), "names": sorted(state), "base": base_checksum, "merged": merged}


def test_lora_merge_from_the_trainer_equals_peft_merge(dserver, trainer, ckpt, peft_lora):
    reset(dserver, ckpt)
    base = dserver.checksums(["transformer"])["transformer"]
    assert base == peft_lora["base"] == ckpt.disk[str(ckpt.base)]["transformer"]
    init(trainer, [dserver])
    lora = {"weight_update_mode": "lora_merge", "lora_alpha": LORA_ALPHA}

    def send(names, expect, bucket=False, **fields):
        """Broadcasts the adapter's tensors under `names` (PEFT's, in order); returns the reply body."""
        tensors = [[wire, peft_lora["file"], key] for wire, key in zip(names, peft_lora["names"])]
        u = update(trainer, [dserver], tensors, bucket=bucket, fields=fields)
        status, body = u["replies"][0]
        assert status == expect and body["success"] is (expect == 200), body
        return body

    def transformer():
        got = dserver.checksums(["transformer"])
        assert ("active_loras" in got) is (got["transformer"] != base), got
        return got["transformer"]

    def active():
        r = dserver.get("/v1/list_loras")
        assert r.status_code == 200, r.text
        return r.json()["active"]

    def entry(strength):
        return {"nickname": "distributed:g", "nicknames": ["distributed:g"], "path": "", "merged": True, "mode": "merged",
                "strength": strength, "strengths": [strength]}

    def lora_call(path, body):
        r = dserver.post(path, body)
        assert r.status_code == 200 and r.json()["status"] == "ok", (path, body, r.status_code, r.text)
        return r.json()

    # One broadcast per tensor, named as get_peft_model_state_dict gives them ("base_model.model." prefix).
    body = send(peft_lora["names"], 200, target_modules=["transformer"], weight_version="lora-1", lora_rank=LORA_RANK, **lora)
    assert body["weight_version"] == "lora-1" and dserver.info()["weight_version"] == "lora-1"
    assert transformer() == peft_lora["merged"][1.0]
    assert active() == {"transformer": [entry(1.0)]}
    # merge_lora_weights re-merges the received adapter at another strength; unmerge restores the base bit for bit.
    lora_call("/v1/merge_lora_weights", {"strength": 0.5})
    assert transformer() == peft_lora["merged"][0.5]
    assert active() == {"transformer": [entry(0.5)]}
    lora_call("/v1/unmerge_lora_weights", {})
    assert transformer() == base and active() == {}

    # One flattened bucket, Diffusers' "transformer." names, target_modules null (the denoiser).
    diffusers_names = ["transformer." + n.removeprefix("base_model.model.") for n in peft_lora["names"]]
    body = send(diffusers_names, 200, bucket=True, weight_version="lora-2", **lora)
    assert body["weight_version"] == "lora-2" and transformer() == peft_lora["merged"][1.0]
    assert active() == {"transformer": [entry(1.0)]}
    # Another merge replaces it (not stacked): no lora_alpha is alpha = r, scaling 1 = strength 0.5 of alpha 8 / r 4.
    send(peft_lora["names"], 200, weight_update_mode="lora_merge", weight_version="lora-3")
    merged = transformer()
    assert merged == peft_lora["merged"][0.5]

    # Refusals: 400 naming the tensor or layer; the broadcast is drained, nothing changes, the group stays usable.
    listing, version = active(), dserver.info()["weight_version"]
    bad = list(peft_lora["names"])
    i = bad.index("base_model.model.transformer_blocks.0.attn.to_k.lora_A.weight")
    bad[i] = bad[i].replace(".attn.to_k.", ".attn.no_such.")
    body = send(bad, 400, weight_version="never", **lora)
    assert "transformer_blocks.0.attn.no_such.lora_A.weight" in body["message"], body
    assert "received and dropped; group 'g' is still usable" in body["message"], body
    assert "No weights were changed" in body["message"] and body["weight_version"] == version, body
    assert transformer() == merged and active() == listing and dserver.info()["weight_version"] == version
    body = send(peft_lora["names"], 400, weight_version="never", lora_rank=2, **lora)
    layer = re.search(r"layer '([\w.]+)' has rank 4, not the lora_rank 2", body["message"])
    assert layer and f"base_model.model.{layer[1].removesuffix('.weight')}.lora_A.weight" in peft_lora["names"], body
    assert "No weights were changed" in body["message"] and body["weight_version"] == version, body
    assert transformer() == merged and active() == listing and dserver.info()["weight_version"] == version

    body = send(peft_lora["names"], 200, weight_version="lora-4", **lora)
    assert transformer() == peft_lora["merged"][1.0]
    lora_call("/v1/unmerge_lora_weights", {})
    assert transformer() == base and active() == {}
    trainer.call(op="destroy", servers=[dserver.url], group="g")
