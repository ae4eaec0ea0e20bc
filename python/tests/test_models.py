"""strata.torch on model classes nobody here wrote: a diffusers DiT (QwenImageTransformer2DModel)
and VAE decode (AutoencoderKL), a transformers LlamaForCausalLM with generate(). Small configs,
random weights, no downloads, the CPU. Managed runs are bit-identical to unmanaged ones in the
stored dtype at vram_limit 0, half the model and unlimited, also streamed from a safetensors
checkpoint onto a model built by accelerate.init_empty_weights(); fp8 storage matches torch's
own fp8 round trip; disable_vram_management gives the unmanaged model back."""

import os
import tempfile
import unittest

from support import skipped

try:
    import torch

    import strata.torch as st
except ImportError:
    torch = None
try:
    import accelerate
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except ImportError:
    diffusers = None


def needs_the_libraries(cls):
    missing = torch is None or diffusers is None
    return unittest.skipIf(missing, skipped("torch, diffusers, transformers or accelerate not "
                                            "installed") if missing else "")(cls)


def llama_config():
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=None, bos_token_id=None)


def qwen_config():
    return dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))


def vae_config():
    return dict(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                layers_per_block=1)


def built(make, dtype=torch.bfloat16 if torch is not None else None):
    torch.manual_seed(0)
    return make().to(dtype).eval()


def model_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


@needs_the_libraries
class Models(unittest.TestCase):
    def setUp(self):
        torch.set_grad_enabled(False)
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 64, (1, 6), generator=generator)
        self.hidden = torch.randn(1, 16, 16, generator=generator).to(torch.bfloat16)
        self.text = torch.randn(1, 5, 32, generator=generator).to(torch.bfloat16)
        self.latents = torch.randn(1, 4, 4, 4, generator=generator).to(torch.bfloat16)
        self.cases = {
            "llama": (lambda: transformers.LlamaForCausalLM(llama_config()), self.llama),
            "qwen-image": (lambda: diffusers.QwenImageTransformer2DModel(**qwen_config()),
                           self.dit),
            "vae": (lambda: diffusers.AutoencoderKL(**vae_config()), self.vae),
        }

    def llama(self, m):
        logits = m(self.ids).logits
        tokens = m.generate(self.ids, max_new_tokens=4, do_sample=False)
        return logits, tokens

    def dit(self, m):
        return m(hidden_states=self.hidden, encoder_hidden_states=self.text,
                 encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.bool),
                 timestep=torch.tensor([0.5]).to(torch.bfloat16), img_shapes=[(1, 4, 4)],
                 return_dict=False)[0]

    def vae(self, m):
        return m.decode(self.latents, return_dict=False)[0]

    def same(self, got, expected, what):
        if isinstance(expected, tuple):
            for g, e in zip(got, expected):
                self.same(g, e, what)
        else:
            self.assertTrue(torch.equal(got, expected), what)

    def test_bit_identical_at_every_budget_and_restored(self):
        for name, (make, run) in self.cases.items():
            expected = run(built(make))
            for limit in (0, model_bytes(built(make)) // 2, None):
                m = built(make)
                managed = st.enable_vram_management(m, device="cpu", vram_limit=limit)
                self.same(run(m), expected, (name, limit))
                self.assertTrue(all(not entry.leases for entry in managed.layers.values()))
                st.disable_vram_management(m)
                self.same(run(m), expected, (name, limit, "disabled"))
                self.assertFalse(any(p.stride() and 0 in p.stride()
                                     for p in m.parameters() if p.dim()), name)

    def test_streamed_from_a_checkpoint_onto_empty_weights(self):
        for name, (make, run) in self.cases.items():
            reference = built(make)
            expected = run(reference)
            with tempfile.TemporaryDirectory() as tmp:
                # save_pretrained keeps one name of the tied embedding pair
                reference.save_pretrained(tmp)
                with accelerate.init_empty_weights():
                    empty = make().to(torch.bfloat16).eval()
                if hasattr(empty, "tie_weights"):
                    empty.tie_weights()  # as accelerate's big-model loading does
                self.assertEqual(next(empty.parameters()).device.type, "meta")
                managed = st.enable_vram_management(
                    empty, device="cpu", checkpoint=tmp, vram_limit=model_bytes(reference) // 4)
                self.same(run(empty), expected, name)
                self.assertGreater(managed.stats().bytes_from_disk, 0, name)
                st.disable_vram_management(empty)

    def test_fp8_matches_torch_round_trip(self):
        make, run = self.cases["llama"]
        for quantization in ("none", "per_channel"):
            reference = built(make)
            for p in reference.parameters():
                p.data = round_trip(p.data, quantization)
            expected = run(reference)
            m = built(make)
            st.enable_vram_management(m, device="cpu", vram_limit=model_bytes(m) // 4,
                                      tiers=dict(offload_dtype=torch.float8_e4m3fn,
                                                 computation_dtype=torch.bfloat16,
                                                 quantization=quantization))
            self.same(run(m), expected, quantization)


def round_trip(weight, quantization):
    """torch's own fp8 e4m3fn round trip of a bf16 weight: a plain cast, or per output channel
    scaled by its largest finite |value| / 448 (in f32), dequantized as value * scale."""
    if quantization == "none":
        return weight.to(torch.float8_e4m3fn).to(weight.dtype)
    rows = weight.float().reshape(weight.shape[0] if weight.dim() > 1 else 1, -1)
    absmax = rows.abs().where(rows.isfinite(), 0).amax(1, keepdim=True)
    scale = absmax / 448
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = (rows / scale).to(torch.float8_e4m3fn)
    return (codes.float() * scale).to(weight.dtype).reshape(weight.shape)


if __name__ == "__main__":
    unittest.main()
