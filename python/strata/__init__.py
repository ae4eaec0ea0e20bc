"""strata: run models larger than GPU memory. A pure-Python (ctypes) binding of libstrata.

    import strata
    with strata.Context(vram_limit="8GiB") as ctx:
        group = ctx.group("model", strata.Tiers(offload_dtype="bf16", computation_dtype="f32"))
        layer = group.register_host("linear", {"weight": ("f32", (2, 3), data)})
        with ctx.acquire(layer) as views:
            array = numpy.from_dlpack(views["weight"])

The library is found from STRATA_LIBRARY, this package's folder, or the repository's build
folder. PyTorch integration: strata.torch.enable_vram_management(module, vram_limit=...).
Several contexts (one per GPU) share one host copy of a checkpoint through a strata.Store.
"""

from ._core import (Checkpoint, Context, Group, Layer, Lease, Options, Stats, Store, StoreStats,
                    Tiers, TensorView, Views, parse_bytes, version)
from ._lib import FLAG_STRICT_BUDGET, MAX_DIMS, UNLIMITED, DType, Device, LogLevel, Quantization
from .errors import (BudgetError, BufferTooSmallError, DeviceError, Error, FormatError,
                     InvalidArgumentError, InvalidHandleError, IoError, NoDeviceError,
                     NotFoundError, NullArgumentError, OutOfMemoryError, PanicError, StateError,
                     UnsupportedError, last_error)

__all__ = ["Checkpoint", "Context", "Group", "Layer", "Lease", "Options", "Stats", "Store",
           "StoreStats", "Tiers", "TensorView", "Views", "parse_bytes", "version",
           "FLAG_STRICT_BUDGET", "MAX_DIMS", "UNLIMITED", "DType", "Device", "LogLevel",
           "Quantization", "BudgetError", "BufferTooSmallError", "DeviceError", "Error",
           "FormatError", "InvalidArgumentError", "InvalidHandleError", "IoError",
           "NoDeviceError", "NotFoundError", "NullArgumentError", "OutOfMemoryError",
           "PanicError", "StateError", "UnsupportedError", "last_error"]
