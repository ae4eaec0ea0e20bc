"""DLPack capsules for strata's tensor views, built with ctypes (no compiled extension).

No Python code runs when a consumer (torch, numpy, cupy, jax) lets go of a tensor: consumers
often free tensors while an exception is propagating, and a ctypes callback run then swallows
that exception. So each DLManagedTensor, with its shape and strides, is one block from the C
allocator whose deleter is the C library's free() itself. A capsule has no destructor: the
lease that made it frees the blocks of capsules nobody consumed when it is released, and
renames those capsules so that nobody can consume them afterwards.
The tensor's bytes are strata's and are never freed here: they are valid until the layer is
released, whatever the consumer does.
"""

import ctypes as C
import os
import struct

from ._lib import DType, Device

# DLPack's DLDeviceType.
KDL_CPU = 1
KDL_CUDA = 2

# DLPack's DLDataTypeCode (dlpack.h v1.1 added the fp8 codes).
_KDL_INT, _KDL_UINT, _KDL_FLOAT, _KDL_BFLOAT, _KDL_BOOL = 0, 1, 2, 4, 6
_KDL_FLOAT8_E4M3FN, _KDL_FLOAT8_E5M2 = 10, 12
DTYPE_CODES = {DType.F32: (_KDL_FLOAT, 32), DType.F16: (_KDL_FLOAT, 16),
               DType.F64: (_KDL_FLOAT, 64), DType.BF16: (_KDL_BFLOAT, 16),
               DType.F8_E4M3FN: (_KDL_FLOAT8_E4M3FN, 8), DType.F8_E5M2: (_KDL_FLOAT8_E5M2, 8),
               DType.I64: (_KDL_INT, 64), DType.I32: (_KDL_INT, 32), DType.I16: (_KDL_INT, 16),
               DType.I8: (_KDL_INT, 8), DType.U8: (_KDL_UINT, 8), DType.BOOL: (_KDL_BOOL, 8)}

# The version this producer speaks when the consumer accepts versioned capsules.
DLPACK_VERSION = (1, 1)
_FLAG_READ_ONLY = 1


# The structs of dlpack.h, packed by hand: building them as ctypes Structures costs ~60 us a
# tensor, struct.pack a few. All fields fall on their natural alignment in this order.
# DLTensor: data, device (type, id), ndim, dtype (code, bits, lanes), shape, strides, byte_offset.
_DLTENSOR = "QiiiBBHQQQ"
# DLManagedTensor: dl_tensor, manager_ctx, deleter.
_MANAGED = struct.Struct("=" + _DLTENSOR + "QQ")
# DLManagedTensorVersioned: version (major, minor), manager_ctx, deleter, flags, dl_tensor.
_VERSIONED = struct.Struct("=IIQQQ" + _DLTENSOR)

_libc = C.cdll.msvcrt if os.name == "nt" else C.CDLL(None)
_malloc = _libc.malloc
_malloc.restype, _malloc.argtypes = C.c_void_p, [C.c_size_t]
_free = _libc.free
_free.restype, _free.argtypes = None, [C.c_void_p]
# free(void *) has the calling convention of a DLPack deleter(DLManagedTensor *).
_FREE_ADDRESS = C.cast(_free, C.c_void_p).value

_capsule_new = C.pythonapi.PyCapsule_New
_capsule_new.restype = C.py_object
_capsule_new.argtypes = [C.c_void_p, C.c_char_p, C.c_void_p]
_capsule_is_valid = C.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = C.c_int
_capsule_is_valid.argtypes = [C.py_object, C.c_char_p]
_capsule_set_name = C.pythonapi.PyCapsule_SetName
_capsule_set_name.restype = C.c_int
_capsule_set_name.argtypes = [C.py_object, C.c_char_p]

# Capsule names must outlive the capsules: module constants do.
_NAME = b"dltensor"
_NAME_VERSIONED = b"dltensor_versioned"
_NAME_RELEASED = b"strata_released_dltensor"


def device_of(device, device_index):
    """The (DLDeviceType, device_id) of a strata view."""
    if device == Device.CUDA:
        return (KDL_CUDA, device_index)
    return (KDL_CPU, 0)


class Layout:
    """What a DLPack tensor over a strata view holds besides its address: made once, it makes
    capsules over any address of that layout with one malloc, one pack and one PyCapsule."""

    def __init__(self, dtype, shape, device, device_index):
        if dtype not in DTYPE_CODES:
            raise BufferError(f"strata dtype {DType(dtype).name} has no DLPack code")
        code, bits = DTYPE_CODES[dtype]
        ndim = len(shape)
        strides = [1] * ndim
        for i in range(ndim - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        device_type, device_id = device_of(device, device_index)
        self.ndim = ndim
        self.fields = (device_type, device_id, ndim, code, bits, 1)
        self.dims = struct.pack(f"={2 * ndim}q", *shape, *strides)

    def capsule(self, data, versioned=False):
        """(capsule, block): a DLPack capsule over `data` (an address), compact row-major. A
        versioned capsule is flagged read-only (numpy honours it): the bytes may be the
        resident copy that later acquires hand out again."""
        head, name = (_VERSIONED, _NAME_VERSIONED) if versioned else (_MANAGED, _NAME)
        size = head.size + len(self.dims)
        block = _malloc(size)
        if not block:
            raise MemoryError("malloc failed for a DLPack tensor")
        dims = block + head.size
        tensor = (data, *self.fields, dims, dims + 8 * self.ndim, 0)
        if versioned:
            packed = head.pack(*DLPACK_VERSION, 0, _FREE_ADDRESS, _FLAG_READ_ONLY, *tensor)
        else:
            packed = head.pack(*tensor, 0, _FREE_ADDRESS)
        C.memmove(block, packed + self.dims, size)
        return _capsule_new(block, name, None), block


def capsule(data, dtype, shape, device, device_index, versioned):
    """Layout(dtype, shape, device, device_index).capsule(data, versioned)."""
    return Layout(dtype, shape, device, device_index).capsule(data, versioned)


def retire(capsules):
    """At release: frees the blocks of the (capsule, block) pairs nobody consumed and renames
    those capsules so that they can no longer be consumed. Consumers free the others."""
    for capsule, block in capsules:
        for name in (_NAME, _NAME_VERSIONED):
            if _capsule_is_valid(capsule, name):
                _capsule_set_name(capsule, _NAME_RELEASED)
                _free(block)
