"""LoRA through the real `refit serve` (CPU, fp32) against Diffusers 0.42.1 + PEFT 0.21.2 as the oracle.

Adapters are made here with PEFT on the tiny checkpoint's Flux2Transformer2DModel (seeded random lora_A and lora_B, so
the adapter is no no-op) and saved both ways: PEFT's `save_pretrained` (adapter_config.json + adapter_model.safetensors,
keys `base_model.model.<module>.lora_A.weight`) and Diffusers' `Flux2KleinPipeline.save_lora_weights`
(pytorch_lora_weights.safetensors, keys `transformer.<module>.lora_A.weight`, the LoraConfig in the safetensors metadata
under "lora_adapter_metadata"). The oracle is Diffusers: `load_lora_weights` / `set_adapters` / `fuse_lora`, then
`unload_lora_weights` (which keeps the fused weights), and SGLang's checksum over `pipe.transformer.named_parameters()`.

* set_lora (each file format, strengths, merge modes) gives Diffusers' fused checksum exactly; unmerge gives the base
  back bit for bit;
* two adapters at once (one of them rsLoRA), list_loras, merge_lora_weights at another strength, re-merge after
  unmerge, set by nickname only;
* the image of the merged server equals, byte for byte, the image of a server started on a checkpoint holding
  Diffusers' fused transformer;
* weight_version changes on every set / merge / unmerge;
* failures (bad key, bad shape, bad fields) are 400 with a "detail" that names the problem, and change nothing;
* update_weights_from_disk with weight_update_mode "lora_merge" (and a lora_alpha override).
"""
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from harness import REFIT, run, start_server  # noqa: E402

from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

MODULE = "transformer"
# Adapter "a": plain LoRA on every Linear of the double- and single-stream blocks (attention and feed-forward), plus
# two Linears outside the blocks. Adapter "b": rsLoRA (scaling alpha / sqrt(r), not a power of two) on a subset.
A_RANK, A_ALPHA = 4, 8
B_RANK, B_ALPHA = 2, 3
B_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
             "transformer_blocks.0.ff.linear_in", "transformer_blocks.0.ff_context.linear_out",
             "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.1.attn.to_out"]


# ---------------------------------------------------------------------------------------------------------------------
# The oracle side: Diffusers and PEFT.

def sglang_checksum(params: dict) -> str:
    """SGLang's compute_weights_checksum: SHA-256 over the parameters sorted by name, each contributing its UTF-8 name
    and then the raw bytes of the contiguous tensor."""
    h = hashlib.sha256()
    for name in sorted(params, key=lambda s: s.encode()):
        h.update(name.encode("utf-8"))
        h.update(params[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def module_checksum(model: torch.nn.Module) -> str:
    params = dict(model.named_parameters())
    assert not [n for n in params if "lora_" in n or "base_layer" in n], "PEFT wrappers left in the model"
    assert all(p.dtype == torch.float32 for p in params.values())
    return sglang_checksum(params)


def load_pipe(ckpt):
    pipe = Flux2KleinPipeline.from_pretrained(str(ckpt), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_fused(ckpt, loads, weights=None, lora_scale=1.0):
    """Diffusers' pipeline with the adapters (Diffusers-format dirs or files) fused in and the PEFT layers removed."""
    pipe = load_pipe(ckpt)
    names = [f"lora{i}" for i in range(len(loads))]
    for name, path in zip(names, loads):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if weights is not None:
        pipe.set_adapters(names, weights)
    pipe.fuse_lora(components=["transformer"], lora_scale=lora_scale)
    pipe.unload_lora_weights()  # keeps the fused weights, restores the plain nn.Linear modules and their names
    return pipe


def peft_merged_checksum(ckpt, peft_dir):
    """PEFT's own merge of a PEFT-format adapter directory (adapter_config.json's lora_alpha, use_rslora)."""
    base = Flux2Transformer2DModel.from_pretrained(str(ckpt / "transformer"), torch_dtype=torch.float32)
    return module_checksum(PeftModel.from_pretrained(base, str(peft_dir)).merge_and_unload())


def make_adapter(ckpt, out, rank, alpha, targets, seed, rslora=False):
    """A PEFT LoRA on the checkpoint's transformer with seeded random A and B; saved in PEFT's format (out/peft) and in
    Diffusers' format with its LoraConfig as metadata (out/diffusers). Returns the Diffusers-format state dict."""
    transformer = Flux2Transformer2DModel.from_pretrained(str(ckpt / "transformer"), torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora)
    model = get_peft_model(transformer, config)  # adapter "default": save_pretrained writes it at the top level
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora = sorted((n, p) for n, p in model.named_parameters() if "lora_" in n)
        assert len(lora) == 2 * len(targets)
        for _, p in lora:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(str(out / "peft"))
    state = {k.removeprefix("base_model.model."): v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    Flux2KleinPipeline.save_lora_weights(str(out / "diffusers"), transformer_lora_layers=state,
                                         transformer_lora_adapter_metadata=config.to_dict())
    return state, config


def save_diffusers_file(path, state, metadata_config=None, dtype=None):
    """A Diffusers-format adapter file: `transformer.`-prefixed keys, optionally bf16, optionally a LoraConfig."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}
    if metadata_config is None:
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        Flux2KleinPipeline.save_lora_weights(str(path.parent), transformer_lora_layers=state, weight_name=path.name,
                                             transformer_lora_adapter_metadata=metadata_config)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-ckpt") / "tiny"
    run(REFIT, "make-model", "--preset", "flux2-klein-tiny", "--seed", 1, "--out", out)
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory, ckpt):
    """Every adapter the tests use, by name -> path (all absolute, symlinks resolved)."""
    root = tmp_path_factory.mktemp("lora-adapters").resolve()
    probe = Flux2Transformer2DModel.from_pretrained(str(ckpt / "transformer"), torch_dtype=torch.float32)
    a_targets = [n for n, m in probe.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks." in n]
    a_targets += ["x_embedder", "proj_out"]
    a_state, a_config = make_adapter(ckpt, root / "a", A_RANK, A_ALPHA, a_targets, seed=11)
    b_state, _ = make_adapter(ckpt, root / "b", B_RANK, B_ALPHA, B_TARGETS, seed=12, rslora=True)
    p = {"a_peft": root / "a" / "peft", "a_diffusers": root / "a" / "diffusers", "b_peft": root / "b" / "peft",
         "b_diffusers": root / "b" / "diffusers"}
    # A bare bf16 .safetensors file without metadata: alpha defaults to the rank (scaling 1), as Diffusers reads it.
    p["a_bf16_file"] = save_diffusers_file(root / "a-bf16" / "a_bf16.safetensors", a_state, dtype=torch.bfloat16)
    # The same tensors with lora_alpha overrides written in the metadata, for update_weights_from_disk's lora_alpha.
    for alpha in (6, 16):
        cfg = dict(a_config.to_dict(), lora_alpha=alpha)
        p[f"a_alpha{alpha}"] = save_diffusers_file(root / f"a-alpha{alpha}" / "pytorch_lora_weights.safetensors", a_state, cfg)
    # Broken adapters. A key that matches no base weight (PEFT format; to_k's pair renamed to no_such) ...
    bad = root / "bad-key"
    shutil.copytree(p["a_peft"], bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    for ab in ("lora_A", "lora_B"):
        tensors[f"base_model.model.transformer_blocks.0.attn.no_such.{ab}.weight"] = \
            tensors.pop(f"base_model.model.transformer_blocks.0.attn.to_k.{ab}.weight")
    (bad / "adapter_model.safetensors").unlink()
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    p["bad_key"] = bad
    # ... and a lora_B whose out dimension (31) is not the base weight's (32) (Diffusers format).
    shape = dict(a_state)
    shape["transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.randn(31, A_RANK, generator=torch.Generator().manual_seed(5))
    p["bad_shape"] = save_diffusers_file(root / "bad-shape" / "pytorch_lora_weights.safetensors", shape, a_config.to_dict())
    p["missing"] = root / "no-such-adapter"
    return {k: str(v) for k, v in p.items()}


@pytest.fixture(scope="module")
def oracle(ckpt):
    """oracle(loads, weights=None, lora_scale=1.0) -> Diffusers' fused transformer checksum (memoized)."""
    cache = {}

    def checksum(loads, weights=None, lora_scale=1.0):
        key = (tuple(loads), None if weights is None else tuple(weights), lora_scale)
        if key not in cache:
            cache[key] = module_checksum(diffusers_fused(ckpt, list(loads), weights, lora_scale).transformer)
        return cache[key]

    checksum.base = module_checksum(load_pipe(ckpt).transformer)
    return checksum


@pytest.fixture
def server(tmp_path_factory, ckpt):
    """A fresh server per test (about 0.3 s to start): every test starts from the base weights and no adapters."""
    s = start_server(tmp_path_factory, ckpt)
    yield s
    s.kill()


# ---------------------------------------------------------------------------------------------------------------------
# The refit side.

def transformer_checksum(server):
    got = server.checksums([MODULE])
    return got[MODULE]


def call(server, method, path, body=None, expect=200):
    r = server.get(path) if method == "GET" else server.post(path, body)
    assert r.status_code == expect, f"{method} {path} {body}: {r.status_code} {r.text}\n--- server log (tail) ---\n{server.log()[-4000:]}"
    return r.json()


def set_lora(server, **body):
    reply = call(server, "POST", "/v1/set_lora", body)
    assert reply["status"] == "ok" and isinstance(reply["weight_version"], str) and reply["weight_version"], reply
    return reply


def set_lora_fails(server, **body):
    reply = call(server, "POST", "/v1/set_lora", body, expect=400)
    assert isinstance(reply.get("detail"), str), reply
    return reply["detail"]


def merge(server, strength, target="all"):
    reply = call(server, "POST", "/v1/merge_lora_weights", {"target": target, "strength": strength})
    assert reply["status"] == "ok", reply
    assert reply["message"] == f"Successfully merged LoRA weights (target: {target}, strength: {strength})", reply
    return reply


def unmerge(server, target="all"):
    reply = call(server, "POST", "/v1/unmerge_lora_weights", {"target": target})
    assert reply["status"] == "ok", reply
    assert reply["message"] == f"Successfully unmerged LoRA weights (target: {target})", reply
    return reply


def list_loras(server):
    return call(server, "GET", "/v1/list_loras")


def loaded(listing):
    return sorted((e["nickname"], e["path"]) for e in listing["loaded_adapters"])


def active_entry(nicknames, paths, strengths):
    return {"nickname": ",".join(nicknames), "nicknames": list(nicknames), "path": ",".join(paths), "merged": True,
            "mode": "merged", "strength": strengths[0], "strengths": list(strengths)}


# ---------------------------------------------------------------------------------------------------------------------
# The oracle itself, with no refit server involved (this half runs on any refit build).

def test_the_oracle_is_self_consistent_and_not_a_no_op(ckpt, lora, oracle):
    # refit's base checksum (`refit checksum`, fp32) is what Diffusers' transformer holds.
    disk = json.loads(run(REFIT, "checksum", ckpt, "--module", MODULE, "--dtype", "fp32", "--json").stdout)
    assert disk == {MODULE: oracle.base}
    a = oracle([lora["a_diffusers"]])
    assert a != oracle.base
    # Diffusers' fuse of the Diffusers-format file == PEFT's merge_and_unload of the PEFT-format directory.
    assert peft_merged_checksum(ckpt, Path(lora["a_peft"])) == a
    assert peft_merged_checksum(ckpt, Path(lora["b_peft"])) == oracle([lora["b_diffusers"]]) != oracle.base
    # The fused weights are W + (B @ A) * scaling, in fp32, adapters in list order: written out here.
    base = {k: v.float() for k, v in load_file(str(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")).items()}
    want = dict(base)
    for path, scaling in ((lora["a_diffusers"], 0.5 * A_ALPHA / A_RANK), (lora["b_diffusers"], 1.0 * B_ALPHA / B_RANK ** 0.5)):
        adapter = load_file(str(Path(path) / "pytorch_lora_weights.safetensors"))
        for k in sorted(adapter):
            if k.endswith(".lora_A.weight"):
                name = k.removeprefix("transformer.").removesuffix(".lora_A.weight") + ".weight"
                want[name] = want[name] + (adapter[k.replace(".lora_A.", ".lora_B.")] @ adapter[k]) * scaling
    assert sglang_checksum(want) == oracle([lora["a_diffusers"], lora["b_diffusers"]], [0.5, 1.0])
    # The bare bf16 file has no alpha: Diffusers uses alpha = r, so scaling = strength (not a's 8 / 4 * strength); its
    # A and B are upcast to fp32 (exact) before the fp32 matmul.
    with safe_open(lora["a_bf16_file"], "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"} and "lora_adapter_metadata" not in (f.metadata() or {})
    adapter = load_file(lora["a_bf16_file"])
    want = dict(base)
    for k in sorted(adapter):
        if k.endswith(".lora_A.weight"):
            name = k.removeprefix("transformer.").removesuffix(".lora_A.weight") + ".weight"
            want[name] = want[name] + (adapter[k.replace(".lora_A.", ".lora_B.")].float() @ adapter[k].float()) * 1.3
    assert sglang_checksum(want) == oracle([lora["a_bf16_file"]], lora_scale=1.3) not in (oracle.base, a)


# ---------------------------------------------------------------------------------------------------------------------
# 1. One adapter, each file format.

FORMATS = [  # (adapter, Diffusers-format twin the oracle loads, strength, merge_mode)
    ("a_peft", "a_diffusers", 1.0, None),
    ("a_peft", "a_diffusers", 0.7, "merge"),
    ("a_diffusers", "a_diffusers", 1.0, "auto"),
    ("a_diffusers", "a_diffusers", 0.7, None),
    ("a_bf16_file", "a_bf16_file", 1.0, None),
    ("a_bf16_file", "a_bf16_file", 1.3, None),
]


@pytest.mark.parametrize("adapter,twin,strength,merge_mode", FORMATS)
def test_set_lora_equals_diffusers_fuse_and_unmerge_restores_the_base(server, lora, oracle, adapter, twin, strength, merge_mode):
    assert transformer_checksum(server) == oracle.base
    assert list_loras(server)["active"] == {}
    body = {"lora_nickname": "a", "lora_path": lora[adapter], "strength": strength}
    if merge_mode is not None:
        body["merge_mode"] = merge_mode
    reply = set_lora(server, **body)
    assert reply["message"] == f"Successfully set LoRA adapter(s): a (target: all, strength: {strength:.2f})", reply
    assert transformer_checksum(server) == oracle([lora[twin]], lora_scale=strength)
    listing = list_loras(server)
    assert loaded(listing) == [("a", lora[adapter])]
    assert listing["active"] == {MODULE: [active_entry(["a"], [lora[adapter]], [strength])]}
    unmerge(server)
    assert transformer_checksum(server) == oracle.base
    assert list_loras(server)["active"] == {}


def test_checksum_reply_keeps_module_keys_with_an_active_adapter(server, lora, oracle):
    set_lora(server, lora_nickname="a", lora_path=lora["a_peft"])
    got = server.checksums([MODULE])
    assert got[MODULE] == oracle([lora["a_diffusers"]])
    assert isinstance(got.get("active_loras"), dict), got


# ---------------------------------------------------------------------------------------------------------------------
# 2. Two adapters at once.

def test_two_adapters_list_loras_merge_at_another_strength_and_unmerge(server, lora, oracle):
    paths = [lora["a_peft"], lora["b_diffusers"]]  # one of each format; b is rsLoRA
    twins = [lora["a_diffusers"], lora["b_diffusers"]]
    reply = set_lora(server, lora_nickname=["a", "b"], lora_path=paths, strength=[0.5, 1.0])
    assert reply["message"] == "Successfully set LoRA adapter(s): a, b (target: all, strength: 0.50, 1.00)", reply
    assert transformer_checksum(server) == oracle(twins, [0.5, 1.0])
    listing = list_loras(server)
    assert loaded(listing) == [("a", paths[0]), ("b", paths[1])]
    assert listing["active"] == {MODULE: [active_entry(["a", "b"], paths, [0.5, 1.0])]}

    merge(server, 0.25)
    assert transformer_checksum(server) == oracle(twins, [0.25, 0.25])
    assert list_loras(server)["active"] == {MODULE: [active_entry(["a", "b"], paths, [0.25, 0.25])]}

    unmerge(server)
    assert transformer_checksum(server) == oracle.base
    listing = list_loras(server)
    assert listing["active"] == {} and loaded(listing) == [("a", paths[0]), ("b", paths[1])]


def test_merge_after_unmerge_and_set_by_nickname_only(server, lora, oracle):
    paths = [lora["a_diffusers"], lora["b_peft"]]
    twins = [lora["a_diffusers"], lora["b_diffusers"]]
    set_lora(server, lora_nickname=["a", "b"], lora_path=paths, strength=[1.0, 0.5])
    assert transformer_checksum(server) == oracle(twins, [1.0, 0.5])
    unmerge(server)
    assert transformer_checksum(server) == oracle.base
    # merge_lora_weights re-merges the adapters last set, every one at its strength.
    merge(server, 1.0)
    assert transformer_checksum(server) == oracle(twins, [1.0, 1.0])
    # set_lora replaces what is merged; a loaded nickname needs no path.
    reply = set_lora(server, lora_nickname="b", target="transformer", strength=0.7)
    assert reply["message"] == "Successfully set LoRA adapter(s): b (target: transformer, strength: 0.70)", reply
    assert transformer_checksum(server) == oracle([lora["b_diffusers"]], [0.7])
    listing = list_loras(server)
    assert listing["active"] == {MODULE: [active_entry(["b"], [paths[1]], [0.7])]}
    assert loaded(listing) == [("a", paths[0]), ("b", paths[1])]
    unmerge(server)
    assert transformer_checksum(server) == oracle.base


# ---------------------------------------------------------------------------------------------------------------------
# 3. The merged weights are the ones that generate.

@pytest.fixture(scope="module")
def fused_ckpt(tmp_path_factory, ckpt, lora, oracle):
    """The checkpoint with its transformer replaced by Diffusers' fused one (adapter a at 0.7); other modules kept."""
    out = tmp_path_factory.mktemp("lora-fused") / "fused"
    shutil.copytree(ckpt, out)
    shutil.rmtree(out / "transformer")
    diffusers_fused(ckpt, [lora["a_diffusers"]], lora_scale=0.7).transformer.save_pretrained(str(out / "transformer"))
    disk = json.loads(run(REFIT, "checksum", out, "--module", MODULE, "--dtype", "fp32", "--json").stdout)
    assert disk == {MODULE: oracle([lora["a_diffusers"]], lora_scale=0.7)}
    return out


def test_image_after_set_lora_equals_the_image_of_diffusers_fused_checkpoint(server, tmp_path_factory, lora, fused_ckpt):
    base_png, _ = server.generate(7)
    fused = start_server(tmp_path_factory, fused_ckpt)
    try:
        want, _ = fused.generate(7)
    finally:
        fused.kill()
    assert want != base_png  # the adapter changes the image
    set_lora(server, lora_nickname="a", lora_path=lora["a_peft"], strength=0.7)
    got, version = server.generate(7)
    assert got == want
    assert version == server.info()["weight_version"]
    unmerge(server)
    assert server.generate(7)[0] == base_png


# ---------------------------------------------------------------------------------------------------------------------
# 4. weight_version.

def test_every_lora_change_moves_weight_version(server, lora, oracle):
    seen = [server.info()["weight_version"]]

    def moved(reply):
        v = reply["weight_version"]
        assert isinstance(v, str) and v != seen[-1], (seen, reply)
        seen.append(v)
        assert server.info()["weight_version"] == v
        assert server.generate(1)[1] == v

    moved(set_lora(server, lora_nickname="a", lora_path=lora["a_peft"]))
    named = set_lora(server, lora_nickname="b", lora_path=lora["b_peft"], weight_version="lora-b-1")
    assert named["weight_version"] == "lora-b-1"
    moved(named)
    moved(merge(server, 0.5))
    moved(unmerge(server))
    moved(set_lora(server, lora_nickname=["a", "b"], strength=[1.0, 1.0]))
    moved(unmerge(server))
    info = server.info()
    assert info["model_path"] == str(server.model_path) and {m["name"] for m in info["modules"]} >= {MODULE}
    assert transformer_checksum(server) == oracle.base


# ---------------------------------------------------------------------------------------------------------------------
# 5. Failures: 400, a detail naming the problem, nothing changed (weights, adapters, weight_version).

ERRORS = {  # name -> (set_lora body from the adapter paths, substrings the detail must hold)
    "key_matching_no_weight": (lambda p: {"lora_nickname": "bad", "lora_path": p["bad_key"]},
                               ["transformer_blocks.0.attn.no_such"]),
    "lora_B_out_dim": (lambda p: {"lora_nickname": "bad", "lora_path": p["bad_shape"]}, ["transformer_blocks.0.attn.to_k"]),
    "missing_path": (lambda p: {"lora_nickname": "bad", "lora_path": p["missing"]}, ["no-such-adapter"]),
    "merge_mode_dynamic": (lambda p: {"lora_nickname": "c", "lora_path": p["a_peft"], "merge_mode": "dynamic"}, ["merge_mode"]),
    "target_vae": (lambda p: {"lora_nickname": "c", "lora_path": p["a_peft"], "target": "vae"}, ["vae"]),
    "path_list_length": (lambda p: {"lora_nickname": ["c", "d"], "lora_path": [p["a_peft"]]}, ["lora_path"]),
    "strength_list_length": (lambda p: {"lora_nickname": ["c", "d"], "lora_path": [p["a_peft"], p["b_peft"]], "strength": [0.5]},
                             ["strength"]),
    "unknown_nickname_without_path": (lambda p: {"lora_nickname": "ghost"}, ["ghost"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_failed_set_lora_is_a_400_that_changes_nothing(server, lora, oracle, case):
    set_lora(server, lora_nickname="a", lora_path=lora["a_diffusers"], strength=0.5)
    before = transformer_checksum(server)
    assert before == oracle([lora["a_diffusers"]], lora_scale=0.5)
    listing, version = list_loras(server), server.info()["weight_version"]
    body, needles = ERRORS[case]
    detail = set_lora_fails(server, **body(lora))
    assert detail.startswith("Failed to set LoRA adapter"), detail
    for needle in needles:
        assert needle in detail, (needle, detail)
    assert transformer_checksum(server) == before
    assert list_loras(server) == listing
    assert server.info()["weight_version"] == version
    unmerge(server)  # the server still works
    assert transformer_checksum(server) == oracle.base


# ---------------------------------------------------------------------------------------------------------------------
# 6. update_weights_from_disk, weight_update_mode "lora_merge".

@pytest.mark.parametrize("alpha,twin", [(None, "a_diffusers"), (6, "a_alpha6"), (16, "a_alpha16")])
def test_update_weights_from_disk_lora_merge(server, lora, oracle, alpha, twin):
    set_lora(server, lora_nickname="b", lora_path=lora["b_peft"])  # replaced by the update
    reply = server.update(lora["a_peft"], weight_update_mode="lora_merge", lora_alpha=alpha, target_modules=[MODULE])
    assert isinstance(reply["weight_version"], str) and reply["message"], reply
    assert transformer_checksum(server) == oracle([lora[twin]])
    assert MODULE in list_loras(server)["active"]
    unmerge(server)
    assert transformer_checksum(server) == oracle.base


def test_update_lora_merge_with_rslora_alpha_override(server, lora, oracle, tmp_path):
    # b is rsLoRA: scaling = alpha / sqrt(r), here 5 / sqrt(2), which no power of two gives.
    cfg = json.loads((Path(lora["b_peft"]) / "adapter_config.json").read_text())
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(Path(lora["b_peft"]) / "adapter_model.safetensors")).items()}
    twin = save_diffusers_file(tmp_path / "b5" / "pytorch_lora_weights.safetensors", state, dict(cfg, lora_alpha=5))
    server.update(lora["b_peft"], weight_update_mode="lora_merge", lora_alpha=5, target_modules=[MODULE])
    assert transformer_checksum(server) == oracle([str(twin)]) != oracle([lora["b_diffusers"]])
