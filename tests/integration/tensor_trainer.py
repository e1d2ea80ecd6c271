"""A colocated PyTorch trainer for the update_weights_from_tensor tests (test_tensor_update.py), in its own process.

It holds its tensors in shared memory (torch.multiprocessing's "file_system" sharing strategy, as a CPU trainer must)
and serializes them exactly as SGLang's trainers do: SGLang's own MultiprocessingSerializer.serialize(obj,
output_str=True) (ForkingPickler + base64), a list of (name, tensor) pairs, a dict {module: payload}, or with
load_format "flattened_bucket" SGLang's own FlattenedTensorBucket per module ({"flattened_tensor", "metadata"}).
The tensors stay alive until the test drops them (the server maps the segments by name while it answers).
Oracles come from SGLang's own code, over the values the fp32 server will hold: compute_weights_checksum (the
module checksum of /get_weights_checksum) and compute_tensor_sha256 / TensorUpdateChecker._compare_manifests
(the checker's per-tensor hashes and messages).

For the refusal tests it can also pickle hostile variants of a real payload: one tensor's reduction rewritten
(shared-memory name, manager socket, storage size, storage offset, size, stride, dtype), bucket metadata rewritten,
a gadget appended after the real tensors, or the default "file_descriptor" strategy.

JSON lines on stdin, one reply line each on stdout:
  {"op": "load", "id": ID, "modules": {module: SPEC}}                 -> {"modules": {module: {"names", "checksum", "hashes"}}}
     SPEC: {"file": f.safetensors, "names": [...] | null (all), "skip": [prefix, ...], "perturb": 0.0,
            "dtype": "float32" (floating tensors; null: as stored), "dtypes": {name: dtype}, "parameter": false,
            "layout": "plain" | "views" | "strided", "rename": {name: wire name}, "reshape": {name: shape},
            "complete_from": f.safetensors | null, "checksum_skip": [prefix, ...]}
     checksum: SGLang's module checksum once the module holds what was sent (names in complete_from that were not
     sent keep complete_from's values; names starting with a checksum_skip prefix are buffers, which it leaves out)
  {"op": "payload", "id": ID, "format": "list" | "bucket", "dict": false, "metadata": "dataclass" | "namespace",
   "edit": {"module", "name" ("*": every tensor), "handle", "manager", "size_bytes", "offset", "shape", "stride",
            "dtype"}, "meta_edit": {"module", "name", "start_idx", "end_idx", "shape", "dtype"},
   "inject": "posix.system" | "builtins.eval" | "subprocess.Popen" | "own_class", "marker": path,
   "strategy": "file_system" | "file_descriptor"}                     -> {"payload", "handles", "segment_bytes", "global"}
     numbers in edit may be {"add": n} or {"mul": n} (relative to the real value)
  {"op": "check", "id": ID}                                            -> {"unchanged": bool}
  {"op": "drop", "id": ID}                                             -> {"handles": [...]}
     frees the tensors (the segments its payloads named: gone once no one else maps or owes them)
  {"op": "compare", "module": m, "expected": {...}, "actual": {...}}  -> {"ok": bool, "message": str}
  {"op": "quit"}
"""
import base64
import dataclasses
import gc
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import types
import warnings

# Replies go to the real stdout; anything else printed (by SGLang's imports, say) goes to stderr.
_replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402  (registers torch's reductions with ForkingPickler)
from multiprocessing.reduction import ForkingPickler  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.multiprocessing import reductions as R  # noqa: E402

import json_lines  # noqa: E402  (beside this script)

from sglang.multimodal_gen.runtime.loader.weight_utils import compute_weights_checksum  # noqa: E402
from sglang.multimodal_gen.runtime.post_training.tensor_update_checker import (  # noqa: E402
    TensorUpdateChecker, compute_tensor_sha256)
from sglang.srt.utils.common import MultiprocessingSerializer  # noqa: E402
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket  # noqa: E402

mp.set_sharing_strategy("file_system")
# Not SGLang's monkey_patch_torch_reductions(): its reduce_tensor swaps argument 6 (the CUDA device) for the GPU's
# UUID unconditionally, and a CPU tensor's reduction has 3 arguments (IndexError). A CPU trainer uses torch's own.

HANDLE = re.compile(rb"/torch_[0-9]+_[0-9]+_[0-9]+")
store = {}  # id -> {"modules": {module: [(wire name, tensor)]}, "snapshot": {...}, "buckets": {...}}


def held(t):
    """What the fp32 server holds after loading t."""
    return t.detach().float() if t.is_floating_point() else t.detach()


def tensor_sha256(t):
    """The checker's per-tensor hash: SGLang's compute_tensor_sha256, which cannot hash a 0-dim tensor (it views
    the tensor itself as uint8, which torch refuses for a scalar); its formula on the one element for those."""
    if t.dim() > 0:
        return compute_tensor_sha256(t)
    h = hashlib.sha256()
    h.update(str(t.dtype).encode("utf-8"))
    h.update(repr(tuple(t.shape)).encode("utf-8"))
    h.update(t.detach().cpu().reshape(1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_tensor(t, name, spec):
    dtype = spec.get("dtypes", {}).get(name, spec.get("dtype", "float32"))
    dtype = getattr(torch, dtype) if dtype else t.dtype
    if name in spec.get("reshape", {}):
        shape = spec["reshape"][name]
        n = 1
        for d in shape:
            n *= d
        t = (torch.arange(n, dtype=torch.float32) * 1e-3).reshape(shape)
    if t.is_floating_point():
        if dtype == torch.float64:
            t = t.double() + spec.get("perturb", 0.0)  # perturbed in fp64: the server must round to fp32
        else:
            t = (t.float() + spec.get("perturb", 0.0)).to(dtype)
    return t.contiguous()


def lay_out(named, layout):
    """Copies the tensors into fresh storages: one each (plain), views into one flat storage per dtype at odd
    offsets (views), or non-contiguous views (strided: 2-D as the transpose of a transposed copy, 1-D every other
    element of a storage twice as long)."""
    if layout == "plain":
        return [(n, t.clone()) for n, t in named]
    if layout == "views":
        by_dtype = {}
        for n, t in named:
            by_dtype.setdefault(t.dtype, []).append((n, t))
        placed = {}
        for dtype, group in by_dtype.items():
            total = sum(t.numel() + 3 for _, t in group) + 5
            flat = torch.zeros(total, dtype=dtype)
            offset = 5
            for n, t in group:
                view = flat[offset:offset + t.numel()].view(t.shape)
                view.copy_(t)
                placed[n] = view
                offset += t.numel() + 3
        return [(n, placed[n]) for n, _ in named]
    if layout == "strided":
        out = []
        for n, t in named:
            if t.dim() == 2:
                s = t.t().contiguous().t()
            elif t.dim() == 1:
                buf = torch.zeros(2 * t.numel(), dtype=t.dtype)
                buf[::2] = t
                s = buf[::2]
            else:
                s = t.clone()
            assert torch.equal(s, t)
            out.append((n, s))
        return out
    raise ValueError(f"unknown layout {layout!r}")


def load(cmd):
    entry = {"modules": {}, "snapshot": {}, "buckets": {}, "handles": set()}
    reply = {}
    for module, spec in cmd["modules"].items():
        tensors = load_file(spec["file"])
        names = spec.get("names") or sorted(tensors)
        names = [n for n in names if not any(n.startswith(p) for p in spec.get("skip", []))]
        named = [(n, make_tensor(tensors[n], n, spec)) for n in names]
        named = lay_out(named, spec.get("layout", "plain"))
        if spec.get("parameter"):
            named = [(n, torch.nn.Parameter(t, requires_grad=t.is_floating_point())) for n, t in named]
        rename = spec.get("rename", {})
        wire = [(rename.get(n, n), t) for n, t in named]
        entry["modules"][module] = wire
        entry["snapshot"][module] = [(n, t.detach().clone()) for n, t in wire]
        skip = spec.get("checksum_skip", [])
        final = {}
        if spec.get("complete_from"):
            final = {n: held(t) for n, t in load_file(spec["complete_from"]).items()}
        final.update({n: held(t) for n, t in wire})
        final = [(n, t) for n, t in final.items() if not any(n.startswith(p) for p in skip)]
        reply[module] = {"names": [n for n, _ in wire], "checksum": compute_weights_checksum(final),
                         "hashes": {n: tensor_sha256(held(t)) for n, t in wire}}
    store[cmd["id"]] = entry
    return {"modules": reply}


class Call:
    """Pickles as fn(*args): how a rewritten reduction names torch's own rebuild functions."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class Sneaky:
    """A class of the trainer's own: no server may build it."""

    def __init__(self):
        self.payload = "not a tensor"


def _number(spec, real):
    if isinstance(spec, dict):
        return real + spec["add"] if "add" in spec else real * spec["mul"]
    return spec


def edited_reduction(t, e):
    """torch's reduce_tensor for a CPU tensor shared by file name, with the fields in e rewritten."""
    fn, (cls, _typed, (offset, size, stride, requires_grad)) = R.reduce_tensor(t)
    sfn, (scls, manager, handle, nbytes) = R.reduce_storage(t.untyped_storage())  # shares the storage, increfs it
    assert sfn is R.rebuild_storage_filename, sfn
    if "handle" in e:
        handle = e["handle"].encode("latin-1")
    if "manager" in e:
        manager = e["manager"].encode()
    if "size_bytes" in e:
        nbytes = _number(e["size_bytes"], nbytes)
    if "offset" in e:
        offset = _number(e["offset"], offset)
    if "shape" in e:
        size = torch.Size(e["shape"])
    if "stride" in e:
        stride = tuple(e["stride"])
    dtype = getattr(torch, e["dtype"]) if "dtype" in e else t.dtype
    storage = Call(R.rebuild_typed_storage, (Call(sfn, (scls, manager, handle, nbytes)), dtype))
    return (fn, (cls, storage, (offset, size, stride, requires_grad)))


class EditingPickler(ForkingPickler):
    def __init__(self, buf, edits):
        super().__init__(buf)
        self._edits = edits  # id(tensor) -> edit

    def reducer_override(self, obj):
        e = self._edits.get(id(obj))
        if e is None:
            return NotImplemented
        return edited_reduction(obj, e)


def serialize(obj, edits):
    """SGLang's MultiprocessingSerializer.serialize(obj, output_str=True); the same steps with rewritten reductions."""
    if not edits:
        return MultiprocessingSerializer.serialize(obj, output_str=True)
    buf = io.BytesIO()
    EditingPickler(buf, edits).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("utf-8")


def gadget(kind, marker):
    if kind == "posix.system":
        return Call(os.system, (f"touch {marker}",)), "posix.system"
    if kind == "builtins.eval":
        return Call(eval, (f"__import__('os').system('touch {marker}')",)), "builtins.eval"
    if kind == "subprocess.Popen":
        return Call(subprocess.Popen, (["touch", marker],)), "subprocess.Popen"
    if kind == "own_class":
        return Sneaky(), f"{Sneaky.__module__}.{Sneaky.__qualname__}"
    raise ValueError(f"unknown gadget {kind!r}")


def bucket_of(entry, module):
    """SGLang's FlattenedTensorBucket of the module's tensors, widest dtype first so every tensor starts at a
    multiple of its element size (SGLang's reconstruct_tensors views the bytes as the dtype); kept alive here."""
    if module not in entry["buckets"]:
        named = sorted(entry["modules"][module], key=lambda nt: -nt[1].element_size())
        b = FlattenedTensorBucket(named_tensors=[(n, t.detach()) for n, t in named])
        # SGLang's own reconstruction gives back what was put in.
        back = FlattenedTensorBucket(flattened_tensor=b.get_flattened_tensor(), metadata=b.get_metadata()).reconstruct_tensors()
        assert [n for n, _ in back] == [n for n, _ in named]
        assert all(torch.equal(x, y.detach()) and x.dtype == y.dtype for (_, x), (_, y) in zip(back, named))
        entry["buckets"][module] = b
    return entry["buckets"][module]


def payload(cmd):
    entry = store[cmd["id"]]
    strategy = cmd.get("strategy", "file_system")
    edit, meta_edit = cmd.get("edit"), cmd.get("meta_edit")
    edits, reply = {}, {"global": None}
    obj = {}
    for module, wire in entry["modules"].items():
        if cmd.get("format", "list") == "bucket":
            b = bucket_of(entry, module)
            flat, metadata = b.get_flattened_tensor(), list(b.get_metadata())
            if meta_edit and meta_edit.get("module", module) == module:
                i = next(i for i, m in enumerate(metadata) if m.name == meta_edit["name"])
                changes = {k: v for k, v in meta_edit.items() if k in ("start_idx", "end_idx", "numel")}
                if "shape" in meta_edit:
                    changes["shape"] = torch.Size(meta_edit["shape"])
                if "dtype" in meta_edit:
                    changes["dtype"] = getattr(torch, meta_edit["dtype"])
                metadata[i] = dataclasses.replace(metadata[i], **changes)
            if cmd.get("metadata") == "namespace":  # SGLang also reads SimpleNamespace metadata, dtype as a string
                metadata = [types.SimpleNamespace(name=m.name, shape=m.shape, start_idx=m.start_idx, end_idx=m.end_idx,
                                                  numel=m.numel,
                                                  dtype=str(m.dtype) if i % 2 else str(m.dtype).removeprefix("torch."))
                            for i, m in enumerate(metadata)]
            if edit and edit.get("module", module) == module:
                edits[id(flat)] = edit
            obj[module] = {"flattened_tensor": flat, "metadata": metadata}
            if cmd.get("inject"):
                g, reply["global"] = gadget(cmd["inject"], cmd["marker"])
                metadata.append(g)
        else:
            pairs = list(wire)
            if edit and edit.get("module", module) == module:
                for n, t in pairs:
                    if edit["name"] in ("*", n):
                        edits[id(t)] = edit
            if cmd.get("inject"):
                g, reply["global"] = gadget(cmd["inject"], cmd["marker"])
                pairs.append(("injected.weight", g))
            obj[module] = pairs
    if edit:
        assert edits, f"edit {edit} matched no tensor"
    if not cmd.get("dict") and len(obj) == 1:
        obj = next(iter(obj.values()))
    mp.set_sharing_strategy(strategy)
    try:
        reply["payload"] = serialize(obj, edits)
    finally:
        mp.set_sharing_strategy("file_system")
    raw = base64.b64decode(reply["payload"])
    handles = sorted({h.decode() for h in HANDLE.findall(raw)})
    entry["handles"].update(h for h in handles if os.path.exists("/dev/shm" + h))
    reply["handles"] = handles
    reply["segment_bytes"] = {h: os.path.getsize("/dev/shm" + h) for h in handles if os.path.exists("/dev/shm" + h)}
    return reply


def handle(cmd):
    op = cmd["op"]
    if op == "load":
        return load(cmd)
    if op == "payload":
        return payload(cmd)
    if op == "check":
        entry = store[cmd["id"]]
        same = all(torch.equal(a.detach(), b) and a.dtype == b.dtype
                   for m in entry["modules"] for (_, a), (_, b) in zip(entry["modules"][m], entry["snapshot"][m]))
        return {"unchanged": same}
    if op == "drop":
        entry = store.pop(cmd["id"])
        handles = sorted(entry["handles"])
        entry.clear()
        del entry
        gc.collect()
        return {"handles": handles}
    if op == "compare":
        ok, message = TensorUpdateChecker(None)._compare_manifests(
            target_module=cmd["module"], expected_named_tensors_sha256=cmd["expected"],
            actual_named_tensors_sha256=cmd["actual"])
        return {"ok": ok, "message": message}
    raise ValueError(f"unknown op {op!r}")


def main():
    json_lines.serve(handle, _replies)


if __name__ == "__main__":
    main()
