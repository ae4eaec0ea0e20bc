#!/usr/bin/env python3
"""A stack of bf16 nn.Linear layers run by strata.torch on the caller's CUDA stream, under
several budgets, against the limits measured in the same run (DESIGN.md section 5).

    python3 python/benchmarks/cuda_linear_stack.py                      # 48 x 4096^2, bf16
    python3 python/benchmarks/cuda_linear_stack.py --device cpu --small # a logic check anywhere

What is measured, all in one run, every pass on one torch stream the script creates (the
"caller's stream": strata.torch's wrapped forwards acquire and release on torch's current stream):

- pinned H2D bandwidth: a pinned host tensor of --bw-mib MiB copied with
  .to("cuda", non_blocking=True), each copy timed by a pair of CUDA events; the best of
  --bw-copies copies, measured before and after the strata runs (the better of the two is used).
- the all-resident pass: the unmanaged stack, every weight on the GPU. Its median pass time is
  sum(compute), and its output is the reference.
- strata under vram_limit 0, 25% and 50% of the weights' bytes, and unlimited
  (enable_vram_management with module_types=(nn.Linear,): one strata layer per Linear), after
  --warmup passes (strata learns the order in the first). bytes moved per pass = the
  bytes_to_device delta over the timed passes / passes; sum(transfer) = that / the pinned
  bandwidth. Printed per budget: the median pass time, its ratio to max(sum(compute),
  sum(transfer)) (aim <= 1.05) and to the all-resident pass, the host stall (time acquire blocked
  the Python thread; on a GPU the wait is the stream's), and whether the output
  is bit-identical to the unmanaged one (it must be: the computation dtype is the stored one).

Pass times come from CUDA events recorded on the stream between back-to-back passes (no host
synchronisation between them, so the copy engine gets no free time between passes); the median
of --passes passes is reported.

--tokens 0 (the default) picks the batch so that a layer's compute roughly equals its transfer:
a probe pass of --probe-tokens tokens on the resident stack gives the compute time per token,
and the pinned bandwidth gives the transfer time per layer.

Exits 0 with "SKIPPED: ..." without torch or without CUDA; exits 1 when an output differs.
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
    from torch import nn
except ImportError:
    print("SKIPPED: torch not installed")
    sys.exit(0)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import strata  # noqa: E402
import strata.torch as st  # noqa: E402

MIB = 2**20


def make_stack(width, depth, bias, device, seed):
    """depth bf16 Linear(width, width) layers, weights ~ N(0, 1/width) so activations keep
    their scale through the stack."""
    generator = torch.Generator(device=device).manual_seed(seed)
    layers = []
    for _ in range(depth):
        layer = nn.Linear(width, width, bias=bias, dtype=torch.bfloat16, device=device)
        with torch.no_grad():
            layer.weight.normal_(0.0, width ** -0.5, generator=generator)
            if bias:
                layer.bias.normal_(0.0, 0.02, generator=generator)
        layers.append(layer)
    return nn.Sequential(*layers).eval()


def time_passes(model, x, passes, device, stream):
    """Runs `passes` forwards back to back on `stream`: (seconds of each pass, last output)."""
    out = None
    with torch.no_grad():
        if device.type != "cuda":
            times = []
            for _ in range(passes):
                start = time.perf_counter()
                out = model(x)
                times.append(time.perf_counter() - start)
            return times, out
        with torch.cuda.stream(stream):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(passes + 1)]
            events[0].record(stream)
            for i in range(passes):
                out = model(x)
                events[i + 1].record(stream)
        stream.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])], out


def h2d_bandwidth(nbytes, copies, device, stream):
    """Best and median bytes/s of `copies` H2D copies of a pinned host tensor (on the CPU device:
    of a host copy, which means nothing for PCIe but keeps the check mode's arithmetic)."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    rates = []
    if device.type != "cuda":
        for _ in range(copies):
            start = time.perf_counter()
            dst = src.clone()
            rates.append(nbytes / (time.perf_counter() - start))
            del dst
        return max(rates), statistics.median(rates)
    src = src.pin_memory()
    with torch.cuda.stream(stream):
        dst = src.to(device, non_blocking=True)  # untimed: the allocator's first block
        stream.synchronize()
        del dst
        for _ in range(copies):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst = src.to(device, non_blocking=True)
            end.record(stream)
            end.synchronize()
            rates.append(nbytes / (start.elapsed_time(end) / 1e3))
            del dst
    return max(rates), statistics.median(rates)


def parse_budgets(text, weight_bytes):
    """[(label, vram_limit or None for unlimited)] from "0,0.25,0.5,unlimited"."""
    budgets = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("unlimited", "none", "inf"):
            budgets.append(("unlimited", None))
        else:
            fraction = float(item)
            budgets.append((f"{fraction:.0%} of weights", int(fraction * weight_bytes)))
    return budgets


def size(b):
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / MIB:.1f} MiB"


def ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def ratio(value):
    return "-" if value is None else f"{value:.3f}"


def allocations(row):
    """device_allocations at the end, and (+N) the timed passes made: +0 once warm."""
    if row.get("device_allocations") is None:
        return "-"
    return f"{row['device_allocations']} (+{row['allocations_timed']})"


COLUMNS = [("config", 26), ("vram_limit", 11), ("pass ms", 9), ("moved/pass", 11),
           ("transfer ms", 11), ("bound ms", 9), ("/bound", 7), ("/resident", 9),
           ("host stall", 10), ("prefetch", 8), ("misses", 7), ("allocs", 9), ("identical", 9)]


def format_row(row):
    cells = [row["config"], row["vram_limit_text"], ms(row["pass_s"]),
             size(row.get("moved_per_pass")), ms(row.get("transfer_s")), ms(row.get("bound_s")),
             ratio(row.get("ratio_bound")), ratio(row.get("ratio_resident")),
             ms(row.get("stall_s_per_pass")), str(row.get("prefetch_hits", "-")),
             str(row.get("misses", "-")), allocations(row),
             str(row.get("bit_identical", "-"))]
    return " ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, (_, w)) in
                    enumerate(zip(cells, COLUMNS)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a logic check)")
    parser.add_argument("--small", action="store_true",
                        help="8 layers of 256 x 256, 64 tokens, 16 MiB bandwidth copies")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=48)
    parser.add_argument("--no-bias", action="store_true")
    parser.add_argument("--tokens", type=int, default=0,
                        help="rows of the input batch; 0: compute per layer ~ transfer per layer")
    parser.add_argument("--probe-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--budgets", default="0,0.25,0.5,unlimited",
                        help="vram_limit as fractions of the weights' bytes, or 'unlimited'")
    parser.add_argument("--prefetch", type=int, default=2, help="strata's prefetch_depth")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--bw-mib", type=int, default=256)
    parser.add_argument("--bw-copies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.small:
        args.width, args.depth, args.bw_mib = 256, 8, 16
        args.tokens = args.tokens or 64
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("SKIPPED: no CUDA (torch.cuda.is_available() is False)")
            return 0
        device = torch.device("cuda", torch.cuda.current_device()
                              if device.index is None else device.index)
        torch.cuda.set_device(device)
        stream = torch.cuda.Stream(device)
        name = torch.cuda.get_device_name(device)
    else:
        stream, name = None, "cpu"

    model = make_stack(args.width, args.depth, not args.no_bias, device, args.seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = weight_bytes / args.depth
    bw_before, bw_median = h2d_bandwidth(args.bw_mib * MIB, args.bw_copies, device, stream)
    print(f"device {name}; strata {'.'.join(map(str, strata.version()))}; stack: {args.depth} x "
          f"Linear({args.width}, {args.width}) bf16, {size(weight_bytes)} of weights; pinned H2D "
          f"({args.bw_mib} MiB x {args.bw_copies}): best {bw_before / 1e9:.2f} GB/s, median "
          f"{bw_median / 1e9:.2f} GB/s", flush=True)

    tokens = args.tokens
    if tokens <= 0:
        probe = torch.randn(args.probe_tokens, args.width, dtype=torch.bfloat16, device=device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
        time_passes(model, probe, 1, device, stream)
        probe_s = statistics.median(time_passes(model, probe, 3, device, stream)[0])
        compute_per_token = probe_s / args.depth / args.probe_tokens
        transfer_per_layer = layer_bytes / bw_before
        tokens = int(round(transfer_per_layer / compute_per_token / 128)) * 128
        tokens = max(128, min(args.max_tokens, tokens))
        print(f"tokens: {tokens} (probe of {args.probe_tokens}: {probe_s / args.depth * 1e3:.3f} "
              f"ms per layer; transfer {transfer_per_layer * 1e3:.3f} ms per layer)", flush=True)
        del probe
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    x = torch.randn(tokens, args.width, dtype=torch.bfloat16, device=device, generator=generator)
    if stream is not None:
        # x was made on the default stream; every pass runs on `stream`.
        stream.wait_stream(torch.cuda.current_stream(device))

    # The all-resident pass: sum(compute) and the reference output.
    time_passes(model, x, args.warmup, device, stream)
    times, reference = time_passes(model, x, args.passes, device, stream)
    compute_s = statistics.median(times)
    rows = [{"config": "all resident (unmanaged)", "vram_limit_text": "-", "pass_s": compute_s,
             "ratio_resident": 1.0}]
    print(format_row(rows[0]), flush=True)
    base = copy.deepcopy(model).to("cpu")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    strata_rows = []
    for label, budget in parse_budgets(args.budgets, weight_bytes):
        m = copy.deepcopy(base)
        managed = st.enable_vram_management(m, vram_limit=budget, device=device,
                                            module_types=(nn.Linear,),
                                            prefetch_depth=args.prefetch)
        try:
            time_passes(m, x, args.warmup, device, stream)
            before = managed.stats()
            times, out = time_passes(m, x, args.passes, device, stream)
            after = managed.stats()
            identical = bool(torch.equal(out, reference))
            del out
        finally:
            st.disable_vram_management(m)
            del m, managed
            gc.collect()
        pass_s = statistics.median(times)
        moved = (after.bytes_to_device - before.bytes_to_device) / args.passes
        row = {"config": f"strata {label}",
               "vram_limit": budget, "vram_limit_text": "unlimited" if budget is None
               else size(budget), "pass_s": pass_s, "moved_per_pass": moved,
               "stall_s_per_pass": (after.stall_ns - before.stall_ns) / 1e9 / args.passes,
               "prefetch_hits": after.prefetch_hits - before.prefetch_hits,
               "misses": after.misses - before.misses,
               # Absent from an older libstrata's stats (the binding reads 0 there).
               "device_allocations": getattr(after, "device_allocations", None),
               "allocations_timed": getattr(after, "device_allocations", 0)
               - getattr(before, "device_allocations", 0),
               "vram_peak": after.vram_peak, "bit_identical": identical}
        rows.append(row)
        strata_rows.append(row)
        print(format_row(row), flush=True)

    # The limit: the better of the two bandwidth measurements, so drift does not flatter strata.
    bw_after, _ = h2d_bandwidth(args.bw_mib * MIB, args.bw_copies, device, stream)
    bandwidth = max(bw_before, bw_after)
    for row in strata_rows:
        row["transfer_s"] = row["moved_per_pass"] / bandwidth
        row["bound_s"] = max(compute_s, row["transfer_s"])
        row["ratio_bound"] = row["pass_s"] / row["bound_s"]
        row["ratio_resident"] = row["pass_s"] / compute_s

    print()
    print(f"{args.depth} x Linear({args.width}, {args.width}) bf16 ({size(weight_bytes)}), "
          f"{tokens} tokens, prefetch_depth {args.prefetch}, median of {args.passes} passes on "
          f"the caller's stream; pinned H2D {bw_before / 1e9:.2f} GB/s before, "
          f"{bw_after / 1e9:.2f} GB/s after (limit: {bandwidth / 1e9:.2f})")
    print("/bound = pass / max(sum(compute), sum(transfer)) (aim <= 1.05); sum(compute) = the "
          "all-resident pass; transfer = moved/pass / pinned H2D; /resident = pass / all-resident")
    print(" ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(COLUMNS)))
    for row in rows:
        print(format_row(row))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"device": name, "tokens": tokens, "bandwidth": bandwidth, "rows": rows}, indent=1))
    failed = [r["config"] for r in strata_rows if not r["bit_identical"]]
    if failed:
        print(f"NOT bit-identical to the unmanaged run: {failed}")
        return 1
    print("cuda_linear_stack: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
