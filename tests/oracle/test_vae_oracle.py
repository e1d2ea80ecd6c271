"""AutoencoderKLFlux2 in refit against diffusers' own implementation and Flux2KleinPipeline's latent handling,
on small random configs (fp32, CPU)."""
import inspect
import json
import math
import os
import subprocess
import types

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline
from safetensors.torch import load_file, save_file

PROBE = os.environ.get("REFIT_PROBE_VAE", "probe_vae")

CONFIGS = {
    # two levels, two resnets per encoder block (three per decoder block), attention and both quant convs
    "two_levels": dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                       up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=2, norm_num_groups=8,
                       latent_channels=8, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True),
    # diffusers' own AutoencoderKLFlux2 test template: one level, one channel group, no quant convs
    "diffusers_test": dict(block_out_channels=[4], down_block_types=["DownEncoderBlock2D"],
                           up_block_types=["UpDecoderBlock2D"], layers_per_block=1, norm_num_groups=1,
                           latent_channels=1, use_quant_conv=False, use_post_quant_conv=False, sample_size=32),
    # three levels, a narrower decoder (like FLUX.2-small-decoder), no mid-block attention, quant_conv only
    "small_decoder": dict(block_out_channels=[16, 32, 32], decoder_block_out_channels=[8, 16, 32],
                          down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                          layers_per_block=1, norm_num_groups=4, latent_channels=4, use_quant_conv=True,
                          use_post_quant_conv=False, mid_block_add_attention=False, batch_norm_eps=1e-3),
}

# vae/config.json of black-forest-labs/FLUX.2-klein-4B
KLEIN_CONFIG = {"act_fn": "silu", "batch_norm_eps": 0.0001, "batch_norm_momentum": 0.1,
                "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                "force_upcast": True, "in_channels": 3, "latent_channels": 32, "layers_per_block": 2,
                "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3, "patch_size": [2, 2],
                "sample_size": 1024, "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": True,
                "use_quant_conv": True}

TOLERANCE = 1e-5


def randomized(config, seed):
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**config).eval()
    with torch.no_grad():
        # diffusers leaves biases at zero and norm scales at one: perturb everything so every tensor matters
        for name, p in vae.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            elif name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        vae.bn.running_mean.copy_(0.5 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
        vae.bn.num_batches_tracked.fill_(7)
    return vae


def run_probe(*args):
    return subprocess.run([PROBE, *map(str, args)], capture_output=True, text=True)


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


# Flux2KleinPipeline.__call__ does this inline before `vae.decode`; the test checks the lines are still there.
DECODE_LINES = [
    "latents_bn_mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)",
    "latents_bn_std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(",
    "latents = latents * latents_bn_std + latents_bn_mean",
    "latents = self._unpatchify_latents(latents)",
    "image = self.vae.decode(latents, return_dict=False)[0]",
]


def pipeline_decode(vae, latents):
    latents_bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    latents_bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        latents.device, latents.dtype
    )
    latents = latents * latents_bn_std + latents_bn_mean
    latents = Flux2KleinPipeline._unpatchify_latents(latents)
    return vae.decode(latents, return_dict=False)[0]


def pipeline_encode(vae, image):
    # the pipeline's own method, bound to a stand-in that carries just the VAE
    stand_in = types.SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    return Flux2KleinPipeline._encode_vae_image(stand_in, image, generator=None)


def test_decode_reproduction_matches_the_pipeline_source():
    source = inspect.getsource(Flux2KleinPipeline.__call__)
    for line in DECODE_LINES:
        assert line in source, line


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("height,width,batch", [(32, 32, 2), (16, 24, 1)])
def test_vae_matches_diffusers_and_the_klein_pipeline(tmp_path, name, height, width, batch):
    cfg = CONFIGS[name]
    vae = randomized(cfg, seed=5)
    vae.save_pretrained(tmp_path / "vae")
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    c = cfg["latent_channels"]
    h, w = height // f, width // f
    g = torch.Generator().manual_seed(17)
    inputs = {
        "image": torch.rand(batch, 3, height, width, generator=g) * 2 - 1,
        "latents": torch.randn(batch, c, h, w, generator=g),
        "packed": torch.randn(batch, 4 * c, h // 2, w // 2, generator=g),
    }
    save_file(inputs, str(tmp_path / "in.safetensors"))
    p = run_probe(tmp_path / "vae", tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    assert p.returncode == 0, p.stderr
    got = load_file(str(tmp_path / "out.safetensors"))

    with torch.no_grad():
        want = {
            "mean": vae.encode(inputs["image"]).latent_dist.mode(),
            "encoded_packed": pipeline_encode(vae, inputs["image"]),
            "decoded": vae.decode(inputs["latents"]).sample,
            "decoded_packed": pipeline_decode(vae, inputs["packed"]),
        }
    errors = {}
    for key, ref in want.items():
        assert got[key].shape == ref.shape, (key, got[key].shape, ref.shape)
        errors[key] = rel_err(got[key], ref)
    print(f"{name} {batch}x{height}x{width} relative errors:", errors)
    assert all(e <= TOLERANCE for e in errors.values()), errors
    # pure data movement: bit-exact
    assert torch.equal(got["patchified"], Flux2KleinPipeline._patchify_latents(inputs["latents"]))
    assert torch.equal(got["unpatchified"], Flux2KleinPipeline._unpatchify_latents(inputs["packed"]))


def registry_lines(config, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    p = run_probe("--names", path)
    assert p.returncode == 0, p.stderr
    *rows, total = p.stdout.strip().split("\n")
    names = {}
    for row in rows:
        n, shape, dtype = row.split("\t")
        names[n] = (shape, dtype)
    return names, int(total.split("\t")[1])


def test_klein_tensor_names_shapes_and_dtypes_are_the_diffusers_state_dict(tmp_path):
    # (the small configs are covered by the strict load above; this is the published model, built on meta)
    with torch.device("meta"):
        state = AutoencoderKLFlux2(**{k: v for k, v in KLEIN_CONFIG.items() if k != "force_upcast"}).state_dict()
    want = {n: ("[" + ",".join(map(str, t.shape)) + "]", "Long" if t.dtype == torch.int64 else "float")
            for n, t in state.items()}
    got, numel = registry_lines(KLEIN_CONFIG, tmp_path)
    assert got == want
    assert numel == 84_046_115 + 257  # parameters plus the BatchNorm buffers, as the published checkpoint


def test_checkpoint_that_does_not_fit_the_model_is_refused_by_name(tmp_path):
    vae = randomized(CONFIGS["two_levels"], seed=1)
    vae.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    assert state["bn.num_batches_tracked"].dtype == torch.int64 and state["bn.num_batches_tracked"].shape == ()
    save_file({"latents": torch.zeros(1, 8, 2, 2)}, str(tmp_path / "in.safetensors"))

    def run_with(tensors):
        save_file(tensors, str(weights))
        return run_probe(tmp_path / "vae", tmp_path / "in.safetensors", tmp_path / "o.safetensors")

    p = run_with({k: v for k, v in state.items() if k != "bn.num_batches_tracked"})
    assert p.returncode == 1 and "checkpoint lacks tensor 'bn.num_batches_tracked' (expected shape [])" in p.stderr, p.stderr

    p = run_with({**state, "bn.running_mean": torch.zeros(5)})
    assert p.returncode == 1 and "tensor 'bn.running_mean' has shape [5], the model expects [32]" in p.stderr, p.stderr

    p = run_with({**state, "bn.num_batches_tracked": torch.tensor([7])})
    assert p.returncode == 1 and "tensor 'bn.num_batches_tracked' has shape [1], the model expects []" in p.stderr, p.stderr

    p = run_with({**state, "bn.num_batches_tracked": torch.tensor(7.0)})
    assert p.returncode == 1 and "tensor 'bn.num_batches_tracked' is F32, the model holds it as Long" in p.stderr, p.stderr

    p = run_with({**state, "decoder.up_blocks.1.upsamplers.0.conv.weight": torch.zeros(32, 32, 3, 3)})
    assert p.returncode == 1 and "'decoder.up_blocks.1.upsamplers.0.conv.weight'" in p.stderr and "is not part of the model" in p.stderr

    # the checkpoint fits; the input does not
    save_file(state, str(weights))
    save_file({"packed": torch.zeros(1, 8, 2, 2)}, str(tmp_path / "in.safetensors"))
    p = run_probe(tmp_path / "vae", tmp_path / "in.safetensors", tmp_path / "o.safetensors")
    assert p.returncode == 1 and "bn_denormalize latents must be [B, 32, H, W], got [1, 8, 2, 2]" in p.stderr, p.stderr


@pytest.mark.parametrize("change,message", [
    ({"act_fn": "gelu"}, "act_fn 'gelu' is not supported (only 'silu')"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
     "down_block_types entry 'AttnDownEncoderBlock2D' is not supported (only 'DownEncoderBlock2D')"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types needs one entry per decoder block (1 vs 2)"),
    ({"norm_num_groups": 24}, "block_out_channels entry 32 is not a positive multiple of norm_num_groups 24"),
])
def test_config_the_model_cannot_compute_is_refused_naming_the_file(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIGS["two_levels"], **change}))
    p = run_probe("--names", path)
    assert p.returncode == 1 and p.stderr.strip() == f"{path}: {message}", p.stderr
