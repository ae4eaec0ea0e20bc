#!/usr/bin/env python3
"""A transformer stack (random bf16 weights, >= 1B parameters by default) run by strata.torch
against the same stack unmanaged, and against accelerate's cpu_offload and diffusers' group
offloading (with streams) where those are installed, at equal VRAM budgets.

For each configuration: seconds per forward (median), peak VRAM (torch's allocator; strata's
own counters, as strata allocates outside torch), host RSS, and whether the output is
bit-identical to the unmanaged run (it must be for strata: computation dtype == stored dtype).

    python3 python/benchmarks/torch_offload_bench.py                     # CUDA, 1.2B params
    python3 python/benchmarks/torch_offload_bench.py --device cpu --small # a check anywhere

"Equal budget": a baseline's peak VRAM minus the activations (the unmanaged run's peak minus
its weights) is the weight budget strata gets in the run named after that baseline.
"""

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    print("SKIPPED: torch not installed")
    sys.exit(0)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import strata  # noqa: E402
import strata.torch as st  # noqa: E402


class Block(nn.Module):
    """Pre-norm attention + 4x MLP, as in a DiT or an LLM decoder block."""

    def __init__(self, width, heads, dtype):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, dtype=dtype)
        self.qkv = nn.Linear(width, 3 * width, dtype=dtype)
        self.out = nn.Linear(width, width, dtype=dtype)
        self.norm2 = nn.LayerNorm(width, dtype=dtype)
        self.up = nn.Linear(width, 4 * width, dtype=dtype)
        self.down = nn.Linear(4 * width, width, dtype=dtype)

    def forward(self, x):
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        x = x + self.out(a)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Stack(nn.Module):
    def __init__(self, width, depth, heads, dtype):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, dtype) for _ in range(depth))
        self.norm = nn.LayerNorm(width, dtype=dtype)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def host_rss():
    """(current, peak) resident host memory of this process, bytes (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(name, model, x, device, steps, reference, managed=None):
    """Times `steps` forwards after one warm-up; returns the table row."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        out = model(x)  # warm-up: strata learns the order of the pass here
        times = []
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            out = model(x)
            sync(device)
            times.append(time.perf_counter() - start)
    row = {"config": name, "s_per_forward": statistics.median(times),
           "host_rss": host_rss()[0]}
    row["torch_peak_vram"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" \
        else None
    if managed is not None:
        stats = managed.stats()
        row.update(strata_peak=stats.vram_peak, strata_limit=stats.vram_limit,
                   moved_per_forward=stats.bytes_to_device / (steps + 1),
                   stall_s=stats.stall_ns / 1e9)
    row["bit_identical"] = None if reference is None else bool(torch.equal(out.cpu(), reference))
    row["max_abs_diff"] = None if reference is None else \
        (out.cpu().float() - reference.float()).abs().max().item()
    print(format_row(row), flush=True)
    return row


def size(b):
    if b is None:
        return "-"
    return f"{b / 2**30:.2f}G" if b >= 2**30 else f"{b / 2**20:.1f}M"


def format_row(row):
    limit = row.get("strata_limit")
    limit = "" if limit is None else ("unlimited" if limit == strata.UNLIMITED
                                      else f"of {size(limit)}")
    moved = row.get("moved_per_forward")
    moved = "" if moved is None else f"moved {size(moved)}/fwd"
    return (f"{row['config']:<36} {row['s_per_forward'] * 1e3:9.1f} ms"
            f"  torch peak {size(row['torch_peak_vram']):>7}"
            f"  strata peak {size(row.get('strata_peak')):>7} {limit:<10} {moved:<16}"
            f"  host {size(row['host_rss']):>7}  identical {row['bit_identical']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a 4-block, width-256 model")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=24, help="24 x 2048 wide: 1.21B params")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--fractions", default="0,0.5",
                        help="strata weight budgets as fractions of the model's bytes")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.small:
        args.width, args.depth, args.seq = 256, 4, 64
    device = torch.device(args.device)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    base = Stack(args.width, args.depth, max(1, args.width // 128), dtype).eval()
    params = sum(p.numel() for p in base.parameters())
    model_bytes = params * 2
    x = torch.randn(args.batch, args.seq, args.width, dtype=dtype)
    print(f"model: {args.depth} blocks x {args.width} wide, {params / 1e9:.3f}B params, "
          f"{model_bytes / 2**30:.2f} GiB bf16; input {list(x.shape)}; device {device}; "
          f"strata {'.'.join(map(str, strata.version()))}", flush=True)
    rows = []
    xd = x.to(device)

    # Unmanaged: the reference output, and the activations' peak.
    unmanaged = copy.deepcopy(base).to(device)
    row = run("unmanaged (all weights resident)", unmanaged, xd, device, args.steps, None)
    with torch.no_grad():
        reference = unmanaged(xd).cpu()
    activations = (row["torch_peak_vram"] - model_bytes) if row["torch_peak_vram"] else 0
    rows.append(row)
    del unmanaged
    gc.collect()

    budgets = [(f"strata {float(f):g}x model", int(float(f) * model_bytes))
               for f in args.fractions.split(",")]
    if device.type == "cuda":
        baselines = []
        try:
            from accelerate import cpu_offload

            def accelerate_setup(m):
                return cpu_offload(m, execution_device=device)
            baselines.append(("accelerate cpu_offload", accelerate_setup))
        except ImportError:
            print("note: accelerate not installed; its baseline is left out")
        try:
            from diffusers.hooks import apply_group_offloading

            def diffusers_setup(m):
                apply_group_offloading(m, onload_device=device, offload_type="block_level",
                                       num_blocks_per_group=1, use_stream=True)
                return m
            baselines.append(("diffusers group offload (stream)", diffusers_setup))
        except ImportError:
            print("note: diffusers not installed (or without group offloading); its baseline is left out")
        for name, setup in baselines:
            m = setup(copy.deepcopy(base))
            row = run(name, m, xd, device, args.steps, reference)
            rows.append(row)
            budgets.append((f"strata at {name.split()[0]}'s budget",
                            max(0, row["torch_peak_vram"] - activations)))
            del m
            gc.collect()
            torch.cuda.empty_cache()
    else:
        print("note: the accelerate and diffusers baselines need CUDA; left out")

    for name, budget in budgets:
        m = copy.deepcopy(base)
        # Any budget works (0 is the minimum, not a refusal): an error here is a failure.
        managed = st.enable_vram_management(m, vram_limit=budget, device=device,
                                            module_types=(Block, nn.LayerNorm))
        rows.append(run(name, m, xd, device, args.steps, reference, managed))
        st.disable_vram_management(m)
        del m, managed
        gc.collect()

    failed = [r["config"] for r in rows if r["config"].startswith("strata")
              and not r["bit_identical"]]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if failed:
        print(f"NOT bit-identical: {failed}")
        sys.exit(1)
    print("torch_offload_bench: OK")


if __name__ == "__main__":
    main()
