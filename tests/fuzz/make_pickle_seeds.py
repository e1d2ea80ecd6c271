#!/usr/bin/env python3
"""Writes tests/fuzz/pickle_seeds/: seeds for the pickle reader's fuzzer (tests/fuzz/fuzz_pickle.cpp).

Real payloads: what a trainer sends to /update_weights_from_tensor, pickled by torch's ForkingPickler with
the "file_system" sharing strategy (named pairs, per-module dicts, SGLang's flattened buckets), protocols 2, 4
and 5. Hostile payloads: reducers that would run something, custom classes, cycles, deep nesting, huge length
prefixes, memo bombs, truncations, trailing bytes and opcodes the reader refuses.

Deterministic: the shared-memory names in real payloads (segments that vanish when this script exits; the
reader only parses bytes) are rewritten to fixed ones, length prefixes and frames fixed up.
  python3 tests/fuzz/make_pickle_seeds.py        (needs torch; SGLang's tensor_bucket from .deps-py/sglang if there)
"""
import io
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import types

import torch
import torch.multiprocessing as mp
from multiprocessing.reduction import ForkingPickler
from torch.multiprocessing.reductions import rebuild_cuda_tensor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.join(ROOT, "tests", "fuzz", "pickle_seeds")
sys.path.append(os.path.join(ROOT, ".deps-py", "sglang"))
try:
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
except Exception:  # SGLang not installed: the same fields on a SimpleNamespace
    FlattenedTensorBucket = None

mp.set_sharing_strategy("file_system")
PROTOCOLS = (2, 4, 5)
seeds = {}


def add(name, data):
    assert name not in seeds, name
    seeds[name] = bytes(data)


def forking(obj, protocol):
    buf = io.BytesIO()
    ForkingPickler(buf, protocol).dump(obj)
    return buf.getvalue()


# Shared-memory names and the shm manager's socket differ per run: fixed names, in the order they appear.
SHM = rb"/torch_\d+_\d+_\d+|/tmp/torch-shm-dir-[A-Za-z0-9_]+/manager\.sock"


def normalize(data):
    names = {}

    def fixed(old):
        if old not in names:
            names[old] = b"/tmp/torch-shm-dir-seed/manager.sock" if old.endswith(b".sock") else b"/torch_seed_%d" % sum(not n.endswith(b".sock") for n in names)
        return names[old]

    def short(m):  # SHORT_BINBYTES / SHORT_BINUNICODE: one length byte
        if m.group(2)[0] != len(m.group(3)):
            return m.group(0)
        new = fixed(m.group(3))
        return m.group(1) + bytes([len(new)]) + new

    def long(m):  # BINBYTES / BINUNICODE: four length bytes
        if struct.unpack("<I", m.group(2))[0] != len(m.group(3)):
            return m.group(0)
        new = fixed(m.group(3))
        return m.group(1) + struct.pack("<I", len(new)) + new

    out = re.sub(rb"([C\x8c])(.)(" + SHM + rb")", short, data, flags=re.S)
    out = re.sub(rb"([BX])(....)(" + SHM + rb")", long, out, flags=re.S)
    assert not re.search(SHM, out.replace(b"/tmp/torch-shm-dir-seed/", b"")), "a name left"
    if out[:1] == b"\x80" and out[2:3] == b"\x95":  # one FRAME (payloads here are far below 64 KiB)
        assert struct.unpack("<Q", data[3:11])[0] == len(data) - 11, "more than one frame"
        out = out[:3] + struct.pack("<Q", len(out) - 11) + out[11:]
    return out


# --- real payloads -------------------------------------------------------------------------------------------
g = torch.Generator().manual_seed(0)
w = torch.randn(2, 3, generator=g)
named = [
    ("blocks.0.weight", w),
    ("blocks.0.weight_row", w[1]),  # a view: the same storage
    ("blocks.0.scale", torch.nn.Parameter(torch.randn(3, generator=g).to(torch.bfloat16))),
    ("pos_ids", torch.arange(4, dtype=torch.int64)),
    ("temperature", torch.tensor(0.5)),  # 0-d
]
per_module = {"transformer": named[:3], "vae": [("decoder.conv.bias", torch.zeros(2, dtype=torch.float16))]}


def bucket(pairs, namespace):
    if FlattenedTensorBucket is not None and not namespace:
        b = FlattenedTensorBucket(named_tensors=pairs)
        return {"flattened_tensor": b.get_flattened_tensor(), "metadata": b.get_metadata()}
    parts, metadata, idx = [], [], 0
    for name, t in pairs:
        flat = t.detach().flatten().view(torch.uint8)
        metadata.append(types.SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=idx,
                                              end_idx=idx + flat.numel(), numel=flat.numel()))
        parts.append(flat)
        idx += flat.numel()
    return {"flattened_tensor": torch.cat(parts), "metadata": metadata}


bucket_pairs = [("blocks.0.weight", w.clone()), ("blocks.0.scale", torch.ones(3, dtype=torch.bfloat16)),
                ("pos_ids", torch.arange(2, dtype=torch.int64))]
real = {
    "named_list": named,
    "module_dict": per_module,
    "bucket_modules": {"transformer": bucket(bucket_pairs, False)},
    "bucket_single": bucket(bucket_pairs, False),
    "bucket_namespace": {"transformer": bucket(bucket_pairs, True)},
}
# CUDA tensors as torch's reduce_tensor sends them (no GPU here: the reducer's output spelt out, never called),
# a fresh tuple of arguments for each, as torch makes.
class CudaTensor:
    def __init__(self, ipc, shape, offset):
        self.ipc, self.shape, self.offset = ipc, shape, offset

    def __reduce__(self):
        stride = (self.shape[1], 1) if len(self.shape) == 2 else (1,)
        return rebuild_cuda_tensor, (torch.Tensor, torch.Size(self.shape), stride, self.offset,
                                     torch.storage.UntypedStorage, torch.bfloat16, 0, self.ipc, 64, 0, False,
                                     b"/torch_ref_counter", 0, b"\x02" * 64, True)


real["cuda_named_list"] = [("blocks.0.weight", CudaTensor(b"\x01" * 64, (2, 3), 0)),
                           ("blocks.0.bias", CudaTensor(b"\x01" * 64, (3,), 8))]
for name, obj in real.items():
    for p in PROTOCOLS:
        add(f"real_{name}_p{p}", normalize(forking(obj, p)))

# Truncated and trailing bytes, from a real payload.
whole = seeds["real_named_list_p5"]
for cut in (1, 2, 11, 12, len(whole) // 2, len(whole) - 1):
    add(f"truncated_{cut}_of_{len(whole)}", whole[:cut])
add("after_stop_junk", whole + b"\x00junk")
add("after_stop_second_pickle", whole + seeds["real_module_dict_p5"])


# --- hostile payloads, pickled by Python --------------------------------------------------------------------
class Reducer:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Custom:
    def __init__(self):
        self.weight = [1, 2, 3]


hostile = {
    "os_system": Reducer(os.system, ("touch /tmp/refit-pwned",)),
    "builtins_eval": Reducer(eval, ("__import__('os').system('true')",)),
    "subprocess_popen": Reducer(subprocess.Popen, (["true"],)),
    "custom_class": Custom(),
    "getattr_import_chain": Reducer(getattr, (Reducer(__import__, ("os",)), "system")),
}
self_list = []
self_list.append(self_list)
self_dict = {}
self_dict["self"] = self_dict
mutual_a = []
mutual_b = [mutual_a]
mutual_a.append(mutual_b)
hostile.update(self_list=self_list, self_dict=self_dict, mutual_cycle=mutual_a)
deep_list = deep_tuple = deep_dict = 0
for _ in range(1000):
    deep_list, deep_tuple, deep_dict = [deep_list], (deep_tuple,), {"k": deep_dict}
hostile.update(deep_list_1000=deep_list, deep_tuple_1000=deep_tuple, deep_dict_1000=deep_dict)
sys.setrecursionlimit(20000)
for name, obj in hostile.items():
    for p in PROTOCOLS:
        add(f"hostile_{name}_p{p}", pickle.dumps(obj, p))
for p in PROTOCOLS:  # a real payload with one entry that would run something
    add(f"hostile_os_system_in_payload_p{p}",
        normalize(forking([("blocks.0.weight", w), ("x", Reducer(os.system, ("true",)))], p)))


class Persistent(pickle.Pickler):
    def persistent_id(self, obj):
        return "storage0" if isinstance(obj, str) and obj == "persist-me" else None


buf = io.BytesIO()
Persistent(buf, 4).dump(["persist-me"])
add("hostile_binpersid_p4", buf.getvalue())


# --- hostile payloads, written opcode by opcode -------------------------------------------------------------
def su(s):  # SHORT_BINUNICODE
    s = s.encode()
    return b"\x8c" + bytes([len(s)]) + s


def glob(module, name):  # STACK_GLOBAL
    return su(module) + su(name) + b"\x93"


P4 = b"\x80\x04"
add("raw_global_os_system", b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.")
add("raw_stack_global_posix_system", P4 + glob("posix", "system") + su("true") + b"\x85R.")
add("raw_global_unterminated", b"\x80\x02ctorch\nSize")
add("raw_binunicode8_2p62", P4 + b"\x8d" + struct.pack("<Q", 1 << 62) + b"abc.")
add("raw_binbytes8_2p64m1", P4 + b"\x8e" + struct.pack("<Q", (1 << 64) - 1) + b"abc.")
add("raw_binunicode_4g", P4 + b"X" + struct.pack("<I", 0xFFFFFFFF) + b"abc.")
add("raw_frame_huge", P4 + b"\x95" + struct.pack("<Q", 1 << 62) + b"N.")
add("raw_long1", P4 + b"\x8a\x08" + b"\xff" * 8 + b"\x8a\x03\x00\x00\x80\x8a\x00\x87.")
add("raw_long1_too_long", P4 + b"\x8a\x09" + b"\x01" * 9 + b".")
add("raw_long4", P4 + b"\x8b\x04\x00\x00\x00\x01\x02\x03\x04.")
add("raw_binfloat", P4 + b"G\x7f\xf8\x00\x00\x00\x00\x00\x00G\x3f\xf0\x00\x00\x00\x00\x00\x00\x86.")
add("raw_self_append", P4 + b"]\x94h\x00a.")
add("raw_self_appends", P4 + b"]\x94(K\x01h\x00e.")
add("raw_self_setitem", P4 + b"}\x94h\x00h\x00s.")
add("raw_self_setitems", P4 + b"}\x94(K\x01h\x00u.")
add("raw_append_after_nesting", P4 + b"]\x94]h\x00a0h\x00K\x01a.")  # a list filled after it went inside another
add("raw_build_after_nesting", P4 + glob("types", "SimpleNamespace") + b")\x81\x94\x85\x940h\x00}b.")
add("raw_build_not_object", P4 + b"]}b.")
add("raw_build_tuple_state", P4 + glob("types", "SimpleNamespace") + b")\x81N}\x86b.")
add("raw_reduce_not_global", P4 + b"])R.")
add("raw_reduce_args_not_tuple", P4 + glob("torch", "Size") + b"]R.")
add("raw_stack_global_not_strings", P4 + b"K\x01K\x02\x93.")
add("raw_dup_pop_mark", P4 + b"(N2\x30(1N.")
add("raw_stack_underflow_mark", P4 + b"N(0.")
add("raw_values_left", P4 + b"NN.")
add("raw_mark_left", P4 + b"(N.")
add("raw_empty_stop", b".")
add("raw_memo_missing", P4 + b"h\x05.")
add("raw_long_binput_get", P4 + b"Nr\xff\xff\xff\xff0j\xff\xff\xff\xff.")
add("raw_setitems_odd", P4 + b"}(K\x01u.")
add("raw_tuple3_short", P4 + b"K\x01K\x02\x87.")
for proto in (0, 1, 6, 255):
    add(f"raw_proto_{proto}", b"\x80" + bytes([proto]) + b"N.")
# Opcodes the reader refuses: persistent ids, extensions, INST/OBJ, protocol 0/1 text forms, sets, buffers.
refused = {
    "persid": b"Pstorage0\n.",
    "binpersid": P4 + su("storage0") + b"Q.",
    "ext1": b"\x80\x02\x82\x01.",
    "ext2": b"\x80\x02\x83\x01\x02.",
    "ext4": b"\x80\x02\x84\x01\x02\x03\x04.",
    "inst_os_system": b"(S'true'\nios\nsystem\n.",
    "inst_allowed": b"(itypes\nSimpleNamespace\n.",
    "obj_allowed": b"\x80\x02(ctypes\nSimpleNamespace\no.",
    "obj_os_system": b"\x80\x02(cos\nsystem\nX\x04\x00\x00\x00trueo.",
    "int_text": b"I42\n.",
    "long_text": b"L42L\n.",
    "string_text": b"S'abc'\n.",
    "unicode_text": b"Vabc\n.",
    "float_text": b"F1.5\n.",
    "put_get_text": b"Np0\ng0\n0.",
    "binstring": b"T\x03\x00\x00\x00abc.",
    "short_binstring": b"U\x03abc.",
    "none_newobj_ex": P4 + glob("types", "SimpleNamespace") + b")}\x92.",
    "empty_set": P4 + b"\x8f\x94(K\x01\x90.",
    "frozenset": P4 + b"(K\x01\x91.",
    "bytearray8": b"\x80\x05\x96\x03\x00\x00\x00\x00\x00\x00\x00abc.",
    "next_buffer": b"\x80\x05\x97.",
    "readonly_buffer": b"\x80\x05C\x01a\x98.",
}
for name, data in refused.items():
    add(f"refused_{name}", data)
# Deep nesting by hand: MARKs, and chains of TUPLE1 just below, just above and far above the limit (64).
add("raw_marks_10000", P4 + b"(" * 10000 + b"N" + b"t" * 10000 + b".")
for depth in (64, 65, 2000):
    add(f"raw_tuple1_chain_{depth}", P4 + b"N" + b"\x85" * depth + b".")
# Memo bombs: each level a list of 16 references to the level below (16^levels leaves as a tree, a few
# hundred bytes as a DAG); 40 levels stay under the depth limit, 70 do not.
for levels in (40, 70):
    bomb = P4 + su("leaf") + b"\x94"
    for k in range(1, levels + 1):
        bomb += b"0(" + (b"j" + struct.pack("<I", k - 1)) * 16 + b"l\x94"
    add(f"memo_bomb_{levels}_levels", bomb + b".")
# Reuse bombs: one memoized tuple of arguments for many calls, one memoized state dict for many objects
# (a call or BUILD that copied them each time would cost items x uses).
args = P4 + glob("torch", "Size") + b"\x940(" + b"K\x07" * 200 + b"t\x940"  # memo 0: torch.Size, 1: the tuple
add("reuse_args_tuple", args + b"(" + b"h\x00h\x01R" * 200 + b"l.")
state = P4 + glob("types", "SimpleNamespace") + b"\x940}\x94(" + b"K\x01K\x02" * 100 + b"u0"  # 0: class, 1: dict
add("reuse_build_state", state + b"(" + b"h\x00)\x81h\x01b" * 200 + b"l.")
add("reuse_build_state_same_object", state + b"h\x00)\x81" + b"h\x01b" * 200 + b".")

# Found by the fuzzer (scripts/fuzz-pickle) before net/pickle_reader.cpp refused a value inside itself: lists
# and dicts made to contain themselves through the memo (a cycle of shared_ptrs: leaked, endless to a walk).
add("found_leak_self_append_via_memo", bytes.fromhex("80045d945d80045d945d68004b01616800613068004b01612e"))
add("found_bucket_dict_inside_itself", bytes.fromhex(
    "80059561020000000000007d948c0b7472616e73666f726d6572947d94288c10666c617474656e65645f74656e736f72948c"
    "20746f7263682e6d756c746970726f63657373696e672e726564756374696f6e73948c0e72656275696c645f74656e736f72"
    "9493948c05746f726368948c0654656e736f7294939468048c1572656275696c645f74797065645f73746f72616765949394"
    "68048c1872656275696c645f73746f726167655f66696c656e616d65949394288c0d746f7263682e73746f72616765948c0e"
    "556e747970656453746f7261676594939443242f746d702f746f7263682d73686d2d6469722d736565642f6d616e61676572"
    "2e736f6b6b94430d2f746f7263685f736565645f30944b2e749452948c05746f726368948c0575696e743894939486945294"
    "284b0068078c0453697a659493944b2e8594859452944b018594897494879452948c086d65746164617461945d94288c0574"
    "79706573948c0f53696d706c654e616d6573706163659493942952947d94288c046e616d65948c0f626c6f636b732e302e77"
    "6569676874948c05736861706594681b4b024b038694859452948c0564747970659468158c07666c6f617433329493948c09"
    "73746172745f696478944b008c07656e645f696478944b188c056e756d656c944b187562682729527d949428682a8c0e626c"
    "6f636b732e302e7363616c6594682c681b4b03859485945294683068158c0862666c6f6174313694939468334b1868344b1e"
    "68364b06756268272952947d9428682a8c07706f735f69647394682c681b4b02859485945294683068158c05696e74363494"
    "939468334b1e68344b2e68354b1075626575732e"))

shutil.rmtree(HERE, ignore_errors=True)
os.makedirs(HERE)
for name, data in sorted(seeds.items()):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds written to {HERE}")
