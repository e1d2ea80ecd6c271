"""Oracle: refit's Qwen3 text encoder against transformers' Qwen3ForCausalLM, driven through diffusers'
own Flux2KleinPipeline._get_qwen3_prompt_embeds (the function the C++ mirrors).

A small random Qwen3ForCausalLM is saved with save_pretrained (single file and sharded, tied and untied
embeddings, with and without attention biases); probe_qwen3 loads it strictly and computes the Klein
prompt embeddings for batches with right padding, left padding and none. The result must equal the
reference to a relative error (max |diff| / max |reference|) of 1e-5 in fp32 (and 1e-2 when both sides run
in bf16, as diffusers serves it). Checkpoints with a missing,
an extra or a misshapen tensor, and configs asking for unsupported attention, must fail naming the
culprit.
"""

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from diffusers import Flux2KleinPipeline

PROBE = os.environ.get("REFIT_PROBE_QWEN3")
TOLERANCE = 1e-5
BF16_TOLERANCE = 1e-2  # about one bf16 rounding step of the largest value
LAYERS = 6
VOCAB = 300


def make_config(tie, bias=False):
    return Qwen3Config(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_size=96, vocab_size=VOCAB, rms_norm_eps=1e-6,
                       max_position_embeddings=128, tie_word_embeddings=tie, attention_bias=bias,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


def make_model(path, tie, bias=False, shard=False, seed=0, config=None):
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config or make_config(tie, bias)).eval()
    # Non-trivial values everywhere, so that a mis-bound norm scale or bias shows in the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(path, max_shard_size="20KB" if shard else "50GB")
    names = set()
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            names |= set(load_file(os.path.join(path, f)))
    return model, names


def make_inputs(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = {"right": [12, 8, 3], "left": [12, 7, 1], "none": [12, 12]}[kind]
    ids = torch.randint(0, VOCAB, (len(lengths), 12), generator=g, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if kind == "left":
            mask[row, 12 - n:] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


class FixedTokenizer:
    """Stands in for Qwen2TokenizerFast inside diffusers' function: prompt k yields row k of the batch."""

    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask

    def apply_chat_template(self, messages, **kwargs):
        return messages[0]["content"]

    def __call__(self, text, **kwargs):
        row = int(text)
        return {"input_ids": self.ids[row:row + 1], "attention_mask": self.mask[row:row + 1]}


def reference(model, ids, mask, taps):
    with torch.no_grad():
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=model, tokenizer=FixedTokenizer(ids, mask), prompt=[str(k) for k in range(ids.shape[0])],
            max_sequence_length=ids.shape[1], hidden_states_layers=taps)


def run_probe(model_dir, ids, mask, taps, tmp_path, dtype="fp32"):
    inputs, out = tmp_path / "inputs.safetensors", tmp_path / "out.safetensors"
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}, str(inputs))
    r = subprocess.run([PROBE, f"--dtype={dtype}", str(model_dir), str(inputs), str(out)] + [str(t) for t in taps],
                       capture_output=True, text=True, timeout=120)
    return r, (load_file(str(out)) if r.returncode == 0 else None)


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


pytestmark = pytest.mark.skipif(not PROBE, reason="REFIT_PROBE_QWEN3 not set (run through ctest)")

CASES = [  # (tied, attention_bias, sharded, padding, taps)
    (True, False, False, "right", (2, 4, 5)),        # Klein-style taps, as the 4B config uses (9, 18, 27)
    (False, False, True, "right", (0, 3, 6)),        # embeddings and the final-norm entry, sharded, untied
    (True, False, True, "left", (1, -1, 4)),         # negative index, fully masked query rows
    (False, True, False, "none", (6, 2)),            # no padding: SDPA's is_causal + native GQA path; biases
    (True, True, True, "right", (5,)),
]


@pytest.mark.parametrize("tied,bias,sharded,padding,taps", CASES)
def test_prompt_embeds_match_transformers(tmp_path, tied, bias, sharded, padding, taps):
    model_dir = tmp_path / "text_encoder"
    model, names = make_model(model_dir, tied, bias, sharded)
    assert os.path.exists(model_dir / "model.safetensors.index.json") == sharded
    assert ("lm_head.weight" in names) == (not tied)
    ids, mask = make_inputs(padding)
    want = reference(model, ids, mask, list(taps))

    r, got = run_probe(model_dir, ids, mask, taps, tmp_path)
    assert r.returncode == 0, r.stderr
    # The registry binds exactly the checkpoint's tensors (load_into is strict both ways).
    assert got["tensor_count"].item() == len(names)
    emb = got["prompt_embeds"]
    assert emb.dtype == torch.float32 and emb.shape == (ids.shape[0], ids.shape[1], len(taps) * 64)
    err = relative_error(emb, want)
    print(f"qwen3 tied={tied} bias={bias} sharded={sharded} padding={padding} taps={taps}: relative error {err:.3e}")
    assert torch.isfinite(emb).all()
    assert err <= TOLERANCE


def test_bf16_prompt_embeds_match_transformers(tmp_path):
    # As diffusers serves it: from_pretrained(dtype=bfloat16) of a bf16 checkpoint (inv_freq stays fp32).
    make_model(tmp_path / "fp32", tie=True)
    Qwen3ForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).save_pretrained(tmp_path / "text_encoder")
    model = Qwen3ForCausalLM.from_pretrained(tmp_path / "text_encoder", dtype=torch.bfloat16).eval()
    ids, mask = make_inputs("right")
    taps = (2, 4, 5)
    want = reference(model, ids, mask, list(taps))
    assert want.dtype == torch.bfloat16
    r, got = run_probe(tmp_path / "text_encoder", ids, mask, taps, tmp_path, dtype="bf16")
    assert r.returncode == 0, r.stderr
    emb = got["prompt_embeds"]
    assert emb.dtype == torch.bfloat16
    err = relative_error(emb.float(), want.float())
    print(f"qwen3 bf16 taps={taps}: relative error {err:.3e}")
    assert err <= BF16_TOLERANCE


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "text_encoder"
    make_model(d, tie=True)
    return d


def corrupt(good, tmp_path, edit):
    d = tmp_path / "bad"
    shutil.copytree(good, d)
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def probe_error(model_dir, tmp_path, taps=(2,)):
    ids, mask = make_inputs("right")
    r, _ = run_probe(model_dir, ids, mask, taps, tmp_path)
    assert r.returncode == 1, f"probe accepted it: {r.stdout} {r.stderr}"
    return r.stderr


def test_missing_tensor_is_named(good_checkpoint, tmp_path):
    d = corrupt(good_checkpoint, tmp_path, lambda t: t.pop("model.layers.5.mlp.up_proj.weight"))
    err = probe_error(d, tmp_path)
    assert "lacks tensor 'model.layers.5.mlp.up_proj.weight'" in err and "[96, 64]" in err


def test_unused_final_norm_is_still_required(good_checkpoint, tmp_path):
    # Prompt encoding never runs model.norm for these taps, but the module owns it: strict loading wants it.
    d = corrupt(good_checkpoint, tmp_path, lambda t: t.pop("model.norm.weight"))
    assert "lacks tensor 'model.norm.weight'" in probe_error(d, tmp_path)


def test_extra_tensor_is_named(good_checkpoint, tmp_path):
    # An lm_head in a tied checkpoint is not part of the model.
    d = corrupt(good_checkpoint, tmp_path, lambda t: t.update({"lm_head.weight": torch.zeros(VOCAB, 64)}))
    err = probe_error(d, tmp_path)
    assert "checkpoint tensor 'lm_head.weight'" in err and "is not part of the model" in err


def test_wrong_shape_is_named(good_checkpoint, tmp_path):
    d = corrupt(good_checkpoint, tmp_path, lambda t: t.update({"model.layers.1.self_attn.k_norm.weight": torch.ones(17)}))
    err = probe_error(d, tmp_path)
    assert "tensor 'model.layers.1.self_attn.k_norm.weight' has shape [17], the model expects [16]" in err


def edit_config(good, tmp_path, edit):
    d = tmp_path / "cfg"
    shutil.copytree(good, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_scaled_rope_is_rejected(good_checkpoint, tmp_path):
    d = edit_config(good_checkpoint, tmp_path, lambda c: c.update(
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 32}))
    err = probe_error(d, tmp_path)
    assert "config.json" in err and "RoPE type 'yarn'" in err


def test_sliding_window_layers_are_rejected(good_checkpoint, tmp_path):
    d = edit_config(good_checkpoint, tmp_path, lambda c: c.update(layer_types=["full_attention"] * 5 + ["sliding_attention"]))
    err = probe_error(d, tmp_path)
    assert "config.json" in err and '"sliding_attention"' in err


def test_old_style_rope_theta_is_read(tmp_path):
    # Qwen3-4B's published config has a top-level rope_theta and rope_scaling null, no rope_parameters.
    model_dir = tmp_path / "text_encoder"
    model, _ = make_model(model_dir, tie=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg.update(rope_theta=theta, rope_scaling=None)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    ids, mask = make_inputs("right")
    r, got = run_probe(model_dir, ids, mask, (3,), tmp_path)
    assert r.returncode == 0, r.stderr
    assert relative_error(got["prompt_embeds"], reference(model, ids, mask, [3])) <= TOLERANCE


def test_absent_keys_take_transformers_defaults(tmp_path):
    # transformers' Qwen3Config defaults: head_dim 128 (not hidden/heads), rope_theta 10000, untied
    # embeddings; num_key_value_heads null = one per query head. transformers reads the same config.json.
    model_dir = tmp_path / "text_encoder"
    config = Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=128,
                         intermediate_size=96, vocab_size=VOCAB, tie_word_embeddings=False)
    make_model(model_dir, tie=False, config=config)
    cfg = json.loads((model_dir / "config.json").read_text())
    for key in ("head_dim", "rope_parameters", "tie_word_embeddings"):
        cfg.pop(key)
    cfg["num_key_value_heads"] = None
    (model_dir / "config.json").write_text(json.dumps(cfg))
    model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, mask = make_inputs("right")
    r, got = run_probe(model_dir, ids, mask, (1, 2), tmp_path)
    assert r.returncode == 0, r.stderr
    assert relative_error(got["prompt_embeds"], reference(model, ids, mask, [1, 2])) <= TOLERANCE


def test_tap_out_of_range_is_rejected(good_checkpoint, tmp_path):
    err = probe_error(good_checkpoint, tmp_path, taps=(2, 7))
    assert "tap 7 is outside hidden_states[0..6]" in err
