"""The whole FLUX.2-klein pipeline: a checkpoint written by `refit make-model` loads in diffusers, and
refit's image from the same initial noise equals diffusers' Flux2KleinPipeline (fp32, CPU)."""
import io
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

REFIT = os.environ.get("REFIT_BIN", "refit")
PROBE = os.environ.get("REFIT_PROBE_PIPELINE", "probe_pipeline")
PROMPT = "a red fox in the snow, 夕焼け 🦊"
TAPS = (1, 2, 3)  # the tiny preset's 4-layer text encoder, evenly spaced like Klein-4B's (9, 18, 27)


def make_model(out, seed, *extra):
    p = subprocess.run([REFIT, "make-model", "--preset", "flux2-klein-tiny", "--seed", str(seed), "--out", str(out), *extra],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ckpt") / "tiny", 1)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ckpt") / "tiny-base", 2, "--base")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def run_probe(tmp_path, model, noise, steps, guidance):
    save_file({"noise": noise}, str(tmp_path / "in.safetensors"))
    p = subprocess.run([PROBE, str(model), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"), PROMPT,
                        str(steps), str(guidance)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return load_file(str(tmp_path / "out.safetensors"))


def diffusers_image(model, noise, steps, guidance):
    pipe = Flux2KleinPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    b, c, h, w = noise.shape
    with torch.no_grad():
        out = pipe(prompt=[PROMPT] * b, height=h * 2 * pipe.vae_scale_factor, width=w * 2 * pipe.vae_scale_factor,
                   num_inference_steps=steps, guidance_scale=guidance, latents=noise, output_type="pt",
                   text_encoder_out_layers=TAPS).images
        embeds, _ = pipe.encode_prompt(prompt=[PROMPT] * b, device="cpu", text_encoder_out_layers=TAPS)
    return out, embeds


@pytest.mark.parametrize("batch,steps,hw", [(1, 4, (4, 4)), (2, 2, (3, 5))])
def test_distilled_image_equals_diffusers_from_the_same_noise(tmp_path, tiny, batch, steps, hw):
    noise = torch.randn(batch, 16, *hw, generator=torch.Generator().manual_seed(5))
    got = run_probe(tmp_path, tiny, noise, steps, 4.0)
    want, embeds = diffusers_image(tiny, noise, steps, 4.0)
    assert rel_err(got["prompt_embeds"], embeds) <= 1e-5
    assert got["image"].shape == want.shape
    assert rel_err(got["image"], want) <= 1e-4, rel_err(got["image"], want)


def test_base_checkpoint_with_guidance_equals_diffusers(tmp_path, tiny_base):
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(9))
    got = run_probe(tmp_path, tiny_base, noise, 3, 3.5)
    want, _ = diffusers_image(tiny_base, noise, 3, 3.5)
    assert rel_err(got["image"], want) <= 1e-4, rel_err(got["image"], want)


def test_initial_noise_is_torch_randn_of_the_seed(tmp_path, tiny):
    noise = torch.zeros(2, 16, 4, 4)
    got = run_probe(tmp_path, tiny, noise, 1, 1.0)
    assert torch.equal(got["noise_from_seed"], torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)))


def test_refit_generate_is_deterministic_and_matches_diffusers_png(tmp_path, tiny):
    def generate(seed, out):
        p = subprocess.run([REFIT, "generate", "--model-path", str(tiny), "--prompt", PROMPT, "--seed", str(seed),
                            "--size", "64x48", "-o", str(out)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return out.read_bytes()

    a, b, c = generate(7, tmp_path / "a.png"), generate(7, tmp_path / "b.png"), generate(8, tmp_path / "c.png")
    assert a == b and a != c
    assert a[:8] == b"\x89PNG\r\n\x1a\n"
    ours = np.asarray(Image.open(io.BytesIO(a)))
    assert ours.shape == (48, 64, 3)
    pipe = Flux2KleinPipeline.from_pretrained(str(tiny), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPT, height=48, width=64, num_inference_steps=4, generator=torch.Generator().manual_seed(7),
               output_type="np", text_encoder_out_layers=TAPS).images[0]
    ref_u8 = (ref * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - ref_u8.astype(int)).max() <= 1


def test_make_model_is_deterministic_and_real(tmp_path, tiny):
    again = make_model(tmp_path / "again", 1)
    for rel in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model-00001-of-00002.safetensors", "tokenizer/tokenizer.json", "model_index.json"):
        assert (again / rel).read_bytes() == (tiny / rel).read_bytes(), rel
    other = make_model(tmp_path / "other", 2)
    assert (other / "transformer/diffusion_pytorch_model.safetensors").read_bytes() != \
        (tiny / "transformer/diffusion_pytorch_model.safetensors").read_bytes()
    index = json.loads((tiny / "text_encoder/model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    p = subprocess.run([REFIT, "make-model", "--preset", "flux2-klein-tiny", "--out", str(tiny)], capture_output=True, text=True)
    assert p.returncode != 0 and "already exists" in p.stderr
    p = subprocess.run([REFIT, "make-model", "--preset", "nope", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert p.returncode != 0 and "unknown preset 'nope'" in p.stderr


def test_generate_with_teacache_reports_skips_and_is_identical_at_threshold_zero(tmp_path, tiny):
    def generate(out, *extra):
        p = subprocess.run([REFIT, "generate", "--model-path", str(tiny), "--prompt", PROMPT, "--seed", "3", "--steps", "12",
                            "--size", "32x32", "-o", str(out), *extra], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return out.read_bytes(), p.stderr

    plain, _ = generate(tmp_path / "plain.png")
    zero, log = generate(tmp_path / "zero.png", "--teacache-threshold", "0")
    assert zero == plain
    assert "TeaCache skipped the DiT blocks in 0 of 12 DiT calls" in log
    _, log = generate(tmp_path / "big.png", "--teacache-threshold", "1000")
    assert "TeaCache skipped the DiT blocks in 10 of 12 DiT calls" in log  # all but the first and last


def test_generate_errors_are_clear(tmp_path, tiny):
    p = subprocess.run([REFIT, "generate", "--model-path", str(tiny), "--prompt", "x", "--size", "50x50", "-o",
                        str(tmp_path / "x.png")], capture_output=True, text=True)
    assert p.returncode != 0 and "must be positive multiples of 4" in p.stderr
    p = subprocess.run([REFIT, "generate", "--model-path", str(tmp_path / "none"), "--prompt", "x", "-o",
                        str(tmp_path / "x.png")], capture_output=True, text=True)
    assert p.returncode != 0 and "is not a directory" in p.stderr


def test_bf16_image_equals_diffusers_bf16_within_its_rounding(tmp_path, tiny):
    """The dtype served on GPUs, here on the CPU: refit's bf16 arithmetic (fused multiply-adds, RoPE as a complex
    product, its own group norm) against Diffusers' bf16 pipeline from the same seed. bf16 itself moves this random
    tiny model's image by ~18/255 on average from fp32 (asserted below, so the bound is not vacuous); the two bf16
    implementations agree to a few levels."""
    for seed in (7, 8):
        out = tmp_path / f"bf16-{seed}.png"
        p = subprocess.run([REFIT, "generate", "--model-path", str(tiny), "--prompt", PROMPT, "--seed", str(seed),
                            "--size", "64x48", "--dtype", "bf16", "-o", str(out)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        ours = np.asarray(Image.open(out)).astype(int)
        pipe = Flux2KleinPipeline.from_pretrained(str(tiny), torch_dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(prompt=PROMPT, height=48, width=64, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                   output_type="np", text_encoder_out_layers=TAPS).images[0]
        diff = np.abs(ours - (ref * 255).round().astype(int))
        assert diff.max() <= 3 and diff.mean() <= 0.5, (seed, diff.max(), diff.mean())
        fp32 = Flux2KleinPipeline.from_pretrained(str(tiny), torch_dtype=torch.float32)
        fp32.set_progress_bar_config(disable=True)
        ref32 = fp32(prompt=PROMPT, height=48, width=64, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                     output_type="np", text_encoder_out_layers=TAPS).images[0]
        assert np.abs(ours - (ref32 * 255).round().astype(int)).mean() > 5 * diff.mean()
