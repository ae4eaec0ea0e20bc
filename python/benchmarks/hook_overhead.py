#!/usr/bin/env python3
"""What strata.torch's hooks cost per managed submodule call, on the CPU.

    python3 python/benchmarks/hook_overhead.py            # 200 x nn.Linear(16, 16), batch 1

One nn.Sequential of --layers nn.Linear(16, 16) (so small that a call is almost all Python and
dispatch), three copies with the same weights: unmanaged, managed with vram_limit unlimited
(the weights stay where strata put them: tensors are reused), and managed with vram_limit 0
(nothing may stay: every call acquires afresh). Rounds alternate between the three so that a
noisy machine slows them alike; each round times --forwards forwards under
torch.inference_mode(). Printed per managed configuration: the median forward time, the extra
microseconds per managed submodule call against the unmanaged median of the same run, the
ratio of the two medians, and whether the output is bit-identical to the unmanaged one.
Aim (issue 22): at most --aim-us (10) extra microseconds per managed submodule call.

Exits 1 when an output differs; 0 otherwise (the aim is printed, not enforced: timing is not a
test).
"""

import argparse
import copy
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
import strata.torch as st  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--forwards", type=int, default=20, help="forwards timed per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--aim-us", type=float, default=10.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    reference = nn.Sequential(*(nn.Linear(args.width, args.width) for _ in range(args.layers)))
    x = torch.randn(1, args.width)
    models = {"unmanaged": reference}
    for name, limit in (("vram_limit unlimited", None), ("vram_limit 0", 0)):
        model = copy.deepcopy(reference)
        st.enable_vram_management(model, vram_limit=limit, device="cpu")
        models[name] = model

    times = {name: [] for name in models}
    outputs = {}
    with torch.inference_mode():
        for name, model in models.items():  # warm-up: first calls learn the order, import
            outputs[name] = model(x)
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(args.forwards):
                    model(x)
                times[name].append((time.perf_counter() - start) / args.forwards)

    base = statistics.median(times["unmanaged"])
    print(f"{args.layers} x nn.Linear({args.width}, {args.width}), batch 1, CPU, "
          f"{args.rounds} rounds x {args.forwards} forwards, medians")
    print(f"  unmanaged: {base * 1e6:9.1f} us per forward, "
          f"{base / args.layers * 1e6:.1f} us per submodule call")
    failed = False
    for name in list(models)[1:]:
        median = statistics.median(times[name])
        extra = (median - base) / args.layers * 1e6
        same = torch.equal(outputs[name], outputs["unmanaged"])
        failed |= not same
        met = "met" if extra <= args.aim_us else "NOT met"
        print(f"  {name}: {median * 1e6:9.1f} us per forward, {extra:+.1f} us per managed "
              f"submodule call (aim <= {args.aim_us:g}: {met}), {median / base:.2f}x unmanaged, "
              f"output {'bit-identical' if same else 'DIFFERS'}")
    for model in list(models.values())[1:]:
        st.disable_vram_management(model)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
