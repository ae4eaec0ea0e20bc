#!/usr/bin/env python3
"""Writes the seed corpus of the checkpoint_open fuzz target into seeds/checkpoint_open/.

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
