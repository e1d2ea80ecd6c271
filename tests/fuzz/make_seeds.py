#!/usr/bin/env python3
"""Writes tests/fuzz/seeds/: small valid safetensors files (Python's writer) to seed the header fuzzer."""
import os

import torch
from safetensors.torch import save_file

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
os.makedirs(HERE, exist_ok=True)
g = torch.Generator().manual_seed(0)
save_file({"w": torch.randn(2, 3, generator=g).to(torch.bfloat16), "b": torch.zeros(3)}, f"{HERE}/two_tensors.safetensors")
save_file({"s": torch.tensor(1.5), "e": torch.empty(0, 2, dtype=torch.float16)}, f"{HERE}/scalar_and_empty.safetensors")
save_file({"n": torch.tensor(3, dtype=torch.int64), "m": torch.ones(2, dtype=torch.bool),
           "f8": torch.zeros(4, dtype=torch.float8_e4m3fn)}, f"{HERE}/metadata_mixed.safetensors",
          metadata={"format": "pt", "note": "seed"})
save_file({}, f"{HERE}/empty.safetensors")
print("seeds written to", HERE)
