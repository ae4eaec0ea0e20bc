"""Zero-copy views into numpy: __array_interface__ and DLPack."""

import unittest

import strata
from support import bf16_bits, skipped

try:
    import numpy as np
except ImportError:
    np = None

VALUES = [0.1, -2.5, 3.75, 1e-4, 1000.1, -0.3]


@unittest.skipIf(np is None, skipped("numpy not installed") if np is None else "")
class Numpy(unittest.TestCase):
    def setUp(self):
        self.ctx = strata.Context()
        self.weights = np.array(VALUES, dtype=np.float32).reshape(2, 3)

    def tearDown(self):
        self.ctx.close()

    def acquire(self, **tiers):
        group = self.ctx.group(f"g{len(tiers)}", strata.Tiers(**tiers))
        layer = group.register_host("l", {"w": self.weights, "ids": np.arange(4, dtype=np.int64)})
        return self.ctx.acquire(layer)

    def test_array_interface_is_zero_copy_and_read_only(self):
        with self.acquire() as views:
            array = np.asarray(views["w"])
            self.assertEqual(array.__array_interface__["data"][0], views["w"].data_ptr)
            self.assertFalse(array.flags.writeable)
            np.testing.assert_array_equal(array, self.weights)
            np.testing.assert_array_equal(np.asarray(views["ids"]), np.arange(4))

    def test_dlpack(self):
        with self.acquire(computation_dtype="f16") as views:
            array = np.from_dlpack(views["w"])
            self.assertEqual(array.dtype, np.float16)
            self.assertEqual(array.shape, (2, 3))
            self.assertFalse(array.flags.writeable)  # the versioned capsule's read-only flag
            np.testing.assert_array_equal(array, self.weights.astype(np.float16))
            del array

    def test_bf16_shows_its_bits_as_uint16(self):
        with self.acquire(computation_dtype="bf16") as views:
            bits = np.asarray(views["w"])
            self.assertEqual(bits.dtype, np.uint16)
            self.assertEqual(bits.ravel().tolist(), [bf16_bits(float(v))
                                                     for v in self.weights.ravel()])

    def test_fp8_is_refused_by_numpy_not_misread(self):
        with self.acquire(computation_dtype="f8_e4m3fn") as views:
            with self.assertRaises((BufferError, TypeError, RuntimeError)):
                np.from_dlpack(views["w"])


if __name__ == "__main__":
    unittest.main()
