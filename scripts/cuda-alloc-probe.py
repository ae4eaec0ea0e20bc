"""What cuMemAlloc takes from a GPU's free memory, by allocation size: the figures behind
strata's `Footprint` (src/backend/mod.rs). Needs only the CUDA driver (libcuda) and Python.
Run on the GPU machine: python3 scripts/cuda-alloc-probe.py

On an H200 (driver 580.159.04, 2026-12-04): granularity 2 MiB; allocations up to 1 MiB packed
into shared pages (64 x 4 KiB took one 2 MiB page; 64 KiB, 512 KiB and 1 MiB took exactly their
size); larger ones whole 2 MiB pages (2 MiB + 12 KiB took 4 MiB, 3 MiB 4 MiB, 4 MiB + 4 KiB
6 MiB)."""
import ctypes as C

MIB = 1 << 20
cuda = C.CDLL("libcuda.so.1")


def check(status, what):
    assert status == 0, f"{what}: CUDA error {status}"


class AllocationProp(C.Structure):
    """cuda.h's CUmemAllocationProp."""
    _fields_ = [("type", C.c_int), ("requested_handle_types", C.c_int),
                ("location_type", C.c_int), ("location_id", C.c_int),
                ("win32_handle_meta_data", C.c_void_p), ("alloc_flags", C.c_ubyte * 8)]


def free_memory():
    free, total = C.c_size_t(), C.c_size_t()
    check(cuda.cuMemGetInfo_v2(C.byref(free), C.byref(total)), "cuMemGetInfo")
    return free.value


def trial(size, count):
    pointers = []
    before = free_memory()
    for _ in range(count):
        pointer = C.c_uint64()
        check(cuda.cuMemAlloc_v2(C.byref(pointer), C.c_size_t(size)), "cuMemAlloc")
        pointers.append(pointer.value)
    taken = before - free_memory()
    for pointer in pointers:
        check(cuda.cuMemFree_v2(C.c_uint64(pointer)), "cuMemFree")
    print(f"{count} x {size} bytes: free memory dropped {taken} bytes, {taken / count:.0f} per "
          f"allocation ({taken / count / size:.3f}x its size)")


def main():
    check(cuda.cuInit(0), "cuInit")
    device, context = C.c_int(), C.c_void_p()
    check(cuda.cuDeviceGet(C.byref(device), 0), "cuDeviceGet")
    check(cuda.cuDevicePrimaryCtxRetain(C.byref(context), device), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    pinned_on_device = AllocationProp(1, 0, 1, 0, None)
    for option, name in ((0, "minimum"), (1, "recommended")):
        granularity = C.c_size_t()
        check(cuda.cuMemGetAllocationGranularity(C.byref(granularity),
                                                 C.byref(pinned_on_device), option),
              "cuMemGetAllocationGranularity")
        print(f"granularity ({name}): {granularity.value} bytes")
    trial(MIB, 1)  # the context's first allocation, not counted below
    for size, count in ((4096, 64), (64 << 10, 64), (512 << 10, 16), (MIB, 16),
                        (2 * MIB + 12288, 16), (2 * MIB, 16), (3 * MIB, 16),
                        (4 * MIB + 4096, 16)):
        trial(size, count)


if __name__ == "__main__":
    main()
