"""strata.Store: one host copy shared by contexts of a process, and (named) by processes."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

import strata
from support import REPO, write_safetensors

BLOCKS, SIDE = 4, 64


def block_bytes(block):
    return bytes((block + at // SIDE + at % SIDE) % 251 for at in range(SIDE * SIDE))


def write_model(path):
    write_safetensors(path, {f"blocks.{i}.weight": ("U8", (SIDE, SIDE), block_bytes(i))
                             for i in range(BLOCKS)})


def context_over(store, path):
    """A CPU context over `store` with the model's blocks streamed through RAM from the file."""
    ctx = strata.Context(vram_limit=0, store=store)
    group = ctx.group("model", strata.Tiers(offload_device="disk", onload_device="cpu"))
    with ctx.open_checkpoint(path) as checkpoint:
        group.register_checkpoint(checkpoint, "blocks.", 2)
    return ctx


def read_block(ctx, block):
    """(address, bytes) of the block's weight, acquired and released."""
    with ctx.acquire(ctx.find_layer(f"blocks.{block}")) as views:
        weight = views[f"blocks.{block}.weight"]
        return weight.data_ptr, weight.tobytes()


# A process of the named-store test: attaches to the store, reads every block, reports.
CHILD = textwrap.dedent("""
    import json, sys
    import strata
    from test_store import BLOCKS, block_bytes, context_over, read_block
    name, path, directory = sys.argv[1:]
    store = strata.Store(name=name, checkpoint=path, dir=directory)
    with context_over(store, path) as ctx:
        exact = all(read_block(ctx, i)[1] == block_bytes(i) for i in range(BLOCKS))
        read = ctx.stats().bytes_from_disk
    print(json.dumps({"exact": exact, "created": store.created, "read": read}))
    store.close()
""")


class Store(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        self.path = os.path.join(self.dir.name, "model.safetensors")
        write_model(self.path)

    def test_two_contexts_over_one_store_read_and_hold_each_block_once(self):
        with strata.Store() as store:
            contexts = [context_over(store, self.path) for _ in range(2)]
            for i in range(BLOCKS):
                (first, got_first), (second, got_second) = (read_block(c, i) for c in contexts)
                self.assertEqual(got_first, block_bytes(i))
                self.assertEqual(got_second, block_bytes(i))
                self.assertEqual(first, second, "both contexts' views point into one copy")
            stats = store.stats()
            self.assertEqual((stats.created, stats.layers, stats.fills, stats.shared),
                             (1, BLOCKS, BLOCKS, BLOCKS))
            self.assertEqual(stats.bytes_filled, BLOCKS * SIDE * SIDE)
            self.assertGreaterEqual(stats.host_in_use, BLOCKS * SIDE * SIDE)
            self.assertEqual(sum(c.stats().bytes_from_disk for c in contexts),
                             BLOCKS * SIDE * SIDE)
            for c in contexts:
                c.close()

    def test_contexts_keep_the_store_after_its_handle_is_closed(self):
        store = strata.Store()
        ctx = strata.Context(vram_limit=0)
        ctx.attach_store(store)
        store.close()
        with self.assertRaises(strata.InvalidHandleError):
            store.stats()
        group = ctx.group("model", strata.Tiers(offload_device="disk", onload_device="cpu"))
        with ctx.open_checkpoint(self.path) as checkpoint:
            group.register_checkpoint(checkpoint, "blocks.", 2)
        self.assertEqual(read_block(ctx, 2)[1], block_bytes(2))
        ctx.close()

    def test_a_named_store_serves_two_processes(self):
        name = f"pytest-{os.getpid()}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO / "python"), str(REPO / "python" / "tests"),
             os.environ.get("PYTHONPATH", "")]))
        # This process creates the store and holds it, so both children attach to it and
        # race for the first fill of each block.
        with strata.Store(name=name, checkpoint=self.path, dir=self.dir.name) as store:
            self.assertTrue(store.created)
            children = [subprocess.Popen([sys.executable, "-c", CHILD, name, self.path,
                                          self.dir.name], env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
                        for _ in range(2)]
            reports = []
            for child in children:
                out, err = child.communicate(timeout=120)
                self.assertEqual(child.returncode, 0, err)
                reports.append(json.loads(out.strip().splitlines()[-1]))
            for report in reports:
                self.assertEqual(report, dict(report, exact=True, created=False))
            self.assertEqual(sum(r["read"] for r in reports), BLOCKS * SIDE * SIDE,
                             "each block read from disk once, by one process")
            stats = store.stats()
            self.assertEqual((stats.layers, stats.fills, stats.takeovers), (BLOCKS, BLOCKS, 0))
            self.assertIn(f"strata-{name}", os.listdir(self.dir.name))
        self.assertNotIn(f"strata-{name}", os.listdir(self.dir.name),
                         "the last process out removes the store")

    def test_bad_arguments_raise(self):
        d, path = self.dir.name, self.path
        for kwargs in (dict(name="../escape", checkpoint=path, dir=d),
                       dict(name="no-checkpoint", dir=d),
                       dict(mode=0o4777)):
            with self.subTest(**kwargs), self.assertRaises(strata.InvalidArgumentError):
                strata.Store(**kwargs)
        with self.assertRaises(strata.NotFoundError):
            strata.Store(name="missing", checkpoint=os.path.join(d, "missing"), dir=d)
        with self.assertRaises(ValueError):
            strata.Store(host_limit="lots")
        other = os.path.join(d, "other.safetensors")
        write_safetensors(other, {"x": ("U8", (4,), b"abcd")})
        with strata.Store(name="taken", checkpoint=path, dir=d):
            with self.assertRaises(strata.StateError):
                strata.Store(name="taken", checkpoint=other, dir=d)

        store = strata.Store()
        with strata.Context() as ctx:
            ctx.attach_store(store)
            with self.assertRaises(strata.StateError):
                ctx.attach_store(store)
            with self.assertRaises(TypeError):
                ctx.attach_store("store")
        store.close()
        with self.assertRaises(strata.InvalidHandleError):
            strata.Context(store=store)
        with self.assertRaises(strata.InvalidHandleError):
            store.stats()

    def test_a_layer_beyond_the_store_s_host_limit_is_a_budget_error(self):
        with strata.Store(host_limit=SIDE * SIDE - 1) as store, \
                context_over(store, self.path) as ctx:
            with self.assertRaises(strata.BudgetError):
                ctx.acquire(ctx.find_layer("blocks.0"))
            self.assertEqual(store.stats().layers, 0)


if __name__ == "__main__":
    unittest.main()
