"""The binding with the standard library only: conversions, errors, handles, leases, budgets."""

import array
import ctypes as C
import os
import struct
import tempfile
import unittest

import strata
from strata import _dlpack
from support import (bf16_bits, bf16_value, e4m3fn_round, f16_round, f32, skipped,
                     write_safetensors)

# Values that are not exact in bf16/f16/fp8, so rounding is exercised (ties included).
VALUES = f32([1 / 3, 3.14159265, -2.7e-5, 1.00390625, 1.01171875, 300.7, -0.0078125, 0.0,
              -1.5, 65.53, 1e-3, 7.0])


def f32_data(values):
    return array.array("f", values)


class Conversions(unittest.TestCase):
    def roundtrip(self, stored, computed, values=VALUES, **tiers):
        with strata.Context() as ctx:
            group = ctx.group("g", strata.Tiers(offload_dtype=stored,
                                                computation_dtype=computed, **tiers))
            layer = group.register_host("l", {"w": ("f32", (3, len(values) // 3),
                                                    f32_data(values))})
            with ctx.acquire(layer) as views:
                view = views["w"]
                self.assertEqual(view.dtype, strata.DType.parse(computed))
                self.assertEqual(view.shape, (3, len(values) // 3))
                return view.tobytes()

    def test_f32_bf16_f32_rounds_to_nearest_even(self):
        got = struct.unpack(f"{len(VALUES)}f", self.roundtrip("bf16", "f32"))
        self.assertEqual(list(got), [bf16_value(bf16_bits(v)) for v in VALUES])

    def test_bf16_computation_hands_out_the_bf16_bits(self):
        got = struct.unpack(f"<{len(VALUES)}H", self.roundtrip("f32", "bf16"))
        self.assertEqual(list(got), [bf16_bits(v) for v in VALUES])

    def test_f32_f16_f32(self):
        got = struct.unpack(f"{len(VALUES)}f", self.roundtrip("f16", "f32"))
        self.assertEqual(list(got), [f16_round(v) for v in VALUES])

    def test_f32_fp8_e4m3fn_f32_plain_cast(self):
        got = struct.unpack(f"{len(VALUES)}f",
                            self.roundtrip("f32", "f32", preparing_dtype="f8_e4m3fn"))
        self.assertEqual(list(got), [e4m3fn_round(v) for v in VALUES])

    def test_integers_pass_through(self):
        with strata.Context() as ctx:
            group = ctx.group("g", strata.Tiers(computation_dtype="bf16"))
            data = array.array("q", [-(2**62), -1, 0, 7])
            layer = group.register_host("l", {"ids": ("i64", (4,), data)})
            with ctx.acquire(layer) as views:
                self.assertEqual(views["ids"].dtype, strata.DType.I64)
                self.assertEqual(views["ids"].tobytes(), data.tobytes())

    def test_host_data_forms(self):
        values = [1.0, 2.0, 3.0, 4.0]
        raw = struct.pack("4f", *values)
        with strata.Context() as ctx:
            group = ctx.group("g")
            layers = [group.register_host(f"l{i}", {"w": ("f32", (2, 2), data)})
                      for i, data in enumerate([raw, bytearray(raw), memoryview(raw),
                                                f32_data(values)])]
            for layer in layers:
                with ctx.acquire(layer) as views:
                    self.assertEqual(views[0].tobytes(), raw)


class Errors(unittest.TestCase):
    def setUp(self):
        self.ctx = strata.Context()
        self.group = self.ctx.group("g")
        self.layer = self.group.register_host("l", {"w": ("f32", (2,), f32_data([1, 2]))})

    def tearDown(self):
        self.ctx.close()

    def test_errors_carry_status_and_library_message(self):
        with self.assertRaises(strata.NotFoundError) as caught:
            self.ctx.find_layer("missing")
        self.assertEqual(caught.exception.status, 4)
        self.assertEqual(caught.exception.status_name, "STRATA_ERR_NOT_FOUND")
        self.assertIn("missing", caught.exception.message)
        self.assertTrue(str(caught.exception).startswith("STRATA_ERR_NOT_FOUND: "))
        self.assertIsInstance(caught.exception, LookupError)
        self.assertEqual(strata.last_error(), caught.exception.message)

    def test_duplicate_layer_is_invalid_argument(self):
        with self.assertRaises(strata.InvalidArgumentError) as caught:
            self.group.register_host("l", {"w": ("f32", (2,), f32_data([1, 2]))})
        self.assertEqual(caught.exception.status_name, "STRATA_ERR_INVALID_ARGUMENT")

    def test_wrong_data_size_is_refused_before_the_call(self):
        with self.assertRaises(strata.InvalidArgumentError) as caught:
            self.group.register_host("m", {"w": ("f32", (3,), f32_data([1, 2]))})
        self.assertIn("8 bytes of data for shape [3]", str(caught.exception))

    def test_missing_checkpoint_names_the_file(self):
        with self.assertRaises(strata.Error) as caught:
            self.ctx.open_checkpoint("/nonexistent/model.safetensors")
        self.assertIn(caught.exception.status_name, ("STRATA_ERR_NOT_FOUND", "STRATA_ERR_IO"))
        self.assertIn("/nonexistent/model.safetensors", caught.exception.message)

    def test_cuda_without_a_driver_is_no_device(self):
        if os.path.exists("/dev/nvidiactl"):
            self.skipTest("a CUDA driver is present")
        with self.assertRaises(strata.NoDeviceError):
            strata.Context(compute_device="cuda")


class Handles(unittest.TestCase):
    def test_stale_layer_group_and_context(self):
        ctx = strata.Context()
        group = ctx.group("g")
        layer = group.register_host("l", {"w": ("f32", (1,), f32_data([1]))})
        layer.unregister()
        with self.assertRaises(strata.InvalidHandleError):
            ctx.acquire(layer)
        with self.assertRaises(strata.InvalidHandleError):
            layer.unregister()
        group.destroy()
        with self.assertRaises(strata.InvalidHandleError):
            group.onload()
        other = ctx.group("h").register_host("m", {"w": ("f32", (1,), f32_data([1]))})
        lease = ctx.acquire(other)
        ctx.close()
        with self.assertRaises(strata.InvalidHandleError):
            ctx.group("i")
        with self.assertRaises(strata.StateError):
            lease.views[0].tobytes()  # the context took the bytes with it
        ctx.close()  # idempotent


class Leases(unittest.TestCase):
    def setUp(self):
        self.ctx = strata.Context()
        self.group = self.ctx.group("g")
        self.layer = self.group.register_host("l", {"w": ("f32", (2,), f32_data([1, 2])),
                                                    "b": ("f32", (1,), f32_data([3]))})

    def tearDown(self):
        self.ctx.close()

    def test_views_by_name_and_position(self):
        with self.ctx.acquire(self.layer) as views:
            self.assertEqual(len(views), 2)
            self.assertEqual(set(views.keys()), {"w", "b"})
            self.assertIs(views[views[0].name], views[0])

    def test_views_refuse_access_after_release(self):
        with self.ctx.acquire(self.layer) as views:
            view = views["w"]
            self.assertTrue(view.data_ptr)
        for access in (lambda: view.data_ptr, view.tobytes, lambda: view.__array_interface__,
                       view.__dlpack__):
            with self.assertRaises(strata.StateError):
                access()
        self.assertIn("released", repr(view))

    def test_release_on_exception(self):
        with self.assertRaises(KeyError):
            with self.ctx.acquire(self.layer) as views:
                views["missing"]
        self.group.destroy()  # STRATA_ERR_STATE if the layer were still acquired

    def test_streams_from_torch_and_cupy_objects(self):
        # Ignored on the CPU device, but taken from the objects' attributes all the same.
        class TorchStream:
            cuda_stream = 0x1234

        class CupyStream:
            ptr = 0x5678

        for stream, pointer in ((None, None), (0x42, 0x42), (TorchStream(), 0x1234),
                                (CupyStream(), 0x5678)):
            with self.ctx.acquire(self.layer, stream=stream):
                pass
            self.assertEqual(strata._core._stream_pointer(stream), pointer)
        with self.assertRaises(TypeError):
            self.ctx.acquire(self.layer, stream="default")

    def test_double_release_is_state_error(self):
        lease = self.ctx.acquire(self.layer)
        lease.release()
        with self.assertRaises(strata.StateError):
            lease.release()

    def test_nested_acquires_are_counted(self):
        outer = self.ctx.acquire(self.layer)
        with self.ctx.acquire(self.layer):
            pass
        with self.assertRaises(strata.StateError):
            self.group.destroy()  # the outer use is still on
        outer.release()
        self.group.destroy()

    def test_unconsumed_capsules_are_retired_at_release(self):
        with self.ctx.acquire(self.layer) as views:
            capsule = views["w"].__dlpack__()
            self.assertEqual(views["w"].__dlpack_device__(), (1, 0))
            self.assertTrue(_dlpack._capsule_is_valid(capsule, b"dltensor"))
        # Nobody can consume it after release (its block is freed).
        self.assertFalse(_dlpack._capsule_is_valid(capsule, b"dltensor"))


class DLDevice(C.Structure):  # dlpack.h, written out here independently of the binding
    _fields_ = [("device_type", C.c_int32), ("device_id", C.c_int32)]


class DLDataType(C.Structure):
    _fields_ = [("code", C.c_uint8), ("bits", C.c_uint8), ("lanes", C.c_uint16)]


class DLTensor(C.Structure):
    _fields_ = [("data", C.c_void_p), ("device", DLDevice), ("ndim", C.c_int32),
                ("dtype", DLDataType), ("shape", C.POINTER(C.c_int64)),
                ("strides", C.POINTER(C.c_int64)), ("byte_offset", C.c_uint64)]


class DLManagedTensor(C.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", C.c_void_p), ("deleter", C.c_void_p)]


class DLManagedTensorVersioned(C.Structure):
    _fields_ = [("major", C.c_uint32), ("minor", C.c_uint32), ("manager_ctx", C.c_void_p),
                ("deleter", C.c_void_p), ("flags", C.c_uint64), ("dl_tensor", DLTensor)]


class DLPack(unittest.TestCase):
    def test_capsules_hold_the_structs_of_dlpack_h(self):
        get_pointer = C.pythonapi.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = C.c_void_p, [C.py_object, C.c_char_p]
        free = C.cast(_dlpack._free, C.c_void_p).value
        with strata.Context() as ctx:
            group = ctx.group("g", strata.Tiers(computation_dtype="bf16"))
            layer = group.register_host("l", {"w": ("f32", (2, 3, 4), f32_data([0] * 24))})
            with ctx.acquire(layer) as views:
                view = views["w"]
                for versioned in (False, True):
                    capsule = view.__dlpack__(max_version=(1, 0) if versioned else None)
                    name = b"dltensor_versioned" if versioned else b"dltensor"
                    struct_type = DLManagedTensorVersioned if versioned else DLManagedTensor
                    managed = struct_type.from_address(get_pointer(capsule, name))
                    tensor = managed.dl_tensor
                    self.assertEqual(tensor.data, view.data_ptr)
                    self.assertEqual((tensor.device.device_type, tensor.device.device_id), (1, 0))
                    self.assertEqual(tensor.ndim, 3)
                    self.assertEqual((tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes),
                                     (4, 16, 1))  # kDLBfloat
                    self.assertEqual(tensor.shape[:3], [2, 3, 4])
                    self.assertEqual(tensor.strides[:3], [12, 4, 1])
                    self.assertEqual(tensor.byte_offset, 0)
                    self.assertEqual(managed.deleter, free)
                    if versioned:
                        self.assertEqual((managed.major, managed.minor, managed.flags),
                                         (1, 1, 1))  # DLPACK_FLAG_BITMASK_READ_ONLY


class Budget(unittest.TestCase):
    LAYER_BYTES = 4096 * 4
    # On the CPU device a layer computed in its stored dtype is used in place; a conversion
    # makes strata hold a computation copy, which the budget counts.
    BF16 = strata.Tiers(computation_dtype="bf16")

    def run_layers(self, ctx, n, passes=2):
        group = ctx.group("g", self.BF16)
        layers = [group.register_host(f"l{i}", {"w": ("f32", (4096,), f32_data([i] * 4096))})
                  for i in range(n)]
        for _ in range(passes):
            for i, layer in enumerate(layers):
                with ctx.acquire(layer) as views:
                    self.assertEqual(views[0].tobytes()[:2], struct.pack("<H", bf16_bits(i)))
        return ctx.stats()

    def test_peak_stays_under_the_limit(self):
        limit = 3 * self.LAYER_BYTES
        with strata.Context(vram_limit=limit, prefetch_depth=0) as ctx:
            stats = self.run_layers(ctx, 8)
        self.assertEqual(stats.vram_limit, limit)
        self.assertLessEqual(stats.vram_peak, limit)
        self.assertEqual(stats.acquires, 16)
        self.assertGreater(stats.evictions, 0)
        self.assertEqual(stats.overcommit_peak, 0)
        self.assertEqual(stats.as_dict()["acquires"], 16)

    def test_unlimited_keeps_everything_resident(self):
        with strata.Context(prefetch_depth=0) as ctx:
            stats = self.run_layers(ctx, 4)
        self.assertEqual(stats.vram_limit, strata.UNLIMITED)
        self.assertEqual((stats.misses, stats.resident_hits), (4, 4))
        self.assertEqual(stats.evictions, 0)

    def test_a_layer_over_the_limit_overcommits_or_is_refused(self):
        with strata.Context(vram_limit="1KiB") as ctx:
            stats = self.run_layers(ctx, 1, passes=1)
            self.assertGreater(stats.overcommit_peak, 0)
        with strata.Context(vram_limit="1KiB", strict_budget=True) as ctx:
            layer = ctx.group("g", self.BF16).register_host("big", {"w": ("f32", (4096,),
                                                               f32_data([0] * 4096))})
            with self.assertRaises(strata.BudgetError):
                ctx.acquire(layer)

    def test_options_defaults_are_the_library_s(self):
        options = strata.Options()
        self.assertEqual(options.compute_device, strata.Device.CPU)
        self.assertEqual(options.vram_limit, strata.UNLIMITED)
        self.assertEqual(options.host_limit, strata.UNLIMITED)
        self.assertEqual(options.flags, 0)
        self.assertEqual(strata.Options(vram_limit="1.5GiB").vram_limit, 3 << 29)
        tiers = strata.Tiers()
        for tier in ("offload", "onload", "preparing", "computation"):
            self.assertEqual((getattr(tiers, tier).device, getattr(tiers, tier).dtype), (0, 0))
        self.assertEqual(tiers.quantization, strata.Quantization.NONE)

    def test_log_callback_hears_an_overcommit(self):
        messages = []
        with strata.Context(vram_limit="1KiB",
                            log=lambda level, message: messages.append((level, message)),
                            progress=lambda phase, done, total: None) as ctx:
            self.assertTrue(ctx.options.log_fn)
            self.run_layers(ctx, 1, passes=1)
            if ctx.options.library_struct_size < ctx.options.struct_size:
                skipped("log callback: this libstrata's strata_options has no log_fn yet")
                return
        self.assertIn(strata.LogLevel.WARN, [level for level, _ in messages], messages)

    def test_set_vram_limit(self):
        with strata.Context(prefetch_depth=0) as ctx:
            self.run_layers(ctx, 4, passes=1)
            try:
                ctx.set_vram_limit(self.LAYER_BYTES)
            except strata.UnsupportedError as error:
                skipped(f"set_vram_limit: {error.message}")
                return
            stats = ctx.stats()
            self.assertEqual(stats.vram_limit, self.LAYER_BYTES)
            self.assertLessEqual(stats.vram_in_use, self.LAYER_BYTES)


class Checkpoints(unittest.TestCase):
    def test_register_by_prefix_and_by_names(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.safetensors")
            tensors = {f"blocks.{i}.{part}": ("F32", (2,), struct.pack("2f", i, -i))
                       for i in range(3) for part in ("weight", "bias")}
            tensors["head.weight"] = ("BF16", (2,), struct.pack("<2H", bf16_bits(1.5),
                                                                bf16_bits(-2.0)))
            write_safetensors(path, tensors)
            with strata.Context() as ctx:
                disk = strata.Tiers(offload_device="disk", onload_device="disk",
                                    computation_dtype="f32")
                group = ctx.group("blocks", disk)
                with ctx.open_checkpoint(path) as ckpt:
                    self.assertEqual(group.register_checkpoint(ckpt, "blocks.", 2), 3)
                    head = ctx.group("head", disk).register_tensors(ckpt, "head",
                                                                    ["head.weight"])
                with self.assertRaises(strata.InvalidHandleError):
                    ckpt.handle
                with ctx.acquire(ctx.find_layer("blocks.2")) as views:
                    self.assertEqual(views["blocks.2.bias"].tobytes(), struct.pack("2f", 2, -2))
                with ctx.acquire(head) as views:
                    self.assertEqual(views[0].tobytes(), struct.pack("2f", 1.5, -2.0))
                self.assertGreater(ctx.stats().bytes_from_disk, 0)
                trace = os.path.join(tmp, "trace.json")
                ctx.trace_write(trace)
                self.assertGreater(os.path.getsize(trace), 0)


if __name__ == "__main__":
    unittest.main()
