#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into seeds/checkpoint_open/ and seeds/abi_sequence/.

Each seed is the target's input format (see fuzz_targets/checkpoint_open.rs): a layout byte, then
files cut by little-endian u16 lengths. A few valid tiny checkpoints in each layout, and some
broken ones, so libFuzzer starts from the format's structure instead of guessing JSON.
Run: python3 fuzz/seeds.py
"""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "checkpoint_open")
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "BOOL": 1, "F8_E4M3": 1}


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape)]; data bytes are a counting pattern."""
    header, data = {}, b""
    for name, dtype, shape in tensors:
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes((len(data) + i) % 251 for i in range(n))
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


def raw(header):
    """A hand-written header with its length in front; the caller appends the data."""
    return struct.pack("<Q", len(header)) + header


def piece(b):
    return struct.pack("<H", len(b)) + b


def index(weight_map):
    return json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}).encode()


block_a = [("blocks.0.weight", "BF16", [4, 4]), ("blocks.0.bias", "F32", [4])]
block_b = [("blocks.1.weight", "F8_E4M3", [4, 4]), ("blocks.1.bias", "F16", [4])]
a, b = safetensors(block_a), safetensors(block_b, {"format": "pt"})
split_a = safetensors([("blocks.0.weight", "BF16", [4, 4])])
split_b = safetensors([("blocks.0.bias", "F32", [4]), ("blocks.1.mask", "BOOL", [3])])
bad_json = raw(b'{"t":{"dtype')
seeds = {
    "single_two_blocks": b"\x00" + a,
    "single_every_dtype": b"\x00" + safetensors(
        [("f", "F32", [2]), ("h", "F16", [3]), ("i", "I64", [1]), ("u", "U8", [5]),
         ("e", "F32", [0, 4]), ("s", "F32", [])]),
    "single_unsupported_dtype": b"\x00" + raw(b'{"p":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}')
    + b"\x12\x34",
    "index_two_shards": b"\x01" + piece(index({t[0]: "a.safetensors" for t in block_a}
                                                | {t[0]: "b.safetensors" for t in block_b}))
    + piece(a) + b,
    "index_layer_split": b"\x01" + piece(index({"blocks.0.weight": "a.safetensors",
                                                 "blocks.0.bias": "./b.safetensors",
                                                 "blocks.1.mask": "b.safetensors"}))
    + piece(split_a) + split_b,
    "shards_two": b"\x02" + piece(a) + b,
    # Broken: the target must turn each into an error.
    "broken_header_length": b"\x00" + struct.pack("<Q", 2**63) + b"{}",
    "broken_json": b"\x00" + bad_json,
    "broken_overlap": b"\x00" + raw(b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
                                     b'"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}')
    + bytes(6),
    "broken_truncated_data": b"\x00" + a[:-5],
    "broken_index_missing_shard": b"\x01" + piece(index({"x": "c.safetensors"})) + piece(a) + b,
    "broken_index_lies": b"\x01" + piece(index({"nope": "a.safetensors"})) + piece(a) + b,
    "broken_duplicate_tensor": b"\x02" + piece(a) + a,
}
os.makedirs(OUT, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes in {OUT}")

# ----- abi_sequence: operations as fuzz_targets/abi_sequence.rs reads them -----
ABI_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "abi_sequence")
F32, F16, BF16, E4M3, E5M2, F64, I64, I32, U8, BOOL = 1, 2, 3, 4, 5, 6, 7, 8, 11, 12


def limit(n):
    """0, unlimited (None), or n bytes as a u32."""
    if n == 0:
        return b"\x00"
    if n is None:
        return b"\x01"
    return b"\x04" + struct.pack("<I", n)


def context(vram=None, depth=2, strict=False):
    # op, vram_limit, host_limit unlimited, depth (0..3), flags, CPU device, full struct, no NULL
    return b"\x00" + limit(vram) + b"\x01" + b"\x02" + bytes([depth]) + bytes([4 if strict else 0]) \
        + b"\x01\x05\x00"


def group(offload=0, onload=0, preparing=0, computation=0, quant=0):
    out = b"\x02\x00"
    for dtype in (offload, onload, preparing, computation):
        out += b"\x00" + bytes([dtype])
    return out + bytes([quant]) + b"\x02\x00\x00"


def tensor(name, dtype, shape):
    size = [0, 4, 2, 2, 1, 1, 8, 8, 4, 2, 1, 1, 1][dtype]
    n = 1
    for d in shape:
        n *= d
    data = bytes((i * 37 + 11) % 256 for i in range(n * size))
    return bytes([name, dtype, len(shape)]) + bytes(shape) + data


def layer(group_index, name, tensors):
    return b"\x03\x00\x00" + bytes([group_index, name, len(tensors)]) + b"".join(tensors) + b"\x00"


def acquire(index):
    return b"\x05\x00\x00" + bytes([index]) + b"\x03\x00" + bytes(8)


def release(index):
    return b"\x07\x00\x00" + bytes([index])


def passes(n):
    return b"\x0f\x00" + bytes([n])


def block(name):
    return layer(0, name, [tensor(0, F32, [4, 4]), tensor(1, F32, [4])])


abi_seeds = {
    "fp8_per_channel_passes": context(vram=1200) + group(BF16, 0, E4M3, F32, 2)
    + block(0) + block(1) + block(2) + passes(3),
    "zero_budget_prefetch": context(vram=0, depth=3) + group(0, F16, BF16, F32, 0)
    + block(0) + block(1) + block(2) + block(3) + passes(2),
    "strict_budget_two_held": context(vram=700, strict=True) + group(0, 0, BF16, F32, 1)
    + block(0) + block(1) + acquire(0) + acquire(1) + release(0) + acquire(1) + release(1),
    "limit_lowered_while_held": context(vram=None) + group(0, 0, E5M2, BF16, 2)
    + block(0) + block(1) + acquire(0) + acquire(1) + b"\x0b\x00\x01" + limit(200)
    + release(0) + release(1) + passes(1),
    "stale_ids": context() + group() + block(0) + block(1) + acquire(0)
    + b"\x0a\x00\x00\x00" + release(0) + b"\x0a\x00\x00\x00" + acquire(0) + release(0)
    + b"\x09\x00\x02\x00\x00" + acquire(0) + b"\x01\x00" + acquire(0),
    "every_dtype": context(vram=4000) + group(0, 0, F16, F64, 0)
    + layer(0, 0, [tensor(0, F32, [2, 3]), tensor(1, F16, [3]), tensor(2, BF16, [2, 2]),
                   tensor(3, E4M3, [4, 2]), tensor(4, E5M2, [5]), tensor(5, F64, [2])][:3])
    + layer(0, 1, [tensor(0, E4M3, [4, 2]), tensor(1, E5M2, [5]), tensor(2, F64, [2])])
    + layer(0, 2, [tensor(0, I64, [2]), tensor(1, U8, [3, 1]), tensor(2, BOOL, [2])])
    + passes(2) + b"\x0c\x00\x01" + b"\x0d\x00\x03",
    # Past the point where 8-bit group generations wrapped: a group with a layer, then 300 more
    # made and destroyed in the same slot, then the first ids used (onload of the stale group,
    # acquire of the stale layer).
    "group_churn": context() + (group() + block(0) + b"\x09\x00\x02\x00\x00")
    + (group() + b"\x09\x00\x02\x00\x00") * 300
    + b"\x09\x00\x00\x02\x00" + b"\x05\x00\x02\x00\x03\x00" + bytes(8),
}
os.makedirs(ABI_OUT, exist_ok=True)
for name, data in abi_seeds.items():
    with open(os.path.join(ABI_OUT, name), "wb") as f:
        f.write(data)
print(f"{len(abi_seeds)} seeds, {sum(map(len, abi_seeds.values()))} bytes in {ABI_OUT}")

# ----- abi_threads: a header byte (threads, budget, depth, strict), then (op, arg) pairs dealt to
# the threads in turn (see fuzz_targets/abi_threads.rs). Ops: 0-2 acquire, 3-4 release, 5 onload,
# 6 offload, 7 destroy group, 8 unregister, 9 vram limit, 10 register/create, 11 stats (arg 0xFF:
# destroy the context).
THREADS_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "abi_threads")


def header(threads=2, budget=1, depth=2, strict=False):
    """budget: 0 = budget 0, 1 = unlimited, 2 or 3 = that many times 2 KiB."""
    return bytes([(threads - 2) | budget << 2 | depth << 4 | (0x40 if strict else 0)])


def ops(*pairs):
    return b"".join(bytes(p) for p in pairs)


ACQ, REL, ONLOAD, OFFLOAD, DESTROY, UNREG, LIMIT, REGISTER, STATS = 0, 3, 5, 6, 7, 8, 9, 10, 11
threads_seeds = {
    # Two threads pass over the bf16 layers under a budget for one, so one waits for the other.
    "wait_for_room": header(2, 2) + ops(*[p for i in range(6) for p in [(ACQ, 2 + i % 2), (REL, 0)]]),
    # One thread destroys a bf16 group while the other offloads it, with the engine prefetching.
    "offload_races_destroy": header(2, 1, 2) + ops((ACQ, 2), (OFFLOAD, 1), (REL, 0), (DESTROY, 1),
                                                   (ACQ, 3), (OFFLOAD, 1), (REL, 0), (ACQ, 2)),
    # Three threads: one holds, one waits for room, one destroys the context.
    "destroy_while_waiting": header(3, 2) + ops((ACQ, 2), (ACQ, 3), (STATS, 0), (ACQ, 3), (STATS, 0),
                                                (STATS, 0xFF), (REL, 0), (ACQ, 2), (STATS, 0)),
    # Budget lowered to 0 and lifted while two threads acquire and unregister.
    "limits_and_unregister": header(2, 1, 1) + ops((ACQ, 2), (LIMIT, 0), (REL, 0), (UNREG, 3),
                                                   (ACQ, 3), (LIMIT, 1), (REGISTER, 4), (ONLOAD, 2),
                                                   (ACQ, 4), (REL, 0)),
    "strict_four_threads": header(4, 3, 3, True) + ops(*[p for i in range(4) for p in [(ACQ, i), (ONLOAD, i), (REL, 0), (OFFLOAD, i)]]),
}
os.makedirs(THREADS_OUT, exist_ok=True)
for name, data in threads_seeds.items():
    with open(os.path.join(THREADS_OUT, name), "wb") as f:
        f.write(data)
print(f"{len(threads_seeds)} seeds, {sum(map(len, threads_seeds.values()))} bytes in {THREADS_OUT}")
