"""The binding on a CUDA device: views in device memory, streams given as handles or as torch /
cupy stream objects, DLPack's device and stream rules, a destroyed stream. Runs wherever a CUDA
driver loads (on a GPU; in CI, tests/python.rs runs it against tests/gpu/emulated_driver.cpp)
and skips elsewhere. Bytes are read back with the driver API through ctypes: no torch needed."""

import array
import ctypes as C
import os
import signal
import struct
import subprocess
import sys
import tempfile
import unittest

import strata
from support import bf16_bits, skipped, write_safetensors

VALUES = [1 / 3, 3.14159265, -2.7e-5, 1.00390625, 300.7, -0.0078125, 0.0, -1.5]


def open_driver():
    for name in ("libcuda.so", "libcuda.so.1"):
        try:
            return C.CDLL(name)
        except OSError:
            continue
    return None


class Driver:
    """Device 0's primary context, current on this thread, and the few calls the tests need."""

    def __init__(self, lib):
        self.lib = lib
        lib.cuMemcpyDtoH_v2.argtypes = [C.c_void_p, C.c_uint64, C.c_size_t]
        lib.cuStreamSynchronize.argtypes = [C.c_void_p]
        lib.cuStreamDestroy_v2.argtypes = [C.c_void_p]
        lib.cuCtxSetCurrent.argtypes = [C.c_void_p]
        self.check(lib.cuInit(0), "cuInit")
        self.device = C.c_int()
        self.check(lib.cuDeviceGet(C.byref(self.device), 0), "cuDeviceGet")
        self.context = C.c_void_p()
        self.check(lib.cuDevicePrimaryCtxRetain(C.byref(self.context), self.device),
                   "cuDevicePrimaryCtxRetain")
        self.check(lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    @staticmethod
    def check(result, what):
        if result != 0:
            raise AssertionError(f"{what} failed: CUresult {result}")

    def close(self):
        self.lib.cuDevicePrimaryCtxRelease_v2(self.device)

    def read(self, view):
        """The view's bytes, copied on the legacy default stream (which a NULL acquire made wait
        for them)."""
        out = (C.c_char * view.nbytes)()
        self.check(self.lib.cuMemcpyDtoH_v2(out, view.data_ptr, view.nbytes), "cuMemcpyDtoH")
        return bytes(out)

    def stream(self):
        stream = C.c_void_p()
        self.check(self.lib.cuStreamCreate(C.byref(stream), 1), "cuStreamCreate")  # non-blocking
        return stream.value

    def synchronize(self, stream):
        self.check(self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def destroy(self, stream):
        self.check(self.lib.cuStreamDestroy_v2(stream), "cuStreamDestroy")


def bf16_bytes(values):
    return b"".join(struct.pack("<H", bf16_bits(v)) for v in values)


class CudaViews(unittest.TestCase):
    def setUp(self):
        lib = open_driver()
        if lib is None:
            self.skipTest(skipped("the binding on CUDA: no CUDA driver (libcuda) on this machine"))
        try:
            self.ctx = strata.Context(compute_device="cuda")
        except strata.NoDeviceError as e:
            self.skipTest(skipped(f"the binding on CUDA: {e.message}"))
        self.driver = Driver(lib)
        group = self.ctx.group("g", strata.Tiers(computation_dtype="bf16"))
        self.layer = group.register_host("l", {"w": ("f32", (2, 4), array.array("f", VALUES))})

    def tearDown(self):
        self.ctx.close()
        self.driver.close()

    def ran_in_a_child_on_a_real_driver(self):
        """On a real driver, runs this test in a child process of its own, checks how it ended
        and returns True; False in that child and on the emulated driver, where the test runs
        here. For tests that hand the driver a destroyed handle: to a real driver that is a freed
        pointer. The emulated driver refuses it, and there the whole contract is checked; a real
        one may crash on it (driver 580.159.04 on an H200 does, with SIGSEGV), as the README
        warns. So the child must pass or end on SIGSEGV; any other ending fails this test."""
        emulated = hasattr(self.driver.lib, "strata_emulated_cuda_counts")
        if emulated or os.environ.get("STRATA_TEST_ISOLATED"):
            return False
        # Same working directory (relative paths in PYTHONPATH and STRATA_LIBRARY stay right),
        # with this folder on the path for the test module and its support module.
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        child = subprocess.run(
            [sys.executable, "-m", "unittest", f"test_cuda.CudaViews.{self._testMethodName}"],
            env={**os.environ, "STRATA_TEST_ISOLATED": "1", "PYTHONPATH": path},
            capture_output=True, text=True, timeout=600, check=False)
        if child.returncode == -signal.SIGSEGV:
            print(f"{self._testMethodName}: this driver crashed (SIGSEGV) on the destroyed "
                  f"handle, as the README warns", file=sys.stderr)
            return True
        self.assertEqual(
            child.returncode, 0,
            f"{self._testMethodName}, run alone on the real driver, neither passed nor ended on "
            f"the driver's SIGSEGV (a negative status is the signal that ended it):\n"
            f"{child.stdout}\n{child.stderr}")
        return True

    def test_views_are_device_memory_holding_the_conversions_bytes(self):
        with self.ctx.acquire(self.layer) as views:
            view = views["w"]
            self.assertEqual(view.device, strata.Device.CUDA)
            self.assertEqual(view.dtype, strata.DType.BF16)
            self.assertEqual(view.__dlpack_device__(), (2, 0))  # kDLCUDA, ordinal 0
            self.assertEqual(self.driver.read(view), bf16_bytes(VALUES))
            for host_only in (view.tobytes, lambda: view.__array_interface__):
                with self.assertRaises(BufferError):
                    host_only()
        self.assertGreater(self.ctx.stats().bytes_to_device, 0)

    def test_dlpack_consumers_must_use_the_acquire_stream(self):
        stream = self.driver.stream()
        try:
            with self.ctx.acquire(self.layer, stream=stream) as views:
                view = views["w"]
                view.__dlpack__(stream=stream)
                view.__dlpack__(stream=-1)  # the consumer synchronises itself
                for other in (None, 1, stream + 8):
                    with self.assertRaises(BufferError):
                        view.__dlpack__(stream=other)
            self.driver.synchronize(stream)
        finally:
            self.driver.destroy(stream)

    def test_torch_and_cupy_stream_objects_are_used_as_their_handles(self):
        stream = self.driver.stream()

        class TorchStream:
            cuda_stream = stream

        class CupyStream:
            ptr = stream

        try:
            for wrapper in (TorchStream(), CupyStream()):
                with self.ctx.acquire(self.layer, stream=wrapper) as views:
                    views["w"].__dlpack__(stream=stream)
            self.driver.synchronize(stream)
        finally:
            self.driver.destroy(stream)

    def test_a_destroyed_stream_is_invalid_argument_and_nothing_is_held(self):
        if self.ran_in_a_child_on_a_real_driver():
            return
        stream = self.driver.stream()
        self.driver.destroy(stream)
        with self.assertRaises(strata.InvalidArgumentError) as caught:
            self.ctx.acquire(self.layer, stream=stream)
        self.assertIn("not a live CUDA stream", caught.exception.message)
        self.assertEqual(self.ctx.stats().vram_in_use, 0)
        with self.ctx.acquire(self.layer) as views:
            self.assertEqual(self.driver.read(views["w"]), bf16_bytes(VALUES))

    def test_two_contexts_over_one_store_stream_exact_bytes_from_one_host_copy(self):
        blocks = {f"blocks.{i}.weight": bytes((7 * i + at) % 251 for at in range(4096))
                  for i in range(3)}
        with tempfile.TemporaryDirectory() as tmp, strata.Store() as store:
            path = os.path.join(tmp, "model.safetensors")
            write_safetensors(path, {name: ("U8", (64, 64), data)
                                     for name, data in blocks.items()})
            # Room on the device for two of the three blocks: every pass evicts and uploads
            # again from the store's copy.
            contexts = [strata.Context(compute_device="cuda", vram_limit=2 * 4096, store=store)
                        for _ in range(2)]
            try:
                for ctx in contexts:
                    group = ctx.group("model", strata.Tiers(offload_device="disk",
                                                            onload_device="cpu"))
                    with ctx.open_checkpoint(path) as checkpoint:
                        group.register_checkpoint(checkpoint, "blocks.", 2)
                for _ in range(2):
                    for name, data in blocks.items():
                        for ctx in contexts:
                            with ctx.acquire(ctx.find_layer(name.rsplit(".", 1)[0])) as views:
                                self.assertEqual(self.driver.read(views[name]), data)
                stats = store.stats()
                self.assertEqual((stats.layers, stats.fills), (len(blocks), len(blocks)))
                self.assertEqual(sum(c.stats().bytes_from_disk for c in contexts), 3 * 4096)
                self.assertTrue(all(c.stats().evictions > 0 for c in contexts))
            finally:
                for ctx in contexts:
                    ctx.close()


if __name__ == "__main__":
    unittest.main()
