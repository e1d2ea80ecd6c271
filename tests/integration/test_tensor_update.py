"""Weights from a colocated trainer (SGLang's POST /update_weights_from_tensor and /update_weights_from_tensor_checker)
against the real `refit serve`, with a real PyTorch trainer process (tensor_trainer.py) on the other side. The trainer
shares its tensors by torch's "file_system" strategy and serializes them with SGLang's own MultiprocessingSerializer
(ForkingPickler + base64) and FlattenedTensorBucket, from the SGLang wheel scripts/setup installs; the oracles are
SGLang's own compute_weights_checksum and tensor checker over the values the fp32 server must hold, and refit's
checksums of checkpoints on disk. Every refusal must leave every module as it was and the next good update working;
hostile payloads (unsafe globals, names that are not torch's segments, views past their segment, pickle bombs) must
neither run nor open anything."""
import base64
import ctypes
import errno
import hashlib
import json
import os
import pickle
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness import Server, TrainerProcess, http

HERE = Path(__file__).resolve().parent
SITE = Path(os.environ.get("SGLANG_SITE", HERE.parent.parent / ".deps-py" / "sglang"))
PREFIX = "Failed to deserialize serialized_named_tensors: "
SMALL = "transformer_blocks.0.attn.norm_k.weight"  # shape [16]: 64 bytes in fp32
EDITED = "x_embedder.weight"  # shape [32, 16]: 2048 bytes in fp32
TRANSFORMER_TENSORS = 33


class TensorTrainer(TrainerProcess):
    """tensor_trainer.py in its own process."""

    def __init__(self, tmp_path):
        super().__init__(HERE / "tensor_trainer.py", tmp_path, SITE, timeout=180)


def shard(ckpt_dir, module):
    files = sorted((Path(ckpt_dir) / module).glob("*.safetensors"))
    assert len(files) == 1, files
    return str(files[0])


def names_in(path):
    with safe_open(path, "pt") as f:
        return sorted(f.keys())


def spec(path, **kw):
    return {"file": str(path), **kw}


def load(trainer, ident, **modules):
    """The trainer makes the tensors of each module (see tensor_trainer.py's SPEC); returns its oracles per module."""
    return trainer.call(op="load", id=ident, modules=modules)["modules"]


def payload(trainer, ident, **kw):
    return trainer.call(op="payload", id=ident, **kw)


def post(server, body=None, raw=None, timeout=120):
    with http() as s:
        if raw is not None:
            r = s.post(server.url + "/update_weights_from_tensor", data=raw, headers={"Content-Type": "application/json"},
                       timeout=timeout)
        else:
            r = s.post(server.url + "/update_weights_from_tensor", json=body, timeout=timeout)
    return r.status_code, r.json()


def update(server, payloads, **fields):
    status, body = post(server, {"serialized_named_tensors": payloads, **fields})
    assert status == 200 and body["success"] is True, (status, body)
    assert body["message"] and "timings" in body, body
    return body


def check(server, module, expected):
    with http() as s:
        r = s.post(server.url + "/update_weights_from_tensor_checker",
                   json={"target_module": module, "expected_named_tensors_sha256": expected}, timeout=120)
    return r.status_code, r.json()


def reset(server, ckpt, version="base"):
    server.update(ckpt.base, weight_version=version)
    got = server.checksums()
    assert got == ckpt.disk[str(ckpt.base)], got
    return got


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def segment_exists(handle):
    return os.path.exists("/dev/shm" + handle)


def sglang_checksum(params):
    """SGLang's compute_weights_checksum over {name: tensor}."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tserver(tmp_path_factory, ckpt):
    s = Server(ckpt.base, tmp_path_factory.mktemp("tserver"))
    yield s
    s.kill()


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, ckpt):
    """One trainer for the module, holding "good" (seed 2's transformer in fp32: what the good update after each
    refusal sends) and "small" (one 64-byte tensor)."""
    t = TensorTrainer(tmp_path_factory.mktemp("trainer"))
    good = load(t, "good", transformer=spec(shard(ckpt.seed2, "transformer")))["transformer"]
    assert good["checksum"] == ckpt.disk[str(ckpt.second)]["transformer"]
    load(t, "small", transformer=spec(shard(ckpt.base, "transformer"), names=[SMALL], perturb=1.0))
    yield t
    t.close()


def good_update_works(server, trainer, ckpt):
    """A fresh payload of seed 2's transformer (every post gets its own pickle) goes through."""
    update(server, [payload(trainer, "good")["payload"]], weight_version="good")
    assert server.checksums(["transformer"])["transformer"] == ckpt.disk[str(ckpt.second)]["transformer"]


# ---------------------------------------------------------------------------------------------------------------------
# Updates that must go through


def test_a_list_of_parameters_equals_the_same_weights_from_disk(tserver, trainer, ckpt):
    """SGLang's default form: a list of (name, tensor) pairs for the transformer, here nn.Parameters as a trainer's
    named_parameters() gives them, one shared-memory segment each. The module then holds what the trainer holds,
    which is seed 2's checkpoint: SGLang's checksum of the trainer's tensors, refit's checksum of that checkpoint and
    the server's checksum agree, and so do images against the same weights loaded from disk."""
    base = reset(tserver, ckpt)
    png_base, _ = tserver.generate(seed=21)
    got = load(trainer, "params", transformer=spec(shard(ckpt.seed2, "transformer"), parameter=True))["transformer"]
    assert got["checksum"] == ckpt.disk[str(ckpt.second)]["transformer"]
    p = payload(trainer, "params")
    assert len(p["handles"]) == TRANSFORMER_TENSORS  # one segment per parameter
    # torch's segments: a 64-byte header (the reference count) and then the storage's bytes.
    assert all(p["segment_bytes"][h] > 64 for h in p["handles"])
    body = update(tserver, [p["payload"]], weight_version="tensor-1")
    assert body["weight_version"] == "tensor-1", body
    assert [m["name"] for m in body["modules"]] == ["transformer"], body
    assert body["modules"][0]["tensors"] == TRANSFORMER_TENSORS, body
    assert tserver.checksums() == {**base, "transformer": got["checksum"]}
    assert tserver.info()["weight_version"] == "tensor-1"
    png_tensor, version = tserver.generate(seed=21)
    assert version == "tensor-1" and png_tensor != png_base
    assert trainer.call(op="check", id="params")["unchanged"], "the server wrote into the trainer's tensors"
    tserver.update(ckpt.second, weight_version="disk")
    assert tserver.generate(seed=21)[0] == png_tensor
    trainer.call(op="drop", id="params")


def test_the_checker_verifies_the_trainers_per_tensor_hashes(tserver, trainer, ckpt):
    """Perturbed fp32 weights (no checkpoint on disk holds them), then the checker with the trainer's per-tensor hashes
    (SGLang's build_named_tensor_sha256 of the fp32 values). Every reply is SGLang's own verdict and message
    (TensorUpdateChecker._compare_manifests), for all, some, wrong and missing names."""
    base = reset(tserver, ckpt)
    got = load(trainer, "pert", transformer=spec(shard(ckpt.base, "transformer"), perturb=0.01))["transformer"]
    assert got["checksum"] != base["transformer"]
    update(tserver, [payload(trainer, "pert")["payload"]])
    assert tserver.checksums() == {**base, "transformer": got["checksum"]}

    hashes = got["hashes"]
    assert len(hashes) == TRANSFORMER_TENSORS
    status, body = check(tserver, "transformer", hashes)
    assert status == 200 and body["success"] is True, body
    assert body["message"] == f"Verified module 'transformer' update for {TRANSFORMER_TENSORS} tensor(s).", body

    names = sorted(hashes)
    flipped = {n: h[:-1] + ("0" if h[-1] != "0" else "1") for n, h in hashes.items()}
    base_hashes = load(trainer, "base-hashes", transformer=spec(shard(ckpt.base, "transformer")))["transformer"]["hashes"]
    trainer.call(op="drop", id="base-hashes")
    cases = {
        "some": {n: hashes[n] for n in names[:3]},
        "one_wrong": {**hashes, names[4]: flipped[names[4]]},
        "missing": {**hashes, "transformer_blocks.0.attn.no_such.weight": hashes[names[0]]},
        "wrong_and_missing": {**{n: flipped[n] for n in names[:7]}, "a.missing": "00", "b.missing": "11"},
        "before_the_update": base_hashes,
    }
    for case, expected in cases.items():
        want = trainer.call(op="compare", module="transformer", expected=expected, actual=hashes)
        status, body = check(tserver, "transformer", expected)
        assert status == (200 if want["ok"] else 400), (case, status, body)
        assert body["success"] is want["ok"] and body["message"] == want["message"], (case, body, want)
    assert "checksum mismatch for 1 tensor(s): " + names[4] in trainer.call(
        op="compare", module="transformer", expected=cases["one_wrong"], actual=hashes)["message"]

    # SGLang's refusals of the checker request itself.
    with http() as s:
        r = s.post(tserver.url + "/update_weights_from_tensor_checker", json={"expected_named_tensors_sha256": hashes})
        assert r.status_code == 400 and "target_module is required" in r.json()["message"], r.text
        r = s.post(tserver.url + "/update_weights_from_tensor_checker", json={"target_module": "transformer",
                                                                             "expected_named_tensors_sha256": {}})
        assert r.status_code == 400 and "expected_named_tensors_sha256 is required" in r.json()["message"], r.text
    status, body = check(tserver, "no_such_module", hashes)
    assert status == 400 and body["success"] is False and "no_such_module" in body["message"], body
    assert tserver.checksums() == {**base, "transformer": got["checksum"]}  # checking changes nothing
    trainer.call(op="drop", id="pert")


DTYPES = ("float64", "float32", "bfloat16", "float16")


def test_a_flattened_bucket_of_mixed_dtypes_is_converted_to_the_modules_dtype(tserver, trainer, ckpt):
    """load_format "flattened_bucket": SGLang's FlattenedTensorBucket, one uint8 segment for the whole transformer,
    its tensors in four dtypes. The fp32 server holds each converted to fp32 (fp64 rounded, 16-bit widened): the
    oracle converts what was sent the same way, and differs from sending everything in fp32."""
    base = reset(tserver, ckpt)
    names = names_in(shard(ckpt.base, "transformer"))
    dtypes = {n: DTYPES[i % len(DTYPES)] for i, n in enumerate(names)}
    got = load(trainer, "mixed", transformer=spec(shard(ckpt.base, "transformer"), perturb=0.01, dtypes=dtypes))["transformer"]
    fp32 = load(trainer, "mixed-fp32", transformer=spec(shard(ckpt.base, "transformer"), perturb=0.01))["transformer"]
    trainer.call(op="drop", id="mixed-fp32")
    assert got["checksum"] not in (fp32["checksum"], base["transformer"])
    p = payload(trainer, "mixed", format="bucket")
    assert len(p["handles"]) == 1  # the bucket
    body = update(tserver, [p["payload"]], load_format="flattened_bucket", weight_version="bucket")
    assert [m["name"] for m in body["modules"]] == ["transformer"] and body["weight_version"] == "bucket", body
    assert tserver.checksums() == {**base, "transformer": got["checksum"]}
    status, body = check(tserver, "transformer", got["hashes"])
    assert status == 200 and body["success"], body

    # Miles's form: {module: bucket} with target_modules; metadata as SimpleNamespace with dtypes as strings
    # ("torch.bfloat16" and "bfloat16"), which SGLang also reads.
    got2 = load(trainer, "mixed2", transformer=spec(shard(ckpt.base, "transformer"), perturb=0.02, dtypes=dtypes))["transformer"]
    p = payload(trainer, "mixed2", format="bucket", dict=True, metadata="namespace")
    update(tserver, [p["payload"]], load_format="flattened_bucket", target_modules=["transformer"])
    assert tserver.checksums() == {**base, "transformer": got2["checksum"]}
    for ident in ("mixed", "mixed2"):
        trainer.call(op="drop", id=ident)


@pytest.mark.parametrize("layout", ["views", "strided"])
def test_views_into_a_shared_storage_and_strided_tensors(tserver, trainer, ckpt, layout):
    """views: every tensor a view at its own element offset into one flat storage (one segment, named once in the
    pickle and then by memo); strided: non-contiguous tensors (2-D as transposes, 1-D every other element). The
    server must honour storage_offset and strides as torch.multiprocessing.reductions.rebuild_tensor does."""
    base = reset(tserver, ckpt)
    got = load(trainer, layout, transformer=spec(shard(ckpt.base, "transformer"), perturb=0.03, layout=layout))["transformer"]
    p = payload(trainer, layout)
    assert len(p["handles"]) == (1 if layout == "views" else TRANSFORMER_TENSORS), p["handles"]
    update(tserver, [p["payload"]], weight_version=layout)
    assert tserver.checksums() == {**base, "transformer": got["checksum"]}
    trainer.call(op="drop", id=layout)


@pytest.mark.parametrize("fmt", ["list", "bucket"])
def test_a_dict_payload_updates_the_transformer_and_the_vae(tserver, trainer, ckpt, fmt):
    """{module: payload} for two modules in one request: seed 2's transformer and the perturbed vae's whole state
    dict (its batch-norm buffers and int64 step count too). Both modules then equal those checkpoints (refit's
    checksums of them on disk: parameters only, as SGLang's), the text encoder is untouched, and the checker
    confirms every vae tensor sent, buffers included."""
    base = reset(tserver, ckpt)
    ident = f"two-{fmt}"
    got = load(trainer, ident, transformer=spec(shard(ckpt.seed2, "transformer")),
               vae=spec(shard(ckpt.perturbed, "vae"), checksum_skip=["bn."]))
    assert got["transformer"]["checksum"] == ckpt.disk[str(ckpt.second)]["transformer"]
    assert got["vae"]["checksum"] == ckpt.disk[str(ckpt.perturbed)]["vae"]
    p = payload(trainer, ident, format=fmt, dict=True)
    fields = {"load_format": "flattened_bucket"} if fmt == "bucket" else {}
    body = update(tserver, [p["payload"]], target_modules=["transformer", "vae"], weight_version=ident, **fields)
    assert sorted(m["name"] for m in body["modules"]) == ["transformer", "vae"], body
    assert tserver.checksums() == {"text_encoder": base["text_encoder"], "transformer": got["transformer"]["checksum"],
                                   "vae": got["vae"]["checksum"]}
    vae_hashes = got["vae"]["hashes"]
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(vae_hashes)
    status, body = check(tserver, "vae", vae_hashes)
    assert status == 200 and body["message"] == f"Verified module 'vae' update for {len(vae_hashes)} tensor(s).", body
    trainer.call(op="drop", id=ident)


def test_target_modules_vae_with_a_list_payload(tserver, trainer, ckpt):
    base = reset(tserver, ckpt)
    got = load(trainer, "vae", vae=spec(shard(ckpt.perturbed, "vae"), skip=["bn."]))["vae"]
    assert got["checksum"] == ckpt.disk[str(ckpt.perturbed)]["vae"]
    body = update(tserver, [payload(trainer, "vae")["payload"]], target_modules=["vae"], weight_version="vae")
    assert [m["name"] for m in body["modules"]] == ["vae"], body
    assert tserver.checksums() == {**base, "vae": ckpt.disk[str(ckpt.perturbed)]["vae"]}
    trainer.call(op="drop", id="vae")


def test_a_payload_of_some_tensors_changes_only_those(tserver, trainer, ckpt):
    base = reset(tserver, ckpt)
    names = names_in(shard(ckpt.base, "transformer"))
    some = [names[0], SMALL, names[-1]]
    got = load(trainer, "some", transformer=spec(shard(ckpt.base, "transformer"), names=some, perturb=0.5,
                                                 complete_from=shard(ckpt.base, "transformer")))["transformer"]
    update(tserver, [payload(trainer, "some")["payload"]])
    assert tserver.checksums() == {**base, "transformer": got["checksum"]}
    status, body = check(tserver, "transformer", got["hashes"])
    assert status == 200 and body["message"] == "Verified module 'transformer' update for 3 tensor(s).", body
    trainer.call(op="drop", id="some")


@pytest.mark.parametrize("mode", ["staged", "in_place"])
def test_a_round_trip_through_the_trainer_restores_the_image(tserver, trainer, ckpt, mode):
    """To perturbed weights and back to the original ones, both from the trainer: the image of a fixed seed is the
    original's again, bit for bit, and the checksum the checkpoint's."""
    reset(tserver, ckpt)
    png_base, _ = tserver.generate(seed=5)
    load(trainer, "away", transformer=spec(shard(ckpt.base, "transformer"), perturb=0.05))
    load(trainer, "back", transformer=spec(shard(ckpt.base, "transformer")))
    body = update(tserver, [payload(trainer, "away")["payload"]], mode=mode, weight_version="away")
    assert body["mode"] == mode, body
    png_away, version = tserver.generate(seed=5)
    assert version == "away" and png_away != png_base
    body = update(tserver, [payload(trainer, "back")["payload"]], mode=mode, weight_version="back")
    assert body["mode"] == mode, body
    assert tserver.checksums() == ckpt.disk[str(ckpt.base)]
    png_back, version = tserver.generate(seed=5)
    assert version == "back" and png_back == png_base
    for ident in ("away", "back"):
        trainer.call(op="drop", id=ident)


LORA_RANK, LORA_ALPHA = 4, 8


def test_lora_merge_of_shared_lora_tensors(tserver, trainer, ckpt, tmp_path):
    """weight_update_mode "lora_merge": the trainer shares a LoRA adapter's lora_A / lora_B tensors (names as
    Miles sends them) and refit merges W + (B @ A) * lora_alpha / r, as PEFT's merge computes it in fp32."""
    reset(tserver, ckpt)
    base = {n: t.float() for n, t in load_file(shard(ckpt.base, "transformer")).items()}
    layers = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_out", "proj_out"]
    gen = torch.Generator().manual_seed(5)
    adapter, merged = {}, dict(base)
    for layer in layers:
        out_features, in_features = base[layer + ".weight"].shape
        a = torch.randn(LORA_RANK, in_features, generator=gen) * 0.1
        b = torch.randn(out_features, LORA_RANK, generator=gen) * 0.1
        adapter[layer + ".lora_A.weight"], adapter[layer + ".lora_B.weight"] = a, b
        merged[layer + ".weight"] = base[layer + ".weight"] + (b @ a) * (LORA_ALPHA / LORA_RANK)
    path = tmp_path / "adapter.safetensors"
    save_file(adapter, str(path))
    load(trainer, "lora", transformer=spec(path))
    update(tserver, [payload(trainer, "lora")["payload"]], weight_update_mode="lora_merge", lora_alpha=LORA_ALPHA,
           lora_rank=LORA_RANK, weight_version="lora")
    assert tserver.checksums(["transformer"])["transformer"] == sglang_checksum(merged)
    r = tserver.post("/v1/unmerge_lora_weights", {})
    assert r.status_code == 200, r.text
    assert tserver.checksums(["transformer"])["transformer"] == ckpt.disk[str(ckpt.base)]["transformer"]
    trainer.call(op="drop", id="lora")


def test_one_payload_per_worker(tmp_path_factory, trainer, ckpt):
    """--workers 2: one payload for both workers, or one each (payloads[i] for worker i); when either worker's
    payload cannot be opened, neither worker changes; more payloads than workers is refused."""
    server = Server(ckpt.base, tmp_path_factory.mktemp("two-workers"), "--workers", 2)
    try:
        base = server.checksums(["transformer"])["transformer"]
        want = ckpt.disk[str(ckpt.second)]["transformer"]
        load(trainer, "w1", transformer=spec(shard(ckpt.seed2, "transformer")))  # the same values in other segments

        def per_worker():
            return [server.checksums(["transformer"], worker=w)["transformer"] for w in (0, 1)]

        body = update(server, [payload(trainer, "good")["payload"]])
        assert sorted(m["worker"] for m in body["modules"]) == [0, 1], body
        assert per_worker() == [want, want]
        server.update(ckpt.base)
        assert per_worker() == [base, base]
        update(server, [payload(trainer, "good")["payload"], payload(trainer, "w1")["payload"]])
        assert per_worker() == [want, want]
        server.update(ckpt.base)
        for bad_at in (0, 1):
            payloads = [payload(trainer, "good")["payload"], payload(trainer, "w1")["payload"]]
            payloads[bad_at] = payload(trainer, "w1", edit={"name": EDITED, "handle": "/torch_1_1_1"})["payload"]
            status, body = post(server, {"serialized_named_tensors": payloads})
            assert status == 400 and body["success"] is False and "torch_1_1_1" in body["message"], (bad_at, body)
            assert per_worker() == [base, base]
        three = [payload(trainer, "good")["payload"] for _ in range(3)]
        status, body = post(server, {"serialized_named_tensors": three})
        assert status == 400 and "serialized_named_tensors" in body["message"] and "3" in body["message"], body
        assert per_worker() == [base, base]
        update(server, [payload(trainer, "good")["payload"]])
        assert per_worker() == [want, want]
        trainer.call(op="drop", id="w1")
    finally:
        server.kill()


def test_the_server_lets_go_of_the_trainers_segments(tserver, trainer, ckpt):
    """After its reply the server maps none of the trainer's segments. And it consumes a payload as torch's own
    rebuild_storage_filename does: map the segment, then drop the reference the trainer's pickling took
    (storage._shared_decref()). So once the trainer frees its tensors the segments are gone, rather than staying
    in /dev/shm until the trainer exits (a whole model's worth per update, for a trainer that shares fresh tensors
    at every step)."""
    reset(tserver, ckpt)
    got = load(trainer, "release", transformer=spec(shard(ckpt.base, "transformer"), perturb=0.04))["transformer"]
    p = payload(trainer, "release")
    update(tserver, [p["payload"]])
    assert tserver.checksums(["transformer"])["transformer"] == got["checksum"]

    def mapped():
        pids = [tserver.proc.pid] + [int(d) for d in os.listdir("/proc") if d.isdigit() and _ppid(int(d)) == tserver.proc.pid]
        maps = ""
        for pid in pids:
            try:
                maps += Path(f"/proc/{pid}/maps").read_text()
            except OSError:
                pass
        return [h for h in p["handles"] if h in maps]

    assert wait_until(lambda: not mapped(), 10), f"still mapped after the reply: {mapped()}"
    handles = trainer.call(op="drop", id="release")["handles"]
    assert set(p["handles"]) <= set(handles)
    assert wait_until(lambda: not any(segment_exists(h) for h in handles), 10), \
        f"segments left in /dev/shm after the trainer freed its tensors: {[h for h in handles if segment_exists(h)]}"


def _ppid(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def test_a_storage_announced_larger_than_its_segment(tserver, trainer, ckpt):
    """A storage size larger than its segment, the tensor itself inside the segment's bytes. torch's own consumer maps
    it (rebuild_storage_filename does not compare the size with the segment's); refit may refuse it or read the
    tensor, but it must neither read past the segment nor crash."""
    base = reset(tserver, ckpt)
    got = load(trainer, "big-storage", transformer=spec(shard(ckpt.seed2, "transformer")))["transformer"]
    p = payload(trainer, "big-storage", edit={"name": EDITED, "size_bytes": {"mul": 4096}})
    status, body = post(tserver, {"serialized_named_tensors": [p["payload"]]})
    if status == 200:
        assert tserver.checksums(["transformer"])["transformer"] == got["checksum"]
    else:
        assert status == 400 and body["success"] is False, body
        assert tserver.checksums() == base
    good_update_works(tserver, trainer, ckpt)
    trainer.call(op="drop", id="big-storage")


def test_the_trainers_manager_socket_is_never_contacted(tserver, trainer, ckpt):
    """Each shared storage names the trainer's torch_shm_manager socket; the server has no business with it. Pointed at
    a socket the test listens on, the update goes through and nothing connects."""
    reset(tserver, ckpt)
    got = load(trainer, "manager", transformer=spec(shard(ckpt.seed2, "transformer"), perturb=0.02))["transformer"]
    with tempfile.TemporaryDirectory(dir="/tmp") as d, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        path = os.path.join(d, "manager.sock")
        listener.bind(path)
        listener.listen(16)
        listener.setblocking(False)
        p = payload(trainer, "manager", edit={"name": "*", "manager": path})
        update(tserver, [p["payload"]])
        assert tserver.checksums(["transformer"])["transformer"] == got["checksum"]
        with pytest.raises(BlockingIOError):
            listener.accept()
    trainer.call(op="drop", id="manager")


def test_a_payload_whose_trainer_exited_is_refused(tserver, trainer, ckpt, tmp_path):
    """The trainer exits before the server reads: torch_shm_manager unlinks its segments, and the update is refused
    naming one, with nothing changed."""
    base = reset(tserver, ckpt)
    gone = TensorTrainer(tmp_path)
    try:
        load(gone, "gone", transformer=spec(shard(ckpt.seed2, "transformer")))
        p = payload(gone, "gone")
    finally:
        gone.close()
    assert wait_until(lambda: not any(segment_exists(h) for h in p["handles"]), 30), "torch_shm_manager kept the segments"
    status, body = post(tserver, {"serialized_named_tensors": [p["payload"]], "weight_version": "never"})
    assert status == 400 and body["success"] is False, body
    assert any(h.lstrip("/") in body["message"] for h in p["handles"]), body
    assert tserver.checksums() == base and tserver.info()["weight_version"] == "base"
    good_update_works(tserver, trainer, ckpt)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals: 400 naming the problem, every module as it was, and the next good update works.


class Sneaky:
    """A class of the test's own: no server may build it."""

    def __init__(self):
        self.x = 1


def _str(s):
    b = s.encode()
    return (b"\x8c" + bytes([len(b)]) + b) if len(b) < 256 else (b"X" + struct.pack("<I", len(b)) + b)


def attack(module, name, args, form="stack_global"):
    """An attacker's pickle in SGLang's list shape: [("transformer_blocks.0.attn.to_q.weight", module.name(*args))]
    with the callable named by STACK_GLOBAL, GLOBAL (protocol 0's opcode), or built by INST / OBJ."""
    def arg(a):
        if isinstance(a, list):
            return b"](" + b"".join(_str(x) for x in a) + b"e"
        return _str(a)
    argbytes = b"".join(arg(a) for a in args)
    if form == "stack_global":
        call = _str(module) + _str(name) + b"\x93" + argbytes + {1: b"\x85", 2: b"\x86"}[len(args)] + b"R"
    elif form == "global":
        call = b"c" + module.encode() + b"\n" + name.encode() + b"\n" + argbytes + {1: b"\x85", 2: b"\x86"}[len(args)] + b"R"
    elif form == "inst":
        call = b"(" + argbytes + b"i" + module.encode() + b"\n" + name.encode() + b"\n"
    elif form == "obj":
        call = b"(" + _str(module) + _str(name) + b"\x93" + argbytes + b"o"
    else:
        raise ValueError(form)
    return b"\x80\x04](" + _str("transformer_blocks.0.attn.to_q.weight") + call + b"\x86e."


def depth_bomb(n=100_000):
    """[[[[...]]]] n deep in 2n bytes."""
    return b"\x80\x04" + b"(" * n + b"l" * n + b"."


def memo_bomb(levels=6, width=1000):
    """A list of `width` references to a list of `width` references ... `levels` deep (width**levels leaves, a few
    kilobytes of pickle), as the tensor of one (name, tensor) pair."""
    out = bytearray(b"\x80\x04B" + struct.pack("<I", 1000) + b"x" * 1000 + b"\x940")
    for k in range(1, levels + 1):
        out += b"]\x94(" + (b"h" + bytes([k - 1])) * width + b"e0"
    out += b"](" + _str("transformer_blocks.0.attn.to_q.weight") + b"h" + bytes([levels]) + b"\x86e."
    return bytes(out)


def b64(data):
    return base64.b64encode(data).decode()


def raw(ctx, module, name, args, form="stack_global"):
    ctx.blocked = f"{module}.{name}"
    return b64(attack(module, name, args, form))


def good(ctx, **kw):
    return payload(ctx.trainer, "good", **kw)["payload"]


def edit(ctx, **e):
    return payload(ctx.trainer, "good", edit={"name": EDITED, **e})["payload"]


def renamed(ctx, name, new):
    ident = f"renamed-{new}"
    load(ctx.trainer, ident, transformer=spec(shard(ctx.ckpt.seed2, "transformer"), rename={name: new}))
    return payload(ctx.trainer, ident)["payload"]


def reshaped(ctx, name, shape):
    ident = f"reshaped-{name}"
    load(ctx.trainer, ident, transformer=spec(shard(ctx.ckpt.seed2, "transformer"), reshape={name: shape}))
    return payload(ctx.trainer, ident)["payload"]


def fd_strategy(ctx):
    load(ctx.trainer, "fd", transformer=spec(shard(ctx.ckpt.seed2, "transformer"), names=[SMALL]))
    return payload(ctx.trainer, "fd", strategy="file_descriptor")["payload"]


def injected(ctx, kind, fmt="list"):
    p = payload(ctx.trainer, "good", inject=kind, marker=str(ctx.marker), format=fmt)
    ctx.blocked = p["global"]
    return p["payload"]


def T(payloads, **fields):
    return {"serialized_named_tensors": payloads, **fields}


# id -> (body builder, substrings the message must hold; "BLOCKED": "Blocked unsafe global (<the global>)")
REFUSALS = {
    # The request
    "missing": (lambda c: {}, ["serialized_named_tensors is required"]),
    "null": (lambda c: T(None), ["serialized_named_tensors is required"]),
    "empty_list": (lambda c: T([]), ["serialized_named_tensors is required"]),
    "not_a_list": (lambda c: {"serialized_named_tensors": good(c)}, ["serialized_named_tensors"]),
    "item_not_a_string": (lambda c: T([12]), ["serialized_named_tensors"]),
    "unknown_field": (lambda c: T([good(c)], lora_strength=1.0), ["lora_strength"]),
    "load_format_unknown": (lambda c: T([good(c)], load_format="direct"), ["load_format"]),
    "weight_update_mode_unknown": (lambda c: T([good(c)], weight_update_mode="sideways"), ["weight_update_mode"]),
    "lora_alpha_without_lora_merge": (lambda c: T([good(c)], lora_alpha=8), ["lora_alpha"]),
    "flush_cache_not_bool": (lambda c: T([good(c)], flush_cache="yes"), ["flush_cache"]),
    "target_modules_not_a_list": (lambda c: T([good(c)], target_modules="transformer"), ["target_modules"]),
    "unknown_target_module": (lambda c: T([good(c)], target_modules=["no_such_module"]), ["no_such_module"]),
    "more_payloads_than_workers": (lambda c: T([good(c), good(c)]), ["serialized_named_tensors", "2"]),
    "gpu_uuids_on_a_cpu_server": (lambda c: T([good(c)], payload_gpu_uuids=["GPU-00000000-0000-0000-0000-000000000000"]),
                                  ["GPU"]),
    "gpu_uuids_count": (lambda c: T([good(c)], payload_gpu_uuids=["GPU-a", "GPU-b"]), ["payload_gpu_uuids"]),
    # Bytes that are no payload
    "not_base64": (lambda c: T(["@@@ not base64 @@@"]), [PREFIX]),
    "base64_of_no_pickle": (lambda c: T([b64(b"hello, world")]), [PREFIX]),
    "truncated_pickle": (lambda c: T([b64(base64.b64decode(good(c))[:300])]), [PREFIX]),
    "depth_bomb": (lambda c: T([b64(depth_bomb())]), [PREFIX]),
    "memo_bomb": (lambda c: T([b64(memo_bomb())]), []),
    # Globals outside torch's rebuild functions, classes and dtypes (and SGLang's bucket metadata)
    "os.system": (lambda c: T([raw(c, "os", "system", [f"touch {c.marker}"])]), [PREFIX, "BLOCKED"]),
    "os.system_by_GLOBAL": (lambda c: T([raw(c, "os", "system", [f"touch {c.marker}"], "global")]), [PREFIX, "BLOCKED"]),
    "os.system_by_INST": (lambda c: T([raw(c, "os", "system", [f"touch {c.marker}"], "inst")]), [PREFIX]),
    "os.system_by_OBJ": (lambda c: T([raw(c, "os", "system", [f"touch {c.marker}"], "obj")]), [PREFIX]),
    "posix.system": (lambda c: T([raw(c, "posix", "system", [f"touch {c.marker}"])]), [PREFIX, "BLOCKED"]),
    "builtins.eval": (lambda c: T([raw(c, "builtins", "eval", [f"__import__('os').system('touch {c.marker}')"])]),
                      [PREFIX, "BLOCKED"]),
    "builtins.exec_by_GLOBAL": (lambda c: T([raw(c, "builtins", "exec", [f"open('{c.marker}', 'w')"], "global")]),
                                [PREFIX, "BLOCKED"]),
    "builtins.getattr": (lambda c: T([raw(c, "builtins", "getattr", ["os", "system"])]), [PREFIX, "BLOCKED"]),
    "subprocess.Popen": (lambda c: T([raw(c, "subprocess", "Popen", [["touch", str(c.marker)]])]), [PREFIX, "BLOCKED"]),
    "torch.load": (lambda c: T([raw(c, "torch", "load", [str(c.marker)])]), [PREFIX, "BLOCKED"]),
    "torch.storage._load_from_bytes": (lambda c: T([raw(c, "torch.storage", "_load_from_bytes", ["x"])]), [PREFIX, "BLOCKED"]),
    "torch.multiprocessing.reductions.init_reductions": (
        lambda c: T([raw(c, "torch.multiprocessing.reductions", "init_reductions", ["x"])]), [PREFIX, "BLOCKED"]),
    "sglang.srt.utils.common.dynamic_import": (
        lambda c: T([raw(c, "sglang.srt.utils.common", "dynamic_import", ["os.system"])]), [PREFIX, "BLOCKED"]),
    "a_class_of_the_tests_own": (
        lambda c: T([b64(pickle.dumps([("transformer_blocks.0.attn.to_q.weight", Sneaky())], protocol=4))]),
        [PREFIX, f"Blocked unsafe global ({Sneaky.__module__}.{Sneaky.__qualname__})"]),
    # ... after the trainer's real tensors, pickled by the trainer (os.system pickles as posix.system)
    "posix.system_after_real_tensors": (lambda c: T([injected(c, "posix.system")]), [PREFIX, "BLOCKED"]),
    "builtins.eval_after_real_tensors": (lambda c: T([injected(c, "builtins.eval")]), [PREFIX, "BLOCKED"]),
    "subprocess.Popen_after_real_tensors": (lambda c: T([injected(c, "subprocess.Popen")]), [PREFIX, "BLOCKED"]),
    "the_trainers_own_class_after_real_tensors": (lambda c: T([injected(c, "own_class")]), [PREFIX, "BLOCKED"]),
    "posix.system_in_bucket_metadata": (lambda c: T([injected(c, "posix.system", "bucket")], load_format="flattened_bucket"),
                                        [PREFIX, "BLOCKED"]),
    "file_descriptor_sharing_strategy": (lambda c: T([fd_strategy(c)]), [PREFIX]),
    # Payloads of the wrong shape
    "empty_pair_list": (lambda c: T([b64(pickle.dumps([], protocol=4))]), []),
    "not_a_pair": (lambda c: T([b64(pickle.dumps([("transformer_blocks.0.attn.to_q.weight",)], protocol=4))]), []),
    "not_a_tensor": (lambda c: T([b64(pickle.dumps([("transformer_blocks.0.attn.to_q.weight", 1.5)], protocol=4))]),
                     ["transformer_blocks.0.attn.to_q.weight"]),
    "a_list_for_two_modules": (lambda c: T([good(c)], target_modules=["transformer", "vae"]), []),
    "dict_payload_missing_a_target_module": (lambda c: T([good(c, dict=True)], target_modules=["transformer", "vae"]),
                                             ["Missing tensor payload for module(s)", "vae"]),
    "a_list_announced_as_flattened_bucket": (lambda c: T([good(c)], load_format="flattened_bucket"), ["flattened_bucket"]),
    "a_bucket_announced_as_a_list": (lambda c: T([good(c, format="bucket")]), []),
    "a_name_the_module_lacks": (lambda c: T([renamed(c, EDITED, "transformer_blocks.0.attn.no_such.weight")]),
                                ["transformer_blocks.0.attn.no_such.weight"]),
    "a_name_of_another_module": (lambda c: T([renamed(c, EDITED, "decoder.conv_in.weight")]), ["decoder.conv_in.weight"]),
    "a_wrong_shape": (lambda c: T([reshaped(c, EDITED, [16, 32])]), [EDITED]),
    "full_weights_as_lora_merge": (lambda c: T([good(c)], weight_update_mode="lora_merge"), []),
    # Shared memory: names that are not (or no longer) torch's segments, views past their segment
    "a_freed_segment": (lambda c: T([edit(c, handle="/torch_1_1_1")]), ["torch_1_1_1"]),
    "etc_passwd": (lambda c: T([edit(c, handle="/etc/passwd")]), ["/etc/passwd"]),
    "dot_dot": (lambda c: T([edit(c, handle="../x")]), []),
    "traversal_to_etc_passwd": (lambda c: T([edit(c, handle="/../../etc/passwd")]), []),
    "empty_name": (lambda c: T([edit(c, handle="")]), []),
    "nul_in_the_name": (lambda c: T([edit(c, handle="/torch_1_2_3\x00/../../etc/passwd")]), []),
    "a_very_long_name": (lambda c: T([edit(c, handle="/torch_" + "1" * 5000 + "_1_1")]), []),
    "the_view_one_element_past_the_storage": (lambda c: T([edit(c, offset={"add": 1})]), ["VIEW"]),
    "the_view_past_the_segment_inside_a_larger_storage": (
        lambda c: T([edit(c, size_bytes={"add": 1 << 20}, offset={"add": 1 << 18})]), ["VIEW"]),
    "a_stride_past_the_storage": (lambda c: T([edit(c, stride=[17, 1])]), ["VIEW"]),
    "a_wider_dtype_than_the_storage_holds": (lambda c: T([edit(c, dtype="float64")]), ["VIEW"]),
    "a_negative_offset": (lambda c: T([edit(c, offset=-1)]), []),
    "a_negative_stride": (lambda c: T([edit(c, stride=[-16, 1])]), []),
    "a_negative_storage_size": (lambda c: T([edit(c, size_bytes=-8)]), []),
    "an_offset_that_wraps_around": (lambda c: T([edit(c, offset=1 << 62)]), []),
    "a_stride_that_wraps_around": (lambda c: T([edit(c, stride=[1 << 62, 1])]), []),
    "an_offset_past_int64": (lambda c: T([edit(c, offset=1 << 64)]), []),
    "bucket_metadata_past_the_bucket": (
        lambda c: T([good(c, format="bucket", meta_edit={"name": EDITED, "end_idx": 1 << 40})], load_format="flattened_bucket"),
        [EDITED]),
    "bucket_metadata_shape_not_its_bytes": (
        lambda c: T([good(c, format="bucket", meta_edit={"name": EDITED, "shape": [31, 16]})], load_format="flattened_bucket"),
        [EDITED]),
    "a_bucket_whose_segment_is_gone": (
        lambda c: T([good(c, format="bucket", edit={"name": "flattened_tensor", "handle": "/torch_1_1_1"})],
                    load_format="flattened_bucket"), ["torch_1_1_1"]),
    "a_bucket_past_its_segment": (
        lambda c: T([good(c, format="bucket", edit={"name": "flattened_tensor", "size_bytes": {"add": 1 << 20},
                                                    "offset": {"add": 1 << 20}})], load_format="flattened_bucket"), []),
}


class Ctx:
    def __init__(self, trainer, ckpt, marker):
        self.trainer, self.ckpt, self.marker, self.blocked = trainer, ckpt, marker, None


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_update_changes_nothing(tserver, trainer, ckpt, tmp_path, case):
    base = reset(tserver, ckpt)
    ctx = Ctx(trainer, ckpt, tmp_path / "pwned")
    build, expected = REFUSALS[case]
    body = build(ctx)
    if isinstance(body, dict) and body.get("serialized_named_tensors") is not None:
        body.setdefault("weight_version", "never")
    status, reply = post(tserver, body, timeout=60)
    assert status == 400 and reply["success"] is False, (status, reply)
    message = reply["message"]
    for part in expected:
        if part == "BLOCKED":
            part = f"Blocked unsafe global ({ctx.blocked})"
        elif part == "VIEW":  # the tensor or its segment
            assert EDITED in message or "torch_" in message, message
            continue
        assert part in message, f"{part!r} not in {message!r}"
    if PREFIX in expected:
        assert message.startswith(PREFIX), message
    assert not ctx.marker.exists(), "the payload ran code on the server"
    assert tserver.checksums() == base
    assert tserver.info()["weight_version"] == "base"
    good_update_works(tserver, trainer, ckpt)


def test_a_malformed_request_body(tserver, trainer, ckpt):
    base = reset(tserver, ckpt)
    for raw in (b'{"serialized_named_tensors": [', b"", b'["x"]', b"null"):
        status, reply = post(tserver, raw=raw)
        assert status == 400 and reply["success"] is False and reply["message"], (raw, reply)
    assert tserver.checksums() == base
    good_update_works(tserver, trainer, ckpt)


class Inotify:
    """Reports any open of the watched files (by any process), through inotify(7)."""
    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self):
        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())

    def watch(self, path):
        wd = self.libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN | self.IN_ACCESS)
        assert wd >= 0, os.strerror(ctypes.get_errno())

    def events(self):
        try:
            return os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return b""

    def close(self):
        os.close(self.fd)


def test_names_that_are_not_torch_segments_are_never_opened(tserver, trainer, ckpt):
    """A decoy file laid out as a segment of the right size (a 64-byte header, then 16 fp32 values): reached by path
    traversal from /dev/shm, by its absolute path, or through a symlink in /dev/shm with a torch segment's name. And
    a FIFO with a torch segment's name (opening it for reading would block until a writer came). Each update is
    refused, changes nothing, and no process opens the decoy or holds the FIFO."""
    base = reset(tserver, ckpt)
    workdir = Path(tempfile.mkdtemp(dir="/tmp"))
    decoy = workdir / "decoy"
    decoy.write_bytes(bytes(64) + struct.pack("<16f", *([2.0] * 16)))
    link = Path(f"/dev/shm/torch_{os.getpid()}_4242_0")
    fifo = Path(f"/dev/shm/torch_{os.getpid()}_4343_0")
    for trap in (link, fifo):
        trap.unlink(missing_ok=True)
    link.symlink_to(decoy)
    os.mkfifo(fifo)
    watch = Inotify()
    watch.watch(decoy)
    try:
        for handle in ("/../.." + str(decoy), "../.." + str(decoy), str(decoy), "/" + link.name, "/" + fifo.name):
            p = payload(trainer, "small", edit={"name": SMALL, "handle": handle})
            try:
                status, reply = post(tserver, {"serialized_named_tensors": [p["payload"]]}, timeout=15)
            except requests.Timeout:
                pytest.fail(f"no reply within 15 s to the name {handle!r}: is the server blocked opening {fifo} "
                            "(a FIFO: open without O_NONBLOCK waits for a writer)?")
            assert status == 400 and reply["success"] is False, (handle, status, reply)
            assert tserver.checksums() == base, handle
            assert watch.events() == b"", f"the decoy was opened through the name {handle!r}"
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                assert e.errno == errno.ENXIO, e
            else:
                os.close(fd)
                pytest.fail(f"the FIFO {fifo} is held open for reading (after the name {handle!r})")
    finally:
        try:  # a server stuck opening the FIFO gets its writer (and EOF)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        link.unlink()
        fifo.unlink()
        watch.close()
        decoy.unlink()
        workdir.rmdir()
    good_update_works(tserver, trainer, ckpt)
