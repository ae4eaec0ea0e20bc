"""strata from Python with nothing but the standard library (ctypes).

Registers one layer from host memory, stores it as bf16, computes in f32, and reads the values
back through the views. Usage: python3 ctypes_minimal.py [path/to/libstrata.so]
"""
import ctypes as C
import struct
import sys

lib = C.CDLL(sys.argv[1] if len(sys.argv) > 1 else "libstrata.so")

STRATA_OK, STRATA_ERR_STATE = 0, 10
STRATA_DTYPE_F32, STRATA_DTYPE_BF16 = 1, 3


class Options(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("compute_device", C.c_uint32), ("device_index", C.c_int32),
                ("vram_limit", C.c_uint64), ("host_limit", C.c_uint64), ("prefetch_depth", C.c_uint32),
                ("flags", C.c_uint32)]


class Placement(C.Structure):
    _fields_ = [("device", C.c_uint32), ("dtype", C.c_uint32)]


class Tiers(C.Structure):
    _fields_ = [("struct_size", C.c_uint32), ("offload", Placement), ("onload", Placement),
                ("preparing", Placement), ("computation", Placement), ("quantization", C.c_uint32)]


class HostTensor(C.Structure):
    _fields_ = [("name", C.c_char_p), ("dtype", C.c_uint32), ("ndim", C.c_uint32),
                ("shape", C.POINTER(C.c_int64)), ("data", C.c_void_p)]


class TensorView(C.Structure):
    _fields_ = [("name", C.c_char_p), ("data", C.c_void_p), ("dtype", C.c_uint32), ("device", C.c_uint32),
                ("device_index", C.c_int32), ("ndim", C.c_uint32), ("shape", C.c_int64 * 8), ("nbytes", C.c_uint64)]


lib.strata_options_default.restype = Options
lib.strata_tiers_default.restype = Tiers
lib.strata_status_name.restype = C.c_char_p
lib.strata_last_error.restype = C.c_size_t
lib.strata_context_destroy.restype = None


def check(status):
    if status != STRATA_OK:
        message = C.create_string_buffer(1024)
        lib.strata_last_error(message, len(message))
        raise RuntimeError(f"{lib.strata_status_name(status).decode()}: {message.value.decode()}")


ctx = C.c_void_p()
check(lib.strata_context_create(C.byref(lib.strata_options_default()), C.byref(ctx)))
tiers = lib.strata_tiers_default()
tiers.offload.dtype = STRATA_DTYPE_BF16       # kept in RAM as bf16
tiers.computation.dtype = STRATA_DTYPE_F32    # handed out as f32
group = C.c_uint32()
check(lib.strata_group_create(ctx, b"model", C.byref(tiers), C.byref(group)))

values = [0.5, -1.25, 3.0, 1024.0, -0.0078125, 7.5]
data = (C.c_float * 6)(*values)
shape = (C.c_int64 * 2)(2, 3)
tensor = HostTensor(b"weight", STRATA_DTYPE_F32, 2, shape, C.cast(data, C.c_void_p))
layer = C.c_uint64()
check(lib.strata_layer_register_host(ctx, group, b"linear", C.byref(tensor), 1, C.byref(layer)))

views = (TensorView * 4)()
count = C.c_size_t()
check(lib.strata_acquire_for_compute(ctx, layer, None, views, 4, C.byref(count)))
view = views[0]
got = struct.unpack("6f", C.string_at(view.data, view.nbytes))
print(f"{view.name.decode()}: shape {list(view.shape[:view.ndim])}, values {list(got)}")
assert list(got) == values, got  # all of these are exact in bf16
check(lib.strata_release(ctx, layer, None))
assert lib.strata_release(ctx, layer, None) == STRATA_ERR_STATE  # a second release is refused
lib.strata_context_destroy(ctx)
print("ctypes_minimal: OK")
