"""Flux2Transformer2DModel in refit against diffusers' own implementation, on small random configs (fp32, CPU)."""
import os
import subprocess

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from safetensors.torch import load_file, save_file

PROBE = os.environ.get("REFIT_PROBE_FLUX2", "probe_flux2")

CONFIGS = {
    # diffusers' own Klein test template
    "diffusers_test": dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                           num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256,
                           axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False),
    # real channel counts, more blocks, guidance embedder on
    "klein_like": dict(patch_size=1, in_channels=128, num_layers=2, num_single_layers=3, attention_head_dim=32,
                       num_attention_heads=4, joint_attention_dim=96, timestep_guidance_channels=256,
                       axes_dims_rope=[8, 8, 8, 8], mlp_ratio=3.0, guidance_embeds=True),
}


def randomized(config, seed):
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():  # nothing left at zero or one: every weight must matter
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model


def ids_for(h, w, s_txt):
    img = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(s_txt))
    return img, txt


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch", [1, 2])
def test_transformer_output_matches_diffusers(tmp_path, name, batch):
    cfg = CONFIGS[name]
    model = randomized(cfg, seed=3)
    model.save_pretrained(tmp_path / "transformer")
    g = torch.Generator().manual_seed(11)
    h, w, s_txt = 3, 5, 7
    img_ids, txt_ids = ids_for(h, w, s_txt)
    inputs = {
        "hidden_states": torch.randn(batch, h * w, cfg["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(batch, s_txt, cfg["joint_attention_dim"], generator=g),
        "timestep": torch.tensor([0.9673, 0.25][:batch]),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }
    if cfg["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([3.5, 1.0][:batch])
    save_file(inputs, str(tmp_path / "in.safetensors"))
    p = subprocess.run([PROBE, str(tmp_path / "transformer"), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    got = load_file(str(tmp_path / "out.safetensors"))["output"]
    with torch.no_grad():
        want = model(hidden_states=inputs["hidden_states"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     timestep=inputs["timestep"], img_ids=img_ids, txt_ids=txt_ids,
                     guidance=inputs.get("guidance"), return_dict=False)[0]
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


def test_checkpoint_that_does_not_fit_the_model_is_refused_by_name(tmp_path):
    cfg = CONFIGS["diffusers_test"]
    model = randomized(cfg, seed=1)
    model.save_pretrained(tmp_path / "t")
    weights = tmp_path / "t" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({"hidden_states": torch.zeros(1, 1, 4)}, str(tmp_path / "in.safetensors"))

    def run():
        return subprocess.run([PROBE, str(tmp_path / "t"), str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors")],
                              capture_output=True, text=True)

    missing = dict(state)
    del missing["proj_out.weight"]
    save_file(missing, str(weights))
    p = run()
    assert p.returncode == 1 and "checkpoint lacks tensor 'proj_out.weight'" in p.stderr

    extra = dict(state)
    extra["transformer_blocks.0.attn.to_q.bias"] = torch.zeros(32)
    save_file(extra, str(weights))
    p = run()
    assert p.returncode == 1 and "'transformer_blocks.0.attn.to_q.bias'" in p.stderr and "is not part of the model" in p.stderr

    wrong = dict(state)
    wrong["x_embedder.weight"] = torch.zeros(32, 5)
    save_file(wrong, str(weights))
    p = run()
    assert p.returncode == 1 and "tensor 'x_embedder.weight' has shape [32, 5], the model expects [32, 4]" in p.stderr
