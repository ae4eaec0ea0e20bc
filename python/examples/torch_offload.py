"""strata.torch in a few lines: a small transformer whose blocks strata streams under a budget,
stored as bf16 and computed in f32, on the CPU (or the GPU where there is one).
Run: python3 python/examples/torch_offload.py (after cargo build; needs torch)."""

import sys

try:
    import torch
    from torch import nn
except ImportError:
    print("SKIPPED: torch not installed")
    sys.exit(0)

import strata.torch

torch.manual_seed(0)
width, depth = 256, 8
model = nn.Sequential(*(nn.TransformerEncoderLayer(width, 4, 4 * width, batch_first=True)
                        for _ in range(depth))).eval()
x = torch.randn(2, 16, width)
with torch.no_grad():
    reference = model.to(torch.bfloat16).float()(x)   # what bf16 weights compute in f32

    # One strata layer per block: its forward reads its children's weights directly.
    managed = strata.torch.enable_vram_management(
        model, vram_limit="10MiB", device="cpu", module_types=(nn.TransformerEncoderLayer,),
        tiers=dict(offload_dtype=torch.bfloat16, computation_dtype=torch.float32))
    out = model(x)

stats = managed.stats()
print(f"{len(managed.layers)} layers, max |diff| {(out - reference).abs().max().item():.3g}, "
      f"peak {stats.vram_peak / 2**20:.2f} MiB of a {stats.vram_limit / 2**20:.0f} MiB budget, "
      f"{stats.bytes_to_device / 2**20:.1f} MiB moved, {stats.evictions} evictions")
assert torch.equal(out, reference)
strata.torch.disable_vram_management(model)
print("torch_offload: OK")
