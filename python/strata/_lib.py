"""The C ABI as ctypes: constants, struct layouts, prototypes, and finding libstrata.

Everything here mirrors include/strata.h one to one; python/tests/test_layout.py checks the
constants against the header and the struct sizes against the library.
"""

import ctypes as C
import enum
import os
import sys
from pathlib import Path

UNLIMITED = 2**64 - 1
MAX_DIMS = 8
FLAG_STRICT_BUDGET = 1


class DType(enum.IntEnum):
    """STRATA_DTYPE_*. SOURCE keeps the stored dtype (in a tier)."""

    SOURCE = 0
    F32 = 1
    F16 = 2
    BF16 = 3
    F8_E4M3FN = 4
    F8_E5M2 = 5
    F64 = 6
    I64 = 7
    I32 = 8
    I16 = 9
    I8 = 10
    U8 = 11
    BOOL = 12

    @property
    def itemsize(self):
        return _ITEMSIZE[self]

    @classmethod
    def parse(cls, value):
        """A DType from a DType, an int, a name ("bf16", "F8_E4M3FN") or a torch/numpy dtype
        name ("bfloat16", "torch.float8_e4m3fn", "float32"); None means SOURCE."""
        if value is None:
            return cls.SOURCE
        if isinstance(value, int):
            return cls(value)
        name = str(value).lower()
        name = name[len("torch."):] if name.startswith("torch.") else name
        if name.upper() in cls.__members__:
            return cls[name.upper()]
        if name in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[name]
        raise ValueError(f"unknown strata dtype {value!r}")


_ITEMSIZE = {DType.SOURCE: 0, DType.F32: 4, DType.F16: 2, DType.BF16: 2, DType.F8_E4M3FN: 1,
             DType.F8_E5M2: 1, DType.F64: 8, DType.I64: 8, DType.I32: 4, DType.I16: 2, DType.I8: 1,
             DType.U8: 1, DType.BOOL: 1}
_DTYPE_ALIASES = {"float32": DType.F32, "float": DType.F32, "float16": DType.F16, "half": DType.F16,
                  "bfloat16": DType.BF16, "float8_e4m3fn": DType.F8_E4M3FN,
                  "float8_e5m2": DType.F8_E5M2, "float64": DType.F64, "double": DType.F64,
                  "int64": DType.I64, "long": DType.I64, "int32": DType.I32, "int": DType.I32,
                  "int16": DType.I16, "int8": DType.I8, "uint8": DType.U8, "bool": DType.BOOL}


class Device(enum.IntEnum):
    """STRATA_DEVICE_*. DEFAULT is the CPU for offload/onload, the compute device otherwise."""

    DEFAULT = 0
    DISK = 1
    CPU = 2
    CUDA = 3

    @classmethod
    def parse(cls, value):
        """A Device from a Device, an int, or a name ("cpu", "cuda", "cuda:1", a torch.device);
        None means DEFAULT. The ordinal of "cuda:N" is the context's business, not a tier's."""
        if value is None:
            return cls.DEFAULT
        if isinstance(value, int):
            return cls(value)
        name = str(value).split(":")[0].upper()
        if name in cls.__members__:
            return cls[name]
        raise ValueError(f"unknown strata device {value!r}")


class Quantization(enum.IntEnum):
    """STRATA_QUANT_*: how fp8 storage of 2+ dimensional tensors is scaled."""

    NONE = 0
    PER_TENSOR = 1
    PER_CHANNEL = 2

    @classmethod
    def parse(cls, value):
        if value is None:
            return cls.NONE
        if isinstance(value, int):
            return cls(value)
        return cls[str(value).upper()]


class LogLevel(enum.IntEnum):
    """STRATA_LOG_*: the level a log callback receives."""

    ERROR = 1
    WARN = 2
    INFO = 3
    DEBUG = 4


# Status numbers, fixed by the ABI (never renumbered).
STATUS_NAMES = ("STRATA_OK", "STRATA_ERR_NULL_ARGUMENT", "STRATA_ERR_INVALID_ARGUMENT",
                "STRATA_ERR_INVALID_HANDLE", "STRATA_ERR_NOT_FOUND", "STRATA_ERR_IO",
                "STRATA_ERR_FORMAT", "STRATA_ERR_UNSUPPORTED", "STRATA_ERR_OUT_OF_MEMORY",
                "STRATA_ERR_BUDGET", "STRATA_ERR_STATE", "STRATA_ERR_NO_DEVICE",
                "STRATA_ERR_DEVICE", "STRATA_ERR_BUFFER_TOO_SMALL", "STRATA_ERR_PANIC")

LOG_FN = C.CFUNCTYPE(None, C.c_void_p, C.c_uint32, C.c_char_p)
PROGRESS_FN = C.CFUNCTYPE(None, C.c_void_p, C.c_char_p, C.c_uint64, C.c_uint64)


class strata_options(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("compute_device", C.c_uint32),
                ("device_index", C.c_int32), ("vram_limit", C.c_uint64),
                ("host_limit", C.c_uint64), ("prefetch_depth", C.c_uint32), ("flags", C.c_uint32),
                ("log_fn", LOG_FN), ("log_user", C.c_void_p),
                ("progress_fn", PROGRESS_FN), ("progress_user", C.c_void_p),
                ("vram_headroom", C.c_uint64), ("host_threads", C.c_uint32)]


class strata_placement(C.Structure):
    _fields_ = [("device", C.c_uint32), ("dtype", C.c_uint32)]


class strata_tiers(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("offload", strata_placement),
                ("onload", strata_placement), ("preparing", strata_placement),
                ("computation", strata_placement), ("quantization", C.c_uint32)]


class strata_host_tensor(C.Structure):
    _fields_ = [("name", C.c_char_p), ("dtype", C.c_uint32), ("ndim", C.c_uint32),
                ("shape", C.POINTER(C.c_int64)), ("data", C.c_void_p)]


class strata_tensor_view(C.Structure):
    _fields_ = [("name", C.c_char_p), ("data", C.c_void_p), ("dtype", C.c_uint32),
                ("device", C.c_uint32), ("device_index", C.c_int32), ("ndim", C.c_uint32),
                ("shape", C.c_int64 * MAX_DIMS), ("nbytes", C.c_uint64)]


class strata_stats(C.Structure):
    # Fields are appended to the library's strata_stats over time: an older build accepts this
    # larger struct and leaves the newer fields 0.
    _fields_ = [("struct_size", C.c_uint32)] + [(name, C.c_uint64) for name in (
        "vram_in_use", "vram_peak", "host_in_use", "host_peak", "bytes_to_device",
        "bytes_from_disk", "acquires", "resident_hits", "prefetch_hits", "misses", "stall_ns",
        "overcommit_peak", "vram_limit", "evictions", "implicit_onloads", "host_limit",
        "device_allocations")]


class strata_store_options(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("mode", C.c_uint32), ("host_limit", C.c_uint64),
                ("name", C.c_char_p), ("checkpoint", C.c_char_p), ("dir", C.c_char_p)]


class strata_store_stats(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("created", C.c_uint32)] + [
        (name, C.c_uint64) for name in ("host_in_use", "host_peak", "host_limit", "layers",
                                        "fills", "bytes_filled", "shared", "waits",
                                        "takeovers")]


_P = C.c_void_p
_STATUS = C.c_uint32
_PROTOTYPES = {
    "strata_version": (C.c_uint32, []),
    "strata_status_name": (C.c_char_p, [_STATUS]),
    "strata_last_error": (C.c_size_t, [C.c_char_p, C.c_size_t]),
    "strata_options_default": (strata_options, []),
    "strata_tiers_default": (strata_tiers, []),
    "strata_context_create": (_STATUS, [C.POINTER(strata_options), C.POINTER(_P)]),
    "strata_context_destroy": (None, [_P]),
    "strata_group_create": (_STATUS, [_P, C.c_char_p, C.POINTER(strata_tiers),
                                      C.POINTER(C.c_uint64)]),
    "strata_group_onload": (_STATUS, [_P, C.c_uint64]),
    "strata_group_offload": (_STATUS, [_P, C.c_uint64]),
    "strata_group_destroy": (_STATUS, [_P, C.c_uint64]),
    "strata_layer_register_host": (_STATUS, [_P, C.c_uint64, C.c_char_p,
                                             C.POINTER(strata_host_tensor), C.c_size_t,
                                             C.POINTER(C.c_uint64)]),
    "strata_checkpoint_open": (_STATUS, [_P, C.c_char_p, C.POINTER(_P)]),
    "strata_checkpoint_close": (None, [_P]),
    "strata_layer_register_checkpoint": (_STATUS, [_P, C.c_uint64, _P, C.c_char_p,
                                                   C.POINTER(C.c_char_p), C.c_size_t,
                                                   C.POINTER(C.c_uint64)]),
    "strata_group_register_checkpoint": (_STATUS, [_P, C.c_uint64, _P, C.c_char_p, C.c_uint32,
                                                   C.POINTER(C.c_size_t)]),
    "strata_layer_find": (_STATUS, [_P, C.c_char_p, C.POINTER(C.c_uint64)]),
    "strata_layer_tensor_count": (_STATUS, [_P, C.c_uint64, C.POINTER(C.c_size_t)]),
    "strata_layer_unregister": (_STATUS, [_P, C.c_uint64]),
    "strata_acquire_for_compute": (_STATUS, [_P, C.c_uint64, _P, C.POINTER(strata_tensor_view),
                                             C.c_size_t, C.POINTER(C.c_size_t)]),
    "strata_release": (_STATUS, [_P, C.c_uint64, _P]),
    "strata_stats_get": (_STATUS, [_P, C.POINTER(strata_stats)]),
    "strata_trace_write": (_STATUS, [_P, C.c_char_p]),
}

# Newer than some builds this binding may load: bound when the library has them.
_OPTIONAL_PROTOTYPES = {
    "strata_context_set_vram_limit": (_STATUS, [_P, C.c_uint64]),
    "strata_context_set_host_limit": (_STATUS, [_P, C.c_uint64]),
    "strata_store_options_default": (strata_store_options, []),
    "strata_store_create": (_STATUS, [C.POINTER(strata_store_options), C.POINTER(_P)]),
    "strata_store_destroy": (None, [_P]),
    "strata_context_attach_store": (_STATUS, [_P, _P]),
    "strata_store_stats_get": (_STATUS, [_P, C.POINTER(strata_store_stats)]),
}

_LIBRARY_FILE = {"darwin": "libstrata.dylib", "win32": "strata.dll"}.get(sys.platform,
                                                                        "libstrata.so")
# What the wheel build (setuptools-rust, see pyproject.toml) puts in the package folder.
_PACKAGED_FILE = "libstrata.pyd" if sys.platform == "win32" else "libstrata.abi3.so"


def candidates():
    """Where the library is looked for, in order: (description, path)."""
    places = []
    env = os.environ.get("STRATA_LIBRARY")
    if env:
        path = Path(env)
        places.append(("STRATA_LIBRARY", path / _LIBRARY_FILE if path.is_dir() else path))
    package = Path(__file__).resolve().parent
    places.append(("the package folder", package / _PACKAGED_FILE))
    places.append(("the package folder", package / _LIBRARY_FILE))
    roots = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    # python/strata/ inside a checkout: the repository root is two levels up.
    if (package.parent.parent / "Cargo.toml").is_file():
        roots.append(package.parent.parent / "target")
    for root in roots:
        for sub in ("release", "release/deps", "debug", "debug/deps"):
            places.append(("the build folder", root / sub / _LIBRARY_FILE))
    return places


_lib = None


def lib():
    """The loaded library with its prototypes set (loaded once, on first use)."""
    global _lib
    if _lib is None:
        places = candidates()
        found = next((path for _, path in places if path.is_file()), None)
        if found is None:
            looked = "\n".join(f"  {what}: {path}" for what, path in places)
            hint = "" if os.environ.get("STRATA_LIBRARY") else " (STRATA_LIBRARY is not set)"
            if not any(what == "the build folder" for what, _ in places):
                looked += "\n  (no build folder: this package is not inside a strata checkout)"
            raise OSError(f"strata: {_LIBRARY_FILE} not found{hint}; looked in:\n{looked}\n"
                          "Install the package with `pip install ./python` (it builds the library), build it "
                          "with `cargo build --release`, or set STRATA_LIBRARY to its "
                          "path.")
        handle = C.CDLL(str(found))
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(handle, name)
            fn.restype, fn.argtypes = restype, argtypes
        for name, (restype, argtypes) in _OPTIONAL_PROTOTYPES.items():
            if hasattr(handle, name):
                fn = getattr(handle, name)
                fn.restype, fn.argtypes = restype, argtypes
        handle.path = found
        _lib = handle
    return _lib
