"""Helpers for the binding tests: reference conversions computed here, independently of strata,
and a safetensors writer (the format is 8 bytes of header length, a JSON header, the data)."""

import json
import math
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEADER = REPO / "include" / "strata.h"


def skipped(what):
    """Prints the SKIPPED line the Rust test runner shows, and returns the reason."""
    print(f"SKIPPED: {what}", file=sys.stderr)
    return what


def f32(values):
    """Rounds Python floats to f32."""
    return [struct.unpack("<f", struct.pack("<f", v))[0] for v in values]


def bf16_bits(value):
    """f32 -> bf16 with round-to-nearest-even, as bits."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    if math.isnan(value):
        return (bits >> 16) | 0x40
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def bf16_value(bits):
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def f16_round(value):
    """f32 -> f16 (round-to-nearest-even, Python's own half packing) -> float."""
    return struct.unpack("<e", struct.pack("<e", value))[0]


def e4m3fn_value(code):
    """The value of an fp8 e4m3fn code (no infinities; 0x7F/0xFF are NaN)."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0:
        return sign * mantissa / 8 * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e4m3fn_round(value):
    """The nearest e4m3fn value (ties to an even code), for finite |value| <= 448."""
    codes = [c for c in range(256) if c & 0x7F != 0x7F]
    best = min(codes, key=lambda c: (abs(e4m3fn_value(c) - value), c & 1))
    return e4m3fn_value(best)


def write_safetensors(path, tensors):
    """tensors: name -> (safetensors dtype such as "F32", shape, bytes)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
