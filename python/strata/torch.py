"""PyTorch integration: strata holds the parameters of chosen submodules and hands them to
each forward call.

    import strata.torch
    strata.torch.enable_vram_management(model, vram_limit="8GiB")
    model(x)                          # each managed submodule acquires its layer, runs, releases

Each submodule of one of `module_types` becomes one strata layer holding all its parameters
(a whole transformer block when its class is listed). A module whose forward reads its
children's parameters without calling them (nn.TransformerEncoderLayer's fast path) must be
listed itself, or those children hold placeholders when it runs.

A forward pre-hook acquires the layer on torch's current stream and points the parameters at
strata's bytes (zero-copy, through DLPack); a forward hook releases it again, also when
forward raises. Between calls each
parameter is a one-element placeholder expanded to its shape: its bytes live in strata.
Inference only: autograd must not keep the weights past the call.
"""

import torch
from torch import nn

from . import _core
from ._lib import DType

_TORCH_DTYPES = {torch.float32: DType.F32, torch.float16: DType.F16, torch.bfloat16: DType.BF16,
                 torch.float64: DType.F64, torch.int64: DType.I64, torch.int32: DType.I32,
                 torch.int16: DType.I16, torch.int8: DType.I8, torch.uint8: DType.U8,
                 torch.bool: DType.BOOL}
for _name, _dtype in (("float8_e4m3fn", DType.F8_E4M3FN), ("float8_e5m2", DType.F8_E5M2)):
    if hasattr(torch, _name):
        _TORCH_DTYPES[getattr(torch, _name)] = _dtype

# MultiheadAttention reads its out_proj's weight without calling it, so it is one layer.
MODULE_TYPES = tuple(getattr(nn, name) for name in (
    "MultiheadAttention", "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
    "ConvTranspose2d", "ConvTranspose3d", "Embedding", "LayerNorm", "GroupNorm", "RMSNorm")
    if hasattr(nn, name))


def _default_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _context_for(device, vram_limit, prefetch_depth):
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _core.Context(compute_device="cuda", device_index=index, vram_limit=vram_limit,
                             prefetch_depth=prefetch_depth)
    if device.type != "cpu":
        raise ValueError(f"strata computes on cpu or cuda, not {device}")
    return _core.Context(compute_device="cpu", vram_limit=vram_limit,
                         prefetch_depth=prefetch_depth)


class _Layer:
    """One managed submodule: its strata layer and the parameters its tensors feed."""

    def __init__(self, layer, params):
        self.layer = layer
        self.params = params  # strata tensor name -> (Parameter, original device, placeholder)
        self.leases = []      # a stack: a module may be re-entered (recursion, shared blocks)
        # strata tensor name -> ((address, shape, dtype), torch tensor over it). A resident
        # layer comes back at the same address with the same bytes, so its tensors are reused
        # instead of imported again (DLPack through ctypes costs tens of microseconds). They
        # are only ever handed out while a new acquire vouches for that address.
        self.tensors = {}


class ManagedModule:
    """What enable_vram_management did to a module: its context, group and layers."""

    def __init__(self, module, context, group, device, owns_context):
        self.module, self.context, self.group = module, context, group
        self.device, self.owns_context = device, owns_context
        self.layers = {}
        self.hooks = []

    def stats(self):
        return self.context.stats()

    def onload(self):
        self.group.onload()

    def offload(self):
        self.group.offload()

    def _stream(self):
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _pre_hook(self, entry):
        def pre(module, args):
            lease = self.context.acquire(entry.layer, stream=self._stream())
            entry.leases.append(lease)
            for view in lease.views:
                key = (view.data_ptr, view.shape, view.dtype)
                cached = entry.tensors.get(view.name)
                if cached is None or cached[0] != key:
                    cached = entry.tensors[view.name] = (key, torch.from_dlpack(view))
                entry.params[view.name][0].data = cached[1]
        return pre

    def _post_hook(self, entry):
        def post(module, args, output):
            # always_call: this also runs when forward (or the pre-hook) raised.
            if not entry.leases:
                return
            lease = entry.leases.pop()
            if not entry.leases:
                for param, _, placeholder in entry.params.values():
                    param.data = placeholder
            lease.release()
        return post


def _matching_modules(module, module_types):
    """(qualified name, submodule) of the outermost submodules of `module_types`."""
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, module_types) and not any(
                name == p or name.startswith(p + ".") if p else True for p, _ in found):
            found.append((name, sub))
    return found


def enable_vram_management(module, vram_limit=None, tiers=None, module_types=MODULE_TYPES,
                           checkpoint=None, checkpoint_prefix="", device=None, context=None,
                           group_name="model", prefetch_depth=None):
    """Hands the parameters of `module`'s submodules of `module_types` to strata.

    vram_limit: bytes or "8GiB" on the compute device (None: unlimited); belongs to the
      context, so give it only when strata creates the context (not with `context=`).
    tiers: a strata.Tiers or a dict of its keywords (DiffSynth's names: offload_dtype,
      computation_dtype=torch.bfloat16, ...); None keeps the stored dtype, computes in place.
    checkpoint: a .safetensors file, index or shard directory holding the weights under the
      module's own names (after `checkpoint_prefix`): layers are registered from the file, so
      there is no host copy of the module's tensors and the module may be on the meta device.
      Without it, the module's tensors are copied into strata and then freed.
    device: the compute device (default: the current CUDA device, else the CPU).
    context: a strata.Context to share (a Pipeline does); else one is created.
    Returns the ManagedModule (also at module._strata_managed).
    """
    if "_strata_managed" in module.__dict__:
        raise ValueError("this module is already managed by strata")
    device = torch.device(device) if device is not None else _default_device()
    owns_context = context is None
    if owns_context:
        context = _context_for(device, vram_limit, prefetch_depth)
    elif vram_limit is not None:
        raise ValueError("vram_limit belongs to the context: set it where the context is made")
    if isinstance(tiers, dict):
        tiers = _core.Tiers(**tiers)
    group = context.group(group_name, tiers)
    managed = ManagedModule(module, context, group, device, owns_context)
    # Everything that can fail comes before the module is touched; a failure undoes the group.
    try:
        registered = _register(module, group, module_types, checkpoint, checkpoint_prefix,
                               context, group_name)
        _move_unmanaged(module, [name for name, _, _, _ in registered], device)
    except BaseException:
        if owns_context:
            context.close()
        else:
            group.destroy()
        raise
    for name, sub, layer, params in registered:
        entry = _Layer(layer, {tensor: _park(sub, pname, p, device)
                               for tensor, (pname, p) in params.items()})
        managed.layers[name] = entry
        managed.hooks.append(sub.register_forward_pre_hook(managed._pre_hook(entry)))
        managed.hooks.append(sub.register_forward_hook(managed._post_hook(entry),
                                                       always_call=True))
    module.__dict__["_strata_managed"] = managed
    return managed


def _register(module, group, module_types, checkpoint, checkpoint_prefix, context, group_name):
    """Registers one layer per matching submodule: [(name, submodule, Layer, {strata tensor
    name: (parameter name in the submodule, Parameter)})]."""
    registered = []
    ckpt = context.open_checkpoint(checkpoint) if checkpoint is not None else None
    try:
        for name, sub in _matching_modules(module, module_types):
            params = [(pname, p) for pname, p in sub.named_parameters() if p is not None]
            if not params:
                continue
            layer_name = f"{group_name}/{name}" if name else group_name
            if ckpt is not None:
                prefix = checkpoint_prefix + (name + "." if name else "")
                names = [prefix + pname for pname, _ in params]
                layer = group.register_tensors(ckpt, layer_name, names)
            else:
                names = [pname for pname, _ in params]
                # `keep` holds the host copies until register_host has copied them.
                tensors, keep = _host_tensors(layer_name, params)
                layer = group.register_host(layer_name, tensors)
            registered.append((name, sub, layer, dict(zip(names, params))))
    finally:
        if ckpt is not None:
            ckpt.close()
    return registered


def _placeholder(param, device):
    """What a parameter holds between calls: one element expanded to its shape (its bytes
    live in strata). Not meta: torch cannot swap a meta tensor's data for a real one."""
    return torch.zeros((), dtype=param.dtype, device=device).expand(param.shape)


def _park(sub, pname, param, device):
    """Points `param` (sub's parameter `pname`) at a placeholder on `device`. Returns (the
    Parameter the hooks fill: the same object, or a new one replacing a meta parameter, its
    original device, the placeholder)."""
    placeholder = _placeholder(param, device)
    if param.device.type != "meta":
        original = param.device
        param.data = placeholder
        return param, original, placeholder
    owner_name, _, local = pname.rpartition(".")
    owner = sub.get_submodule(owner_name)
    replacement = nn.Parameter(placeholder, requires_grad=param.requires_grad)
    owner._parameters[local] = replacement
    return replacement, param.device, placeholder


def _host_tensors(layer_name, params):
    """(name -> (dtype, shape, address), the host tensors behind the addresses)."""
    tensors, keep = {}, []
    for pname, param in params:
        if param.device.type == "meta":
            raise ValueError(f"{layer_name}.{pname} is on the meta device: pass checkpoint=")
        if param.dtype not in _TORCH_DTYPES:
            raise ValueError(f"{layer_name}.{pname}: strata has no dtype for {param.dtype}")
        host = param.detach().to("cpu").contiguous()
        keep.append(host)
        tensors[pname] = (_TORCH_DTYPES[param.dtype], tuple(host.shape), host.data_ptr())
    return tensors, keep


def _move_unmanaged(module, managed_names, device):
    """Moves the parameters and buffers strata does not hold to the compute device."""
    def managed(name):
        return any(name == m or name.startswith(m + ".") if m else True for m in managed_names)

    for mname, sub in module.named_modules():
        if managed(mname):
            continue
        for pname, param in sub.named_parameters(recurse=False):
            if param.device.type == "meta":
                raise ValueError(f"{mname}.{pname} is on the meta device and no module_types "
                                 "match it: add its module's type")
            param.data = param.data.to(device)
        for bname, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.device.type != "meta":
                sub._buffers[bname] = buffer.to(device)


def disable_vram_management(module):
    """Undoes enable_vram_management: the same Parameter objects get their values back from
    strata (in their original dtype, on the device each had, the CPU for meta ones), and the
    hooks, the group (and a context strata created) go."""
    managed = module.__dict__.pop("_strata_managed")
    for hook in managed.hooks:
        hook.remove()
    for entry in managed.layers.values():
        with managed.context.acquire(entry.layer, stream=managed._stream()) as views:
            for view in views:
                param, original, _ = entry.params[view.name]
                target = torch.device("cpu") if original.type == "meta" else original
                param.data = torch.from_dlpack(view).to(target, param.dtype, copy=True)
    if managed.owns_context:
        managed.context.close()
    else:
        managed.group.destroy()


class Pipeline:
    """Several models under one budget, moved the way DiffSynth's pipelines move them:

        pipe = strata.torch.Pipeline(vram_limit="12GiB")
        pipe.add("text_encoder", text_encoder)
        pipe.add("dit", dit, tiers=dict(preparing_dtype="float8_e4m3fn",
                                        computation_dtype=torch.bfloat16))
        pipe.load_models_to_device(["text_encoder"])   # onloads it, offloads the rest
    """

    def __init__(self, vram_limit=None, device=None, prefetch_depth=None):
        self.device = torch.device(device) if device is not None else _default_device()
        self.context = _context_for(self.device, vram_limit, prefetch_depth)
        self.models = {}

    def add(self, name, module, **kwargs):
        """enable_vram_management(module, **kwargs) in this pipeline's context, as group
        `name`. Returns the module."""
        self.models[name] = enable_vram_management(module, context=self.context,
                                                   device=self.device, group_name=name, **kwargs)
        return module

    def load_models_to_device(self, names):
        """Onloads the named models' groups and offloads all others (first, to free room)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = set(names) - set(self.models)
        if unknown:
            raise KeyError(f"no models named {sorted(unknown)}; have {sorted(self.models)}")
        for name, managed in self.models.items():
            if name not in names:
                managed.offload()
        for name in names:
            self.models[name].onload()

    def stats(self):
        return self.context.stats()
