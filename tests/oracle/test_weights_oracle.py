"""Oracle tests of refit's weight store against Python's reference libraries (safetensors, torch, hashlib).

Python writes, refit reads; refit writes, Python reads; and the module checksum of DESIGN.md section 4 is
computed independently here, from the tensors that Python's safetensors loads, with hashlib."""
import ctypes
import hashlib
import json
import os
import struct
import subprocess

import numpy as np
import pytest
import torch
from safetensors import TensorSpec, safe_open, serialize
from safetensors.torch import load_file, save_file

REFIT = os.environ.get("REFIT_BIN", "refit")
PROBE = os.environ.get("REFIT_PROBE", "weights_probe")

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
}
CONVERTIBLE = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
TARGETS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_CODE = {v: k for k, v in TORCH_DTYPES.items()}


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(code: str, shape, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaNs, infinities and subnormals included) for every dtype but BOOL."""
    dt = TORCH_DTYPES[code]
    numel = int(np.prod(shape)) if shape else 1
    if dt == torch.bool:
        return (torch.randint(0, 2, (numel,), generator=gen) == 1).reshape(shape)
    nbytes = numel * torch.empty((), dtype=dt).element_size()
    b = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return b.view(dt).reshape(shape)


def run(*args, check=True):
    p = subprocess.run(list(args), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}): {p.stderr}")
    return p


def probe(*args):
    return json.loads(run(PROBE, *map(str, args)).stdout)


@pytest.fixture
def mixed_tensors():
    gen = torch.Generator().manual_seed(1234)
    tensors = {}
    for i, code in enumerate(TORCH_DTYPES):
        tensors[f"layer.{i}.{code.lower()}"] = random_tensor(code, [3, 5], gen)
    tensors["scalar.f32"] = torch.tensor(3.5)
    tensors["scalar.i64"] = torch.tensor(7, dtype=torch.int64)
    tensors["empty.bf16"] = torch.empty((0, 4), dtype=torch.bfloat16)
    tensors["big.bf16"] = random_tensor("BF16", [257, 129], gen)
    return tensors


def test_files_written_by_python_read_by_refit_with_identical_bytes(tmp_path, mixed_tensors):
    path = tmp_path / "py.safetensors"
    save_file(mixed_tensors, str(path), metadata={"format": "pt", "writer": "python"})
    got = probe("dump", path)
    assert got["metadata"] == {"format": "pt", "writer": "python"}
    assert set(got["tensors"]) == set(mixed_tensors)
    for name, t in mixed_tensors.items():
        entry = got["tensors"][name]
        assert entry["dtype"] == DTYPE_CODE[t.dtype], name
        assert entry["shape"] == list(t.shape), name
        assert entry["sha256"] == hashlib.sha256(raw_bytes(t)).hexdigest(), name


def test_packed_and_exotic_dtypes_from_the_raw_serializer(tmp_path):
    """F4 (two values per byte) and F8_E8M0 written by safetensors' own serializer."""
    payload = {"f4": bytes(range(16)), "e8m0": bytes(range(100, 124))}
    keep = {k: ctypes.create_string_buffer(v, len(v)) for k, v in payload.items()}
    specs = {
        "f4": TensorSpec(dtype="float4_e2m1fn_x2", shape=[4, 4], data_ptr=ctypes.addressof(keep["f4"]), data_len=16),
        "e8m0": TensorSpec(dtype="float8_e8m0fnu", shape=[2, 12], data_ptr=ctypes.addressof(keep["e8m0"]), data_len=24),
    }
    path = tmp_path / "raw.safetensors"
    path.write_bytes(serialize(specs, {"k": "v"}))
    got = probe("dump", path)
    assert got["tensors"]["f4"]["dtype"] == "F4"
    assert got["tensors"]["f4"]["shape"] == [4, 8]  # logical shape: two F4 values per byte
    assert got["tensors"]["f4"]["sha256"] == hashlib.sha256(payload["f4"]).hexdigest()
    assert got["tensors"]["e8m0"]["dtype"] == "F8_E8M0"
    assert got["tensors"]["e8m0"]["sha256"] == hashlib.sha256(payload["e8m0"]).hexdigest()
    # and refit's copy of it is byte-identical to what the serializer wrote
    out = tmp_path / "copy.safetensors"
    run(PROBE, "copy", str(path), str(out))
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"k": "v"}
        assert f.get_tensor("e8m0").view(torch.uint8).numpy().tobytes() == payload["e8m0"]


def test_files_written_by_refit_load_in_python_with_identical_bytes(tmp_path, mixed_tensors):
    src = tmp_path / "src.safetensors"
    out = tmp_path / "refit.safetensors"
    save_file(mixed_tensors, str(src), metadata={"note": "round trip ü"})
    run(PROBE, "copy", str(src), str(out))
    loaded = load_file(str(out))
    assert set(loaded) == set(mixed_tensors)
    for name, t in mixed_tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert raw_bytes(loaded[name]) == raw_bytes(t), name
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"note": "round trip ü"}
    # the header length is a multiple of 8, as Python's writer makes it
    n = struct.unpack("<Q", out.read_bytes()[:8])[0]
    assert n % 8 == 0


# --- Diffusers layout and the module checksum -------------------------------------------------

def design_checksum(tensors: dict, float_dtype=None) -> str:
    """DESIGN.md section 4, written from the definition."""
    h = hashlib.sha256()
    for name in sorted(tensors, key=lambda s: s.encode()):
        t = tensors[name]
        if float_dtype is not None and DTYPE_CODE[t.dtype] in CONVERTIBLE:
            t = t.to(float_dtype)
        h.update(name.encode() + b"\0" + DTYPE_CODE[t.dtype].encode() + b"\0")
        h.update(",".join(str(d) for d in t.shape).encode() + b"\0")
        h.update(hashlib.sha256(raw_bytes(t)).digest())
    return h.hexdigest()


def special_floats(code, n, gen):
    """Values that stress rounding: ties, subnormals, huge values, infinities, NaN."""
    base = torch.randn(n, generator=gen, dtype=torch.float64) * torch.logspace(-40, 30, n, dtype=torch.float64)
    extra = torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 65520.0, 1e-45, float("inf"), float("-inf"), float("nan"), 3.4e38],
                         dtype=torch.float64)
    return torch.cat([base, extra]).to(TORCH_DTYPES[code])


def write_pipeline(root, components):
    """components: name -> (library, class, {tensor: value} or None, shards)."""
    root.mkdir(parents=True)
    index = {"_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.36.0", "is_distilled": True}
    for comp, (lib, cls, tensors, shards) in components.items():
        index[comp] = [lib, cls]
        d = root / comp
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"_class_name": cls}))
        if tensors is None:
            continue
        stem = "model" if lib == "transformers" else "diffusion_pytorch_model"
        if shards == 1:
            save_file(tensors, str(d / f"{stem}.safetensors"))
            continue
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            fname = f"{stem}-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(d / fname))
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (d / f"{stem}.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (root / "model_index.json").write_text(json.dumps(index))


@pytest.fixture
def pipeline(tmp_path):
    gen = torch.Generator().manual_seed(7)
    transformer = {f"transformer_blocks.{i}.attn.to_q.weight": special_floats("BF16", 300, gen) for i in range(5)}
    transformer["x_embedder.bias"] = special_floats("F32", 64, gen)
    transformer["proj_out.weight"] = special_floats("F16", 90, gen)
    transformer["norm_out.scale"] = special_floats("F64", 33, gen)
    transformer["fp8.e4m3"] = random_tensor("F8_E4M3", [4, 16], gen)
    transformer["fp8.e5m2"] = random_tensor("F8_E5M2", [4, 16], gen)
    vae = {"decoder.conv_in.weight": special_floats("F32", 190, gen).reshape(10, 20),
           "bn.running_mean": special_floats("F32", 32, gen),
           "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64)}
    text = {"model.embed_tokens.weight": special_floats("BF16", 502, gen).reshape(16, 32),
            "model.layers.0.mlp.gate_proj.weight": special_floats("BF16", 246, gen).reshape(8, 32)}
    root = tmp_path / "model"
    write_pipeline(root, {
        "transformer": ("diffusers", "Flux2Transformer2DModel", transformer, 3),
        "vae": ("diffusers", "AutoencoderKLFlux2", vae, 1),
        "text_encoder": ("transformers", "Qwen3ForCausalLM", text, 2),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", None, 0),
    })
    return root, {"transformer": transformer, "vae": vae, "text_encoder": text}


def python_loaded(root, comp):
    """The tensors as Python's safetensors loads them from the component folder."""
    out = {}
    for f in sorted((root / comp).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def sglang_checksum(tensors: dict, float_dtype=None) -> str:
    """SGLang's compute_weights_checksum, written from its definition: SHA-256 over the tensors sorted by name, each
    contributing its UTF-8 name and then its raw bytes (in the dtype held); nothing else."""
    h = hashlib.sha256()
    for name in sorted(tensors, key=lambda s: s.encode()):
        t = tensors[name]
        if float_dtype is not None and DTYPE_CODE[t.dtype] in CONVERTIBLE:
            t = t.to(float_dtype)
        h.update(name.encode())
        h.update(raw_bytes(t))
    return h.hexdigest()


@pytest.mark.parametrize("flag", [None, "bf16", "fp16", "fp32"])
@pytest.mark.parametrize("fmt", [None, "sglang", "refit"])
def test_checksum_equals_independent_python_computation(pipeline, flag, fmt):
    # This checkpoint's tensors are not a model refit can build, so no tensor is known to be a buffer and SGLang's
    # formula covers every one (`refit checksum` says so on stderr).
    root, _ = pipeline
    args = [REFIT, "checksum", str(root), "--json"] + (["--dtype", flag] if flag else []) + (["--format", fmt] if fmt else [])
    got = json.loads(run(*args).stdout)
    formula = design_checksum if fmt == "refit" else sglang_checksum  # SGLang's is the default
    want = {c: formula(python_loaded(root, c), TARGETS.get(flag)) for c in ("text_encoder", "transformer", "vae")}
    assert got == want


def test_checksum_module_selection_and_text_output(pipeline):
    root, _ = pipeline
    got = json.loads(run(REFIT, "checksum", str(root), "--module", "vae", "--module", "text_encoder", "--json", "--format", "refit").stdout)
    assert set(got) == {"vae", "text_encoder"}
    assert got["vae"] == design_checksum(python_loaded(root, "vae"))
    text = run(REFIT, "checksum", str(root), "--module", "vae", "--format", "refit").stdout.split()
    assert text == [got["vae"], "vae"]
    # a single component folder works as MODEL_DIR too
    single = json.loads(run(REFIT, "checksum", str(root / "vae"), "--json", "--format", "refit").stdout)
    assert single == {"vae": got["vae"]}
    p = run(REFIT, "checksum", str(root), "--format", "md5", check=False)
    assert p.returncode != 0 and "--format must be sglang or refit" in p.stderr


def test_checksum_and_inspect_errors_are_clear(pipeline, tmp_path):
    root, _ = pipeline
    p = run(REFIT, "checksum", str(root), "--module", "nope", check=False)
    assert p.returncode != 0 and p.stdout == ""
    assert "module 'nope' not found" in p.stderr and "text_encoder, transformer, vae" in p.stderr
    p = run(REFIT, "checksum", str(root), "--module", "scheduler", check=False)
    assert p.returncode != 0 and "has no weights" in p.stderr
    p = run(REFIT, "checksum", str(root), "--dtype", "int4", check=False)
    assert p.returncode != 0 and "--dtype must be bf16, fp16 or fp32" in p.stderr
    p = run(REFIT, "inspect", str(tmp_path / "missing"), check=False)
    assert p.returncode != 0 and "is not a directory" in p.stderr
    # a shard truncated by 2 bytes: the error names the file and a tensor
    shard = sorted((root / "transformer").glob("*-00002-of-00003.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-2])
    p = run(REFIT, "checksum", str(root), "--module", "transformer", check=False)
    assert p.returncode != 0
    assert shard.name in p.stderr and "lies past the data area" in p.stderr and "tensor '" in p.stderr


def test_inspect_reports_what_python_sees(pipeline):
    root, tensors = pipeline
    info = json.loads(run(REFIT, "inspect", str(root), "--json", "--tensors").stdout)
    assert info["pipeline_class"] == "Flux2KleinPipeline"
    comps = {c["name"]: c for c in info["components"]}
    assert set(comps) == {"scheduler", "text_encoder", "transformer", "vae"}
    assert comps["scheduler"]["weight_bearing"] is False
    for name in ("text_encoder", "transformer", "vae"):
        loaded = python_loaded(root, name)
        assert comps[name]["tensors"] == len(loaded)
        assert comps[name]["bytes"] == sum(t.numel() * t.element_size() for t in loaded.values())
        listed = {t["name"]: t for t in comps[name]["tensor_list"]}
        for tname, t in loaded.items():
            assert listed[tname]["dtype"] == DTYPE_CODE[t.dtype]
            assert listed[tname]["shape"] == list(t.shape)
    assert len(comps["transformer"]["files"]) == 3


@pytest.mark.parametrize("mode", ["copy", "mapped", "reuse"])
@pytest.mark.parametrize("flag", [None, "bf16", "fp16", "fp32"])
def test_host_loader_matches_torch_conversion(pipeline, flag, mode):
    root, _ = pipeline
    got = probe("host", root / "transformer", flag or "none", mode)
    for name, t in python_loaded(root, "transformer").items():
        if flag and DTYPE_CODE[t.dtype] in CONVERTIBLE:
            t = t.to(TARGETS[flag])
        assert got[name]["shape"] == list(t.shape), name
        assert got[name]["sha256"] == hashlib.sha256(raw_bytes(t)).hexdigest(), name
