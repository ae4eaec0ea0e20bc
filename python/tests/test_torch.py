"""strata.torch on the CPU device: managed modules compute what unmanaged ones do."""

import os
import tempfile
import unittest

import strata
from support import skipped, write_safetensors

try:
    import torch
    from torch import nn

    import strata.torch as st
except ImportError:
    torch = None


def needs_torch(cls):
    return unittest.skipIf(torch is None, skipped("torch not installed") if torch is None
                           else "")(cls)


if torch is not None:
    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.up = nn.Linear(width, 2 * width)
            self.down = nn.Linear(2 * width, width, bias=False)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    class Model(nn.Module):
        def __init__(self, width=16, depth=3):
            super().__init__()
            self.embed = nn.Embedding(32, width)
            self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.head = nn.Linear(width, 8)

        def forward(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            x = x + self.conv(x.unsqueeze(1)).mean(1)
            return self.head(x)


    class Norm(nn.Module):
        """A norm class no module_types list knows (as diffusers' and transformers' RMSNorm)."""

        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(width))

        def forward(self, x):
            return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) \
                * self.weight

    class Tied(nn.Module):
        """Tied input and output embeddings, a norm of its own class, a parameter of the root
        itself, and a Linear reached both inside a block and directly."""

        def __init__(self, width=16, vocab=32):
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.scale = nn.Parameter(torch.randn(width))
            self.blocks = nn.ModuleList(Block(width) for _ in range(2))
            self.shared = self.blocks[1].up   # one module, two owners' names
            self.norm = Norm(width)
            self.head = nn.Linear(width, vocab, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            x = self.embed(ids) * self.scale
            for block in self.blocks:
                x = block(x)
            x = x + self.shared(x)[..., :x.shape[-1]]
            x = x + self.blocks[0].down(torch.cat([x, x], -1))  # called from outside its block
            return self.head(self.norm(x))


def tied(dtype=None):
    torch.manual_seed(0)
    m = Tied().eval()
    return m.to(dtype) if dtype is not None else m


def model(dtype):
    torch.manual_seed(0)
    return Model().to(dtype).eval()


def safetensors_bytes(tensor):
    return tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()


IDS = [[1, 5, 7, 30], [2, 2, 0, 9]]


@needs_torch
class Torch(unittest.TestCase):
    def setUp(self):
        torch.set_grad_enabled(False)
        self.ids = torch.tensor(IDS)

    def test_streamed_under_a_small_budget_is_bit_identical(self):
        # bf16 weights computed in f32: every call converts, under a budget of a few layers.
        m = model(torch.bfloat16)
        reference = model(torch.bfloat16).float()
        expected = reference(self.ids)
        managed = st.enable_vram_management(m, vram_limit="3KiB", device="cpu",
                                            tiers=dict(computation_dtype=torch.float32))
        for _ in range(3):
            self.assertTrue(torch.equal(m(self.ids), expected))
        stats = managed.stats()
        self.assertEqual(stats.acquires, 3 * len(managed.layers))
        self.assertGreater(stats.evictions, 0)
        self.assertEqual(stats.vram_limit, 3 * 1024)

    def test_a_layer_refilled_at_other_addresses_computes_right(self):
        # The hooks reuse a layer's torch tensors while an acquire hands out the addresses they
        # are over; a layer evicted and filled again elsewhere must be imported afresh.
        m = model(torch.bfloat16)
        expected = model(torch.bfloat16).float()(self.ids)
        managed = st.enable_vram_management(m, vram_limit="3KiB", device="cpu",
                                            tiers=dict(computation_dtype=torch.float32))
        seen = {name: set() for name in managed.layers}
        for _ in range(4):
            self.assertTrue(torch.equal(m(self.ids), expected))
            for name, entry in managed.layers.items():
                seen[name].add(tuple(entry.addresses))
                # what the parameters get on the next call is over the addresses last handed out
                self.assertEqual([t.data_ptr() for _, t in entry.bound], entry.addresses)
        self.assertTrue(any(len(addresses) > 1 for addresses in seen.values()), seen)
        # Everything evicted, then filled again while other memory is held.
        managed.context.set_vram_limit(0)
        hold = [torch.empty(64, 64) for _ in range(16)]
        managed.context.set_vram_limit(None)
        for _ in range(2):
            self.assertTrue(torch.equal(m(self.ids), expected))
        del hold

    def test_a_call_after_its_context_closed_raises(self):
        m = model(torch.float32)
        ctx = strata.Context(compute_device="cpu")
        st.enable_vram_management(m, context=ctx, device="cpu")
        m(self.ids)
        ctx.close()
        with self.assertRaises(strata.InvalidHandleError):
            m(self.ids)
        self.assertEqual(m.embed.weight.stride(), (0, 0))  # no call holds its bytes

    def test_stored_dtype_computation_is_bit_identical(self):
        m = model(torch.bfloat16)
        expected = m(self.ids)
        managed = st.enable_vram_management(m, vram_limit="4KiB", device="cpu")
        self.assertTrue(torch.equal(m(self.ids), expected))
        # one layer per Linear/LayerNorm/Embedding/Conv2d
        self.assertEqual(len(managed.layers), 1 + 3 * 3 + 1 + 1)

    def test_bf16_storage_computes_on_rounded_weights(self):
        m = model(torch.float32)
        reference = model(torch.float32)
        for p in reference.parameters():
            p.data = p.data.to(torch.bfloat16).float()
        st.enable_vram_management(m, device="cpu",
                                  tiers=strata.Tiers(offload_dtype=torch.bfloat16,
                                                     computation_dtype=torch.float32))
        self.assertTrue(torch.equal(m(self.ids), reference(self.ids)))

    def test_whole_blocks_as_layers(self):
        m = model(torch.float32)
        expected = m(self.ids)
        managed = st.enable_vram_management(m, device="cpu", module_types=(Block, nn.Linear))
        # embed and conv, of no listed type, are each a layer of their own parameters
        self.assertEqual(sorted(managed.layers),
                         ["blocks.0", "blocks.1", "blocks.2", "conv", "embed", "head"])
        self.assertTrue(torch.equal(m(self.ids), expected))

    def test_checkpoint_into_a_meta_module(self):
        m = model(torch.bfloat16)
        expected = m(self.ids)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.safetensors")
            write_safetensors(path, {f"model.{k}": ("BF16", v.shape, safetensors_bytes(v))
                                     for k, v in m.state_dict().items()})
            with torch.device("meta"):
                empty = Model().to(torch.bfloat16).eval()
            managed = st.enable_vram_management(
                empty, device="cpu", checkpoint=path, checkpoint_prefix="model.",
                tiers=dict(offload_device="disk", onload_device="disk"), vram_limit="8KiB")
            self.assertTrue(torch.equal(empty(self.ids), expected))
            self.assertGreater(managed.stats().bytes_from_disk, 0)
            st.disable_vram_management(empty)
        self.assertEqual({p.device.type for p in empty.parameters()}, {"cpu"})
        self.assertTrue(torch.equal(empty(self.ids), expected))

    def test_two_models_over_one_store_share_one_host_copy(self):
        # As one model per GPU would: two contexts, one host copy read from the file once.
        m = model(torch.bfloat16)
        expected = m(self.ids)
        weights = {k: safetensors_bytes(v) for k, v in m.state_dict().items()}
        with tempfile.TemporaryDirectory() as tmp, strata.Store() as store:
            path = os.path.join(tmp, "model.safetensors")
            write_safetensors(path, {k: ("BF16", m.state_dict()[k].shape, data)
                                     for k, data in weights.items()})
            models, managed = [], []
            for _ in range(2):
                with torch.device("meta"):
                    models.append(Model().to(torch.bfloat16).eval())
                managed.append(st.enable_vram_management(models[-1], device="cpu",
                                                         checkpoint=path, store=store,
                                                         vram_limit="8KiB"))
            for _ in range(2):
                for empty in models:
                    self.assertTrue(torch.equal(empty(self.ids), expected))
            stats = store.stats()
            layers = len(managed[0].layers)
            self.assertEqual((stats.layers, stats.fills, stats.shared), (layers, layers, layers))
            # the first model read every weight once; the second none
            self.assertEqual([mm.stats().bytes_from_disk for mm in managed],
                             [sum(len(data) for data in weights.values()), 0])
            with self.assertRaises(ValueError):  # a store shares what a checkpoint holds
                st.enable_vram_management(model(torch.bfloat16), device="cpu", store=store)
            with strata.Context(compute_device="cpu") as ctx, self.assertRaises(ValueError):
                st.enable_vram_management(model(torch.bfloat16), device="cpu", context=ctx,
                                          checkpoint=path, store=store)
            for empty in models:
                st.disable_vram_management(empty)

    def test_release_on_exception_and_disable_restores(self):
        m = model(torch.float32)
        expected = m(self.ids)
        params = list(m.parameters())
        managed = st.enable_vram_management(m, device="cpu")
        with self.assertRaises((RuntimeError, IndexError)):
            m(torch.tensor([[99]]))  # out of the embedding's range
        self.assertTrue(all(not entry.leases for entry in managed.layers.values()))
        self.assertEqual(m.embed.weight.stride(), (0, 0))  # back to its placeholder
        self.assertTrue(torch.equal(m(self.ids), expected))
        st.disable_vram_management(m)
        self.assertEqual(list(m.parameters()), params)  # the same Parameter objects
        self.assertTrue(all(a is b for a, b in zip(m.parameters(), params)))
        self.assertTrue(torch.equal(m(self.ids), expected))
        with self.assertRaises(strata.InvalidHandleError):
            managed.stats()  # its context is gone

    def test_forward_is_wrapped_while_managed_and_given_back(self):
        m = model(torch.float32)
        expected = m(self.ids)
        x = torch.randn(2, 16)
        expected_head = m.head(x)
        own = m.conv.forward  # an instance `forward` set before management comes back
        m.conv.forward = own
        managed = st.enable_vram_management(m, device="cpu", vram_limit=0)
        # forward called directly, not through __call__, holds the layer too
        self.assertTrue(torch.equal(m.head.forward(x), expected_head))
        self.assertTrue(all(not entry.leases for entry in managed.layers.values()))
        self.assertEqual(m.head.weight.stride(), (0, 0))  # back to its placeholder
        st.disable_vram_management(m)
        self.assertNotIn("forward", m.head.__dict__)
        self.assertIs(m.conv.__dict__["forward"], own)
        self.assertTrue(torch.equal(m(self.ids), expected))

    def test_a_failed_enable_leaves_the_module_alone(self):
        m = model(torch.float32)
        m.head.to("meta")  # registered last, and impossible without a checkpoint
        with strata.Context() as ctx:
            with self.assertRaises(ValueError):
                st.enable_vram_management(m, context=ctx, device="cpu")
            with self.assertRaises(strata.NotFoundError):
                ctx.find_layer("model/embed")  # the group went with the failure
        self.assertNotIn("_strata_managed", m.__dict__)
        self.assertFalse(m.embed._forward_pre_hooks)
        self.assertTrue(torch.equal(m.embed.weight, model(torch.float32).embed.weight))

    def test_modules_reached_from_two_owners_compute_right(self):
        # blocks.1.up is also `shared`; blocks.0.down is called from outside its block.
        expected = tied()(self.ids)
        for module_types in (st.MODULE_TYPES, (Block, nn.Linear), (Block,)):
            for limit in (0, "2KiB", None):
                m = tied()
                managed = st.enable_vram_management(m, device="cpu", vram_limit=limit,
                                                    module_types=module_types)
                for _ in range(2):
                    self.assertTrue(torch.equal(m(self.ids), expected), (module_types, limit))
                self.assertTrue(all(not entry.leases for entry in managed.layers.values()))
                params = sum(len(entry.params) for entry in managed.layers.values())
                self.assertEqual(params, len(list(tied().parameters())))  # each once
                st.disable_vram_management(m)
                self.assertTrue(torch.equal(m(self.ids), expected))

    def test_tied_weights_load_under_whichever_name_the_checkpoint_holds(self):
        expected = tied()(self.ids)
        state = tied().state_dict()
        for kept, dropped in (("embed.weight", "head.weight"), ("head.weight", "embed.weight")):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.safetensors")
                write_safetensors(path, {k: ("F32", v.shape, safetensors_bytes(v))
                                         for k, v in state.items() if k != dropped})
                with torch.device("meta"):
                    empty = Tied().eval()
                managed = st.enable_vram_management(empty, device="cpu", checkpoint=path,
                                                    vram_limit="4KiB")
                self.assertIs(empty.head.weight, empty.embed.weight)
                # embed and head share their one tensor, so they are one layer
                self.assertIs(managed.layers["embed"], managed.layers.get("embed"))
                self.assertNotIn("head", managed.layers)
                self.assertEqual(list(managed.layers["embed"].params), [kept])
                self.assertTrue(torch.equal(empty(self.ids), expected), kept)
                # with a checkpoint and no tiers, the weights stream from disk
                self.assertGreater(managed.stats().bytes_from_disk, 0)
                st.disable_vram_management(empty)

    def test_unlisted_parameters_follow_the_computation_dtype(self):
        # An f32 model computing in bf16 with the default module_types: the Norm and the
        # root's own parameter are converted too, so the model computes as its bf16 copy.
        expected = tied(torch.bfloat16)(self.ids)
        m = tied()
        managed = st.enable_vram_management(m, device="cpu",
                                            tiers=dict(computation_dtype=torch.bfloat16))
        self.assertIn("norm", managed.layers)
        self.assertIn("", managed.layers)   # the root's own `scale`
        self.assertTrue(torch.equal(m(self.ids), expected))

    def test_two_threads_call_one_managed_model(self):
        import threading
        expected = tied()(self.ids)
        m = tied()
        managed = st.enable_vram_management(m, device="cpu", vram_limit="8KiB")
        wrong, failures = [], []

        def work():
            try:
                with torch.no_grad():
                    for _ in range(20):
                        if not torch.equal(m(self.ids), expected):
                            wrong.append(1)
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(failures, [])
        self.assertEqual(wrong, [])
        self.assertTrue(all(not entry.leases for entry in managed.layers.values()))

    def test_views_into_torch_dtypes(self):
        values = [0.1, -2.5, 3.75, 100.3]
        source = torch.tensor(values)
        with strata.Context() as ctx:
            for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
                group = ctx.group(str(dtype), strata.Tiers(computation_dtype=dtype))
                layer = group.register_host(f"l.{dtype}", {"w": ("f32", (4,), source.numpy())})
                with ctx.acquire(layer) as views:
                    got = torch.from_dlpack(views["w"])
                    self.assertEqual(got.dtype, dtype)
                    self.assertTrue(torch.equal(got.view(torch.uint8),
                                                source.to(dtype).view(torch.uint8)), dtype)

    def test_pipeline_moves_groups_like_diffsynth(self):
        pipe = st.Pipeline(vram_limit="64KiB", device="cpu")
        text, dit = model(torch.float32), model(torch.float32)
        expected = dit(self.ids)
        pipe.add("text_encoder", text, tiers=dict(computation_dtype="bf16"))
        pipe.add("dit", dit, tiers=dict(offload_dtype="bf16", computation_dtype="f32"))
        pipe.load_models_to_device(["text_encoder"])
        text(self.ids)
        self.assertEqual(pipe.stats().implicit_onloads, 0)
        pipe.load_models_to_device("dit")  # one name or a list
        self.assertTrue(torch.allclose(dit(self.ids), expected, atol=0.05))
        self.assertEqual(pipe.stats().implicit_onloads, 0)
        with self.assertRaises(KeyError):
            pipe.load_models_to_device(["vae"])


if __name__ == "__main__":
    unittest.main()
