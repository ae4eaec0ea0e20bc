"""strata against its peers on the CPU: one diffusers QwenImageTransformer2DModel (bf16, random
weights from its config) saved as safetensors, then run through each configuration in a fresh
process, each paired with an unmanaged run just before and just after it:

    python3 python/benchmarks/cpu_peers.py                 # 4 blocks (~0.3 GiB), 5 forwards each
    python3 python/benchmarks/cpu_peers.py --layers 32     # ~1.7 GiB, the size of issue 22
    python3 python/benchmarks/cpu_peers.py --small --steps 2   # seconds (the test's mode)

Per configuration: median seconds per forward, its ratio to the mean of the two unmanaged runs
around it, the median CPU seconds (user + system, all threads) and minor page faults per forward
(CPU seconds vary less than wall time with other load on the machine), peak RSS of its process
(VmHWM, so it includes torch's own), and whether its output equals the unmanaged one bit for bit
(fp8 storage is compared by max |diff| instead). On a machine other work keeps busy, torch's
threads wait on each other at every barrier: OMP_NUM_THREADS=1 gives steadier figures.
Needs torch, diffusers, accelerate; prints "cpu_peers: OK" when every exact configuration matched.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "unmanaged": "unmanaged, all in RAM",
    "strata-disk-0": "strata, disk tiers, vram_limit 0",
    "strata-disk-25": "strata, disk tiers, 25% of the model",
    "strata-ram": "strata, default tiers (RAM, in place)",
    "strata-fp8": "strata, fp8 in RAM, bf16 compute",
    "accelerate-disk": "accelerate disk_offload",
    "diffusers-block": "diffusers group offloading, block level, to disk",
    "diffusers-leaf": "diffusers group offloading, leaf level, to disk",
}
EXACT = {"unmanaged", "strata-disk-0", "strata-disk-25", "strata-ram", "accelerate-disk",
         "diffusers-block", "diffusers-leaf"}


def config(small, layers):
    if small:
        return dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                    axes_dims_rope=(4, 6, 6))
    return dict(patch_size=2, in_channels=64, out_channels=16, num_layers=layers,
                attention_head_dim=128, num_attention_heads=8, joint_attention_dim=1024,
                axes_dims_rope=(16, 56, 56))


def inputs(small):
    import torch
    g = torch.Generator().manual_seed(1)
    side, text, channels, joint = (4, 5, 16, 32) if small else (16, 32, 64, 1024)
    return dict(hidden_states=torch.randn(1, side * side, channels, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(1, text, joint, generator=g).bfloat16(),
                encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.bool),
                timestep=torch.tensor([0.5]).bfloat16(), img_shapes=[(1, side, side)],
                return_dict=False)


def quiet(diffusers):
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def save(folder, small, layers):
    import diffusers
    import torch
    quiet(diffusers)
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(**config(small, layers)).bfloat16().eval()
    model.save_pretrained(folder)
    with torch.no_grad():
        torch.save(model(**inputs(small))[0], os.path.join(folder, "expected.pt"))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_one(name, folder, small, layers, steps, model_bytes):
    """One configuration in this (fresh) process: a JSON line of its figures."""
    import accelerate
    import diffusers
    import torch
    quiet(diffusers)
    torch.set_grad_enabled(False)
    checkpoint = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if name.startswith("strata-disk"):
        import strata.torch as st
        with accelerate.init_empty_weights():
            model = diffusers.QwenImageTransformer2DModel(**config(small, layers)).bfloat16()
            model = model.eval()
        limit = 0 if name == "strata-disk-0" else model_bytes // 4
        st.enable_vram_management(model, device="cpu", checkpoint=checkpoint, vram_limit=limit)
    else:
        model = diffusers.QwenImageTransformer2DModel.from_pretrained(
            folder, torch_dtype=torch.bfloat16).eval()
        offload = os.path.join(folder, f"offload-{name}-{os.getpid()}")
        if name == "strata-ram":
            import strata.torch as st
            st.enable_vram_management(model, device="cpu")
        elif name == "strata-fp8":
            import strata.torch as st
            st.enable_vram_management(model, device="cpu",
                                      tiers=dict(offload_dtype=torch.float8_e4m3fn,
                                                 computation_dtype=torch.bfloat16))
        elif name == "accelerate-disk":
            accelerate.disk_offload(model, offload, execution_device=torch.device("cpu"))
        elif name.startswith("diffusers"):
            level = "block_level" if name == "diffusers-block" else "leaf_level"
            model.enable_group_offload(torch.device("cpu"), offload_type=level,
                                       num_blocks_per_group=1 if level == "block_level" else None,
                                       offload_to_disk_path=offload)
    args = inputs(small)
    times, cpu, faults, out = [], [], [], None
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        out = model(**args)[0]
        times.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        faults.append(after.ru_minflt - before.ru_minflt)
    expected = torch.load(os.path.join(folder, "expected.pt"))
    diff = (out.float() - expected.float()).abs().max().item()
    peak = peak_rss_mib()
    print(json.dumps(dict(name=name, median=statistics.median(times),
                          cpu=statistics.median(cpu), faults=statistics.median(faults),
                          peak_mib=peak,
                          identical=bool(torch.equal(out, expected)), max_diff=diff)))


def peak_rss_mib():
    """This process's peak RSS. Not ru_maxrss: Linux carries that over exec from the parent
    that forked this process, which holds the whole model."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(name, folder, args, model_bytes):
    command = [sys.executable, os.path.abspath(__file__), "--run", name, "--dir", folder,
               "--steps", str(args.steps), "--layers", str(args.layers),
               "--model-bytes", str(model_bytes)]
    if args.small:
        command.append("--small")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--configs", default=",".join(c for c in CONFIGS if c != "unmanaged"))
    parser.add_argument("--run")
    parser.add_argument("--dir")
    parser.add_argument("--model-bytes", type=int)
    args = parser.parse_args()
    if args.run:
        return run_one(args.run, args.dir, args.small, args.layers, args.steps,
                       args.model_bytes)
    try:
        import accelerate  # noqa: F401
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        print(f"SKIPPED: cpu_peers needs torch, diffusers and accelerate ({e})")
        return
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        model_bytes = save(folder, args.small, args.layers)
        print(f"QwenImageTransformer2DModel, {model_bytes / 2**20:.1f} MiB bf16, "
              f"{args.steps} forwards per run, the CPU ({os.cpu_count()} cores)")
        print(f"{'configuration':52} {'s/forward':>10} {'x unmanaged':>12} {'CPU-s':>6} "
              f"{'faults':>7} {'peak RSS':>10}  output")
        before = child("unmanaged", folder, args, model_bytes)
        for name in args.configs.split(","):
            measured = child(name, folder, args, model_bytes)
            after = child("unmanaged", folder, args, model_bytes)
            ratio = measured["median"] / ((before["median"] + after["median"]) / 2)
            if name in EXACT:
                verdict = "identical" if measured["identical"] else "DIFFERS"
                ok &= measured["identical"]
            else:
                verdict = f"max |diff| {measured['max_diff']:.3g}"
            print(f"{CONFIGS[name]:52} {measured['median']:10.4f} {ratio:12.2f} "
                  f"{measured['cpu']:6.2f} {measured['faults']:7.0f} "
                  f"{measured['peak_mib']:8.0f} MiB  {verdict}", flush=True)
            before = after
        print(f"{CONFIGS['unmanaged']:52} {before['median']:10.4f} {1.0:12.2f} "
              f"{before['cpu']:6.2f} {before['faults']:7.0f} "
              f"{before['peak_mib']:8.0f} MiB  identical")
    if not ok:
        raise SystemExit("cpu_peers: an exact configuration's output differs")
    print("cpu_peers: OK")


if __name__ == "__main__":
    main()
