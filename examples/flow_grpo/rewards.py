"""Rewards that need no downloaded model. Each maps images [N, 3, H, W] in [0, 1] to rewards [N] (higher is better).

* jpeg: DDPO's JPEG compressibility (Black et al., 2023): minus the size in kB of the image saved as JPEG at quality 95.
  Smooth, flat images compress well.
* color: closeness of the image to a target colour: minus the mean absolute difference per channel, in [-1, 0].

Add a reward by writing a function with this signature and naming it in REWARDS.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8, as refit's PNG holds it."""
    return (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def jpeg_compressibility(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    sizes = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(to_uint8(image)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return -torch.tensor(sizes, dtype=torch.float32)


def color_target(images: torch.Tensor, rgb: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> torch.Tensor:
    target = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)
    return -(images.float().clamp(0, 1) - target).abs().mean(dim=(1, 2, 3))


REWARDS = {"jpeg": jpeg_compressibility, "color": color_target}


def parse_rgb(text: str) -> tuple[float, float, float]:
    """'1,0,0' or '#ff0000' -> (1.0, 0.0, 0.0)."""
    text = text.strip()
    if text.startswith("#") and len(text) == 7:
        return tuple(int(text[i:i + 2], 16) / 255 for i in (1, 3, 5))
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3 or not all(0 <= p <= 1 for p in parts):
        raise ValueError(f"a colour is 'r,g,b' with each in [0, 1] or '#rrggbb', got {text!r}")
    return tuple(parts)


def make_reward(name: str, target_color: str = "1,0,0"):
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    if name == "color":
        rgb = parse_rgb(target_color)
        return lambda images: color_target(images, rgb)
    return REWARDS[name]
