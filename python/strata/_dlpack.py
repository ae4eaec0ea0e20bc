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


class DLDevice(C.Structure):
    _fields_ = [("device_type", C.c_int32), ("device_id", C.c_int32)]


class DLDataType(C.Structure):
    _fields_ = [("code", C.c_uint8), ("bits", C.c_uint8), ("lanes", C.c_uint16)]


class DLTensor(C.Structure):
    _fields_ = [("data", C.c_void_p), ("device", DLDevice), ("ndim", C.c_int32),
                ("dtype", DLDataType), ("shape", C.POINTER(C.c_int64)),
                ("strides", C.POINTER(C.c_int64)), ("byte_offset", C.c_uint64)]


class DLManagedTensor(C.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", C.c_void_p), ("deleter", C.c_void_p)]


class DLPackVersion(C.Structure):
    _fields_ = [("major", C.c_uint32), ("minor", C.c_uint32)]


class DLManagedTensorVersioned(C.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", C.c_void_p), ("deleter", C.c_void_p),
                ("flags", C.c_uint64), ("dl_tensor", DLTensor)]


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


def capsule(data, dtype, shape, device, device_index, versioned):
    """(capsule, block): a DLPack capsule over `data` (an address), compact row-major. A
    versioned capsule is flagged read-only (numpy honours it): the bytes may be the resident
    copy that later acquires hand out again."""
    if dtype not in DTYPE_CODES:
        raise BufferError(f"strata dtype {DType(dtype).name} has no DLPack code")
    code, bits = DTYPE_CODES[dtype]
    ndim = len(shape)
    strides = [1] * ndim
    for i in range(ndim - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    device_type, device_id = device_of(device, device_index)
    tensor = DLTensor(data, DLDevice(device_type, device_id), ndim, DLDataType(code, bits, 1),
                      None, None, 0)
    struct, name = ((DLManagedTensorVersioned, _NAME_VERSIONED) if versioned
                    else (DLManagedTensor, _NAME))
    block = _malloc(C.sizeof(struct) + 2 * 8 * max(ndim, 1))
    if not block:
        raise MemoryError("malloc failed for a DLPack tensor")
    managed = struct.from_address(block)
    dims = (C.c_int64 * (2 * ndim)).from_address(block + C.sizeof(struct))
    dims[:] = list(shape) + strides
    tensor.shape = C.cast(C.addressof(dims), C.POINTER(C.c_int64))
    tensor.strides = C.cast(C.addressof(dims) + 8 * ndim, C.POINTER(C.c_int64))
    managed.dl_tensor, managed.manager_ctx, managed.deleter = tensor, None, _FREE_ADDRESS
    if versioned:
        managed.version = DLPackVersion(*DLPACK_VERSION)
        managed.flags = _FLAG_READ_ONLY
    return _capsule_new(block, name, None), block


def retire(capsules):
    """At release: frees the blocks of the (capsule, block) pairs nobody consumed and renames
    those capsules so that they can no longer be consumed. Consumers free the others."""
    for capsule, block in capsules:
        for name in (_NAME, _NAME_VERSIONED):
            if _capsule_is_valid(capsule, name):
                _capsule_set_name(capsule, _NAME_RELEASED)
                _free(block)
