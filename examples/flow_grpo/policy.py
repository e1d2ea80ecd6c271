"""The trainer's copy of the policy: Diffusers' Flux2Transformer2DModel (full weights, or frozen with a PEFT LoRA), the
differentiable log-probability of refit's SDE transitions under it, and the weights refit must hold afterwards.

The transition is SGLang's FlowRolloutController "sde" step (Flow-GRPO's), in fp32: with dt = s' - s,
    std   = sqrt(s / (1 - s_)) * noise_level        (s_ = sigma_max = sigmas[1] where s == 1, else s)
    sigma = std * sqrt(-dt)
    mean  = x * (1 + std^2 / (2 s) * dt) + v * (1 + std^2 (1 - s) / (2 s)) * dt
    log p(x' | x) = mean over elements of  -(x' - mean)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi)
refit reports the same quantity from the noise it drew; here it is a function of the model output v = policy(x, t), so
gradients flow into the policy's parameters. With unchanged weights both agree (the policy ratio is 1).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def sde_step_log_prob(v: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor, sigma: torch.Tensor,
                      sigma_next: torch.Tensor, sigma_max: float, noise_level: float) -> torch.Tensor:
    """log p(x_next | x) of one SDE step per sample: [B, seq, C] tensors -> [B] (mean over elements)."""
    v, x, x_next = v.float(), x.float(), x_next.float()
    dt = sigma_next - sigma
    one = sigma.new_tensor(1.0)
    sigma_ = torch.where(torch.isclose(sigma, one), sigma.new_tensor(sigma_max), sigma)
    std = torch.sqrt(sigma / (1 - sigma_)) * noise_level
    noise_std = std * torch.sqrt(-dt)
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    log_prob = -((x_next - mean) ** 2) / (2 * noise_std**2) - torch.log(noise_std) - LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.dim())))


def sglang_checksum(named: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's compute_weights_checksum (what /get_weights_checksum answers): SHA-256 over the parameters sorted by
    name, each its UTF-8 name and then its raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda nt: nt[0].encode()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_lora_targets(transformer: torch.nn.Module) -> list[str]:
    """Every Linear of the double- and single-stream blocks (attention and feed-forward, as Flow-GRPO adapts), plus the
    latent projections in and out (x_embedder, proj_out)."""
    blocks = [n for n, m in transformer.named_modules()
              if isinstance(m, torch.nn.Linear) and "transformer_blocks." in n]
    return blocks + ["x_embedder", "proj_out"]


class Policy:
    """The transformer the trainer optimizes. mode "full": every parameter trains (fp32 master weights; refit is sent
    them in its dtype). mode "lora": the base stays frozen in refit's dtype and a PEFT LoRA (fp32) trains; refit holds
    base + (alpha / r) * B @ A."""

    def __init__(self, checkpoint: Path, mode: str, device: torch.device, served_dtype: torch.dtype,
                 lora_rank: int = 8, lora_alpha: int = 16, seed: int = 0):
        from diffusers import Flux2Transformer2DModel

        if mode not in ("full", "lora"):
            raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
        self.mode, self.device, self.served_dtype = mode, device, served_dtype
        load_dtype = torch.float32 if mode == "full" else served_dtype
        self.transformer = Flux2Transformer2DModel.from_pretrained(str(checkpoint / "transformer"),
                                                                   torch_dtype=load_dtype)
        self.transformer.to(device)
        if self.transformer.config.guidance_embeds:
            raise ValueError(f"{checkpoint}: the transformer embeds guidance; this trainer handles distilled "
                             "FLUX.2-klein checkpoints (one transformer call per step, no classifier-free guidance)")
        # bf16 weights: run the forward in bf16 as refit does, the LoRA and the loss in fp32.
        self.autocast = served_dtype != torch.float32
        self.lora_config = None
        if mode == "lora":
            from peft import LoraConfig

            torch.manual_seed(seed)  # PEFT draws lora_A (Kaiming); lora_B starts at 0, so the policy starts as the base
            self.transformer.requires_grad_(False)
            self.lora_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights=True,
                                          target_modules=default_lora_targets(self.transformer))
            self.transformer.add_adapter(self.lora_config)
            for name, p in self.transformer.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
                    p.requires_grad_(True)
        self.trainable = [p for p in self.transformer.parameters() if p.requires_grad]

    # -- the forward pass and the log-probability
    def velocity(self, latents: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                 txt_ids: torch.Tensor, img_ids: torch.Tensor) -> torch.Tensor:
        """The model output for packed latents [B, seq, C] at timesteps [B] (0..1000 as refit reports them)."""
        with torch.autocast(self.device.type, dtype=self.served_dtype, enabled=self.autocast):
            return self.transformer(hidden_states=latents, timestep=timestep / 1000, guidance=None,
                                    encoder_hidden_states=prompt_embeds, txt_ids=txt_ids, img_ids=img_ids,
                                    return_dict=False)[0]

    def step_log_prob(self, batch: dict, k: int, noise_level: float) -> torch.Tensor:
        """log p(latents[k+1] | latents[k]) under the policy for every sample of the batch: [B]."""
        latents, sigmas = batch["latents"], batch["sigmas"]
        B = latents.shape[0]
        v = self.velocity(latents[:, k], batch["timesteps"][k].expand(B), batch["prompt_embeds"], batch["txt_ids"],
                          batch["img_ids"])
        return sde_step_log_prob(v, latents[:, k], latents[:, k + 1], sigmas[k], sigmas[k + 1], sigmas[1].item(),
                                 noise_level)

    # -- what refit must hold
    def lora_scaling(self) -> float:
        return self.lora_config.lora_alpha / self.lora_config.r

    def lora_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The adapter as refit's lora_merge reads it: "<layer>.lora_A.weight" / "<layer>.lora_B.weight", fp32."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.transformer)
        return sorted((k, v.detach().float().contiguous()) for k, v in state.items())

    def full_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every parameter, in refit's dtype, by the checkpoint's names."""
        return [(n, p.detach().to(self.served_dtype).contiguous()) for n, p in self.transformer.named_parameters()]

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters refit holds after a push: the full weights, or base + scaling * B @ A computed in fp32 and
        rounded once to refit's dtype (PEFT's merge)."""
        if self.mode == "full":
            return self.full_tensors()
        modules = dict(self.transformer.named_modules())
        scaling = self.lora_scaling()
        out = []
        for name, p in self.transformer.named_parameters():
            if "lora_" in name:
                continue
            if ".base_layer." in name:
                layer = name.rsplit(".base_layer.", 1)[0]
                plain = name.replace(".base_layer.", ".")
                if name.endswith(".weight"):
                    m = modules[layer]
                    a, b = m.lora_A["default"].weight.detach().float(), m.lora_B["default"].weight.detach().float()
                    merged = p.detach().float() + (b @ a) * scaling
                    out.append((plain, merged.to(self.served_dtype)))
                else:
                    out.append((plain, p.detach().to(self.served_dtype)))
            else:
                out.append((name, p.detach().to(self.served_dtype)))
        return out

    def checksum(self) -> str:
        return sglang_checksum(self.served_tensors())

    def save_adapter(self, folder: Path):
        """A PEFT-format adapter folder (adapter_config.json + adapter_model.safetensors), as PEFT's save_pretrained
        writes it; refit's set_lora and lora_merge read it."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        self.lora_config.save_pretrained(str(folder))
        save_file({f"base_model.model.{k}": v for k, v in self.lora_tensors()},
                  str(folder / "adapter_model.safetensors"))

    def save_full(self, folder: Path, config_from: Path):
        """The transformer as a Diffusers module folder (config.json + safetensors) in refit's dtype."""
        import shutil

        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config_from / "config.json", folder / "config.json")
        save_file(dict(self.full_tensors()), str(folder / "diffusion_pytorch_model.safetensors"))
