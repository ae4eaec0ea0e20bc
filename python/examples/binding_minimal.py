"""The strata package with the standard library only: a layer kept in RAM as bf16, handed out
as f32, under a budget. Run: python3 python/examples/binding_minimal.py (after cargo build)."""

import array
import struct

import strata

with strata.Context(vram_limit="64MiB") as ctx:
    tiers = strata.Tiers(offload_dtype="bf16",       # kept in RAM as bf16
                         computation_dtype="f32")    # handed out as f32
    group = ctx.group("model", tiers)
    values = [0.5, -1.25, 3.0, 1024.0, -0.0078125, 7.5]   # all exact in bf16
    layer = group.register_host("linear", {"weight": ("f32", (2, 3), array.array("f", values))})

    with ctx.acquire(layer) as views:               # released at the end of the block
        weight = views["weight"]
        got = struct.unpack("6f", weight.tobytes())
        print(f"{weight.name}: {weight.dtype.name} {list(weight.shape)} {list(got)}")
        assert list(got) == values, got

    try:
        weight.tobytes()                            # the view died with the release
    except strata.StateError as error:
        print(f"after release: {error.status_name}")
    try:
        ctx.find_layer("missing")
    except strata.NotFoundError as error:
        print(f"lookup: {error}")
    stats = ctx.stats()
    print(f"acquires {stats.acquires}, bytes to device {stats.bytes_to_device}")
print("binding_minimal: OK")
