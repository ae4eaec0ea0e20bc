"""PyTorch integration: strata holds a module's parameters and hands them to each forward call.

    import strata.torch
    strata.torch.enable_vram_management(model, vram_limit="8GiB")
    model(x)                          # each managed submodule acquires its layer, runs, releases

One host copy for models on several GPUs (one context each), read from the checkpoint once:

    store = strata.Store()            # strata.Store(name="dit", checkpoint=path): across processes
    for gpu, model in enumerate(models):
        strata.torch.enable_vram_management(model, checkpoint=path, store=store,
                                            device=f"cuda:{gpu}", vram_limit="8GiB")

Which parameters make a layer:
- each outermost submodule of one of `module_types` is one strata layer holding all its
  parameters (a whole transformer block when its class is listed);
- every other module that owns parameters directly (a norm class no list knows, a model's own
  position embedding) is one layer of those direct parameters, so that every parameter of any
  nn.Module is managed and follows the computation tier;
- layers that share a parameter (tied weights: lm_head.weight is embed_tokens.weight) or a
  submodule are one layer: one strata tensor per parameter, loaded once.
A module whose forward reads its children's parameters without calling them (nn.
TransformerEncoderLayer's fast path) must be listed itself, or those children hold placeholders
when it runs. Buffers stay torch tensors, moved to the compute device.

The forward of a layer's owner, and of each module inside it, is wrapped (an instance
attribute `forward`, removed again by disable_vram_management): it acquires the layer on
torch's current stream and points the parameters at strata's bytes (zero-copy, through DLPack)
unless that stream holds it already, and releases it after, also when forward raises. Hooks
registered on those modules run outside that window, on the placeholders. So a
module inside a layer may also be called from outside its owner, and several threads may call
one managed model. Between calls each parameter is a one-element placeholder expanded to its
shape: its bytes live in strata. Inference only: autograd must not keep the weights past the call.
"""

import ctypes as C
import json
import threading
from pathlib import Path

import torch
from torch import nn

from . import _core, _dlpack
from ._lib import DType, strata_tensor_view
from .errors import check

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


def _context_for(device, vram_limit, prefetch_depth, store):
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _core.Context(compute_device="cuda", device_index=index, vram_limit=vram_limit,
                             prefetch_depth=prefetch_depth, store=store)
    if device.type != "cpu":
        raise ValueError(f"strata computes on cpu or cuda, not {device}")
    return _core.Context(compute_device="cpu", vram_limit=vram_limit,
                         prefetch_depth=prefetch_depth, store=store)


class _ViewsLease(_core.Lease):
    """The Lease the TensorViews of an acquire the hooks made point to, made only for a
    layer's first import or a change of its views' layout (TensorViews cost microseconds
    each): its views are imported at once, then it is marked released, so that they refuse
    any later use."""

    def __init__(self, context, entry, stream):
        self.context, self.layer, self.stream = context, entry.layer, stream
        self.released = False
        self.capsules = []
        self.views = [_core.TensorView(self, entry.raw[i]) for i in range(entry.count.value)]

    def retire(self):
        self.released = True
        _dlpack.retire(self.capsules)
        self.capsules = []


# strata_acquire_for_compute and strata_release with no argtypes, called with the ctypes
# objects each _Layer prepares once (a cdecl function takes arguments beyond its argtypes as
# they are): converting six Python integers through argtypes cost more than the C calls.
_STATUS_ONLY = C.CFUNCTYPE(C.c_uint32)
_VIEW_WORDS = C.sizeof(strata_tensor_view) // 8
_DATA_WORD = strata_tensor_view.data.offset // 8


class _Layer:
    """One strata layer: its parameters and the calls holding it now."""

    def __init__(self, layer, params, handle):
        self.layer = layer
        self.params = params  # strata tensor name -> (Parameter, original device, placeholder)
        self.placeholders = [(param, placeholder) for param, _, placeholder in params.values()]
        capacity = layer.capacity()
        # The views array every acquire of the layer fills (read under `lock`), and its words,
        # to read the data addresses without making a structure per view.
        self.raw = (strata_tensor_view * capacity)()
        self.words = (C.c_uint64 * (capacity * _VIEW_WORDS)).from_buffer(self.raw)
        self.count = C.c_size_t()
        # The arguments of strata_acquire_for_compute and strata_release, per stream pointer
        # (None on the CPU). `handle` is the context's own c_void_p, which its close() sets to
        # NULL, so that these calls fail cleanly once the context is gone.
        self.handle, self.id, self.capacity = handle, C.c_uint64(layer.id), C.c_size_t(capacity)
        self.count_pointer = C.pointer(self.count)
        self.stream_args = {}
        self.cpu_args = self.args_for(None)
        self.addresses = None  # the data addresses the tensors of `bound` are over
        self.bound = []       # [(Parameter, torch tensor over strata's bytes)], in view order
        # The views' words other than their addresses (names, dtypes, shapes), as the first
        # import read them, and [(Parameter, _dlpack.Layout)] in view order: an acquire that
        # hands out the same layout at other addresses imports its tensors from these.
        self.layout_words = None
        self.layouts = []
        # stream -> the number of calls in progress on it (the owner's, those of modules inside
        # it, re-entries, other threads' on the same stream), which share one strata lease of
        # that stream. The parameters point at strata's bytes while this is not empty.
        self.leases = {}
        self.lock = threading.Lock()

    def args_for(self, pointer):
        """(acquire's arguments, release's) on the stream at `pointer` (None: the CPU's)."""
        args = self.stream_args.get(pointer)
        if args is None:
            stream = None if pointer is None else C.c_void_p(pointer)
            args = ((self.handle, self.id, stream, self.raw, self.capacity, self.count_pointer),
                    (self.handle, self.id, stream))
            self.stream_args[pointer] = args
        return args


class ManagedModule:
    """What enable_vram_management did to a module: its context, group and layers."""

    def __init__(self, module, context, group, device, owns_context):
        self.module, self.context, self.group = module, context, group
        self.device, self.owns_context = device, owns_context
        self.layers = {}
        self.wrapped = []  # (module, the instance `forward` it had or None), to undo
        functions = _core.lib()
        self._acquire = _STATUS_ONLY(C.cast(functions.strata_acquire_for_compute,
                                            C.c_void_p).value)
        self._release = _STATUS_ONLY(C.cast(functions.strata_release, C.c_void_p).value)

    def stats(self):
        return self.context.stats()

    def onload(self):
        self.group.onload()

    def offload(self):
        self.group.offload()

    def _stream(self):
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _wrap(self, module, entry):
        """Makes `module.forward` hold `entry`'s layer around each call. An instance attribute
        rather than forward hooks: torch's hook dispatch alone costs more per call than the
        acquire, release and parameter swaps together, and a module without hooks keeps
        torch's fast path. The layer is released also when forward raises."""
        previous = module.__dict__.get("forward")
        forward = module.forward
        enter, leave = self._enter, self._leave
        lock, held, placeholders = entry.lock, entry.leases, entry.placeholders
        on_cuda, device = self.device.type == "cuda", self.device

        # The common cases (the stream holds the layer already; the layer is resident at the
        # addresses the tensors are over) are inlined: every call pays this.
        def managed_forward(*args, **kwargs):
            stream = torch.cuda.current_stream(device) if on_cuda else None
            with lock:
                calls = held.get(stream)
                if calls:
                    held[stream] = calls + 1
                else:
                    enter(entry, stream)
            try:
                return forward(*args, **kwargs)
            finally:
                with lock:
                    calls = held[stream]
                    if calls > 1:
                        held[stream] = calls - 1
                        calls = 0
                    else:
                        del held[stream]
                        if not held:
                            for param, placeholder in placeholders:
                                param.data = placeholder
                if calls:
                    leave(entry, stream)

        self.wrapped.append((module, previous))
        module.__dict__["forward"] = managed_forward

    def _unwrap(self):
        for module, previous in reversed(self.wrapped):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        self.wrapped = []

    def _enter(self, entry, stream):
        """Acquires the layer for `stream`, which does not hold it, under entry.lock."""
        held = entry.leases
        pointer = None if stream is None else stream.cuda_stream
        acquire_args, release_args = (entry.cpu_args if pointer is None
                                      else entry.args_for(pointer))
        status = self._acquire(*acquire_args)
        if status:
            self._check(status)
        first = not held
        held[stream] = 1
        if not first:
            return  # the layer is pinned where the parameters already point
        try:
            # A resident layer comes back at the same addresses with the same bytes, so
            # its tensors are reused instead of imported again (DLPack through ctypes
            # costs tens of microseconds); only an acquire vouching for those addresses
            # hands them out.
            addresses = entry.words[_DATA_WORD:entry.count.value * _VIEW_WORDS:_VIEW_WORDS]
            if addresses != entry.addresses:
                _import(self.context, entry, pointer, addresses)
            for param, tensor in entry.bound:
                param.data = tensor
        except BaseException:
            del held[stream]
            entry.addresses, entry.bound, entry.layout_words = None, [], None
            for param, placeholder in entry.placeholders:
                param.data = placeholder
            self._release(*release_args)
            raise

    def _leave(self, entry, stream):
        """Releases the layer for `stream`, whose last call ended."""
        status = self._release(*(entry.cpu_args if stream is None
                                 else entry.args_for(stream.cuda_stream))[1])
        if status:
            self._check(status)

    def _check(self, status):
        """Raises for a failed acquire or release: the context's own error once it is closed
        (the calls then pass NULL), strata's otherwise."""
        self.context.handle  # raises InvalidHandleError once the context is closed
        check(status)


def _import(context, entry, pointer, addresses):
    """Points entry.bound at torch tensors over the views just acquired, at `addresses` (on a
    failure, _enter forgets what entry holds)."""
    words = entry.words[:entry.count.value * _VIEW_WORDS]
    del words[_DATA_WORD::_VIEW_WORDS]
    if words == entry.layout_words:
        # Only the addresses changed: a capsule per tensor straight from its layout, without
        # TensorViews (the views' names and shapes are those the first import read).
        bound = []
        for (param, layout), address in zip(entry.layouts, addresses):
            made = layout.capsule(address)
            try:
                bound.append((param, torch.from_dlpack(made[0])))
            except BaseException:
                _dlpack.retire([made])  # torch did not take the block: free it
                raise
    else:
        lease = _ViewsLease(context, entry, pointer)
        try:
            views = lease.views
            bound = [(entry.params[view.name][0], torch.from_dlpack(view)) for view in views]
        finally:
            lease.retire()
        entry.layouts = [(param, _dlpack.Layout(view.dtype, view.shape, view.device,
                                                view.device_index))
                         for (param, _), view in zip(bound, views)]
        entry.layout_words = words
    entry.bound, entry.addresses = bound, addresses


def _matching_modules(module, module_types):
    """(qualified name, submodule) of the outermost submodules of `module_types`."""
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, module_types) and not any(
                name == p or name.startswith(p + ".") if p else True for p, _ in found):
            found.append((name, sub))
    return found


class _Unit:
    """What becomes one strata layer: its owner modules, the other modules whose calls
    acquire it, and its parameters (id -> Parameter), in registration order."""

    def __init__(self, name, owner, inner, params):
        self.name = name
        self.owners = [owner]
        self.inner = inner
        self.params = {id(p): p for p in params}

    def absorb(self, other):
        self.owners += other.owners
        self.inner += other.inner
        self.params.update(other.params)


def _plan(module, module_types):
    """The layers by the rule of the module docstring: [_Unit]."""
    units, inside = [], set()
    for name, sub in _matching_modules(module, module_types):
        inner = [m for m in sub.modules() if m is not sub]
        inside.update(id(m) for m in sub.modules())
        units.append(_Unit(name, sub, inner, sub.parameters()))
    for name, sub in module.named_modules():
        if id(sub) not in inside:
            units.append(_Unit(name, sub, [], sub.parameters(recurse=False)))
    # Units that share a parameter are one layer.
    merged, by_param = [], {}
    for unit in units:
        if not unit.params:
            continue
        into = next((by_param[k] for k in unit.params if k in by_param), None)
        if into is None:
            merged.append(unit)
            into = unit
        else:
            into.absorb(unit)
        for other in {id(by_param[k]): by_param[k] for k in unit.params if k in by_param
                      and by_param[k] is not into}.values():
            into.absorb(other)
            merged.remove(other)
        for k in into.params:
            by_param[k] = into
    for unit in merged:
        owners = {id(m) for m in unit.owners}
        unique, seen = [], set(owners)
        for m in unit.inner:
            if id(m) not in seen and any(True for _ in m.parameters()):
                seen.add(id(m))
                unique.append(m)
        unit.inner = unique
    return merged


def _checkpoint_names(path):
    """The tensor names a .safetensors file, index or shard directory holds."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            path = indexes[0]
        else:
            return set().union(*(_checkpoint_names(f) for f in sorted(path.glob("*.safetensors"))))
    if path.suffix == ".json":
        with open(path) as f:
            return set(json.load(f)["weight_map"])
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        return set(json.loads(f.read(length))) - {"__metadata__"}


def enable_vram_management(module, vram_limit=None, tiers=None, module_types=MODULE_TYPES,
                           checkpoint=None, checkpoint_prefix="", device=None, context=None,
                           group_name="model", prefetch_depth=None, store=None):
    """Hands every parameter of `module` to strata, in layers by the rule of this module's
    docstring (`module_types` picks the layer owners; list whole blocks for coarser layers).

    vram_limit: bytes or "8GiB" on the compute device (None: unlimited); belongs to the
      context, so give it only when strata creates the context (not with `context=`).
    tiers: a strata.Tiers or a dict of its keywords (DiffSynth's names: offload_dtype,
      computation_dtype=torch.bfloat16, ...). None: with `checkpoint`, the weights stay on
      disk (offload and onload tiers on disk: streamed per call, little RAM held); without
      one, strata's defaults (the stored dtype, computed in place). `tiers={}` gives strata's
      defaults with a checkpoint too (the whole model read into RAM).
    checkpoint: a .safetensors file, index or shard directory holding the weights under the
      module's own names (after `checkpoint_prefix`): layers are registered from the file, so
      there is no host copy of the module's tensors and the module may be on the meta device
      (accelerate.init_empty_weights()). A tied parameter is loaded under whichever of its
      names the checkpoint holds. Without it, the module's tensors are copied into strata
      and then freed.
    device: the compute device (default: the current CUDA device, else the CPU).
    context: a strata.Context to share (a Pipeline does); else one is created.
    store: a strata.Store the created context reads the checkpoint's host copies from, so that
      several models over one checkpoint (one per GPU, or one per process with a named store)
      hold one host copy, read from disk once. Needs `checkpoint`; with tiers None, the onload
      tier is then the store's RAM (offload on disk, onload on the CPU). Like vram_limit, it
      belongs to the context: with `context=`, attach it there (Context(store=...)).
    Returns the ManagedModule (also at module._strata_managed).
    """
    if "_strata_managed" in module.__dict__:
        raise ValueError("this module is already managed by strata")
    device = torch.device(device) if device is not None else _default_device()
    if store is not None and checkpoint is None:
        raise ValueError("a store shares the host copies of a checkpoint: pass checkpoint=")
    if tiers is None and checkpoint is not None:
        tiers = dict(offload_device="disk",
                     onload_device="disk" if store is None else "cpu")
    owns_context = context is None
    if owns_context:
        context = _context_for(device, vram_limit, prefetch_depth, store)
    elif vram_limit is not None:
        raise ValueError("vram_limit belongs to the context: set it where the context is made")
    elif store is not None:
        raise ValueError("the store belongs to the context: attach it where the context is "
                         "made (strata.Context(store=...), Pipeline(store=...))")
    if isinstance(tiers, dict):
        tiers = _core.Tiers(**tiers)
    group = context.group(group_name, tiers)
    managed = ManagedModule(module, context, group, device, owns_context)
    # Everything that can fail comes before the module is touched; a failure undoes the group.
    try:
        registered = _register(module, group, module_types, checkpoint, checkpoint_prefix,
                               context, group_name)
        _move_buffers(module, device)
    except BaseException:
        if owns_context:
            context.close()
        else:
            group.destroy()
        raise
    for unit, layer, names, aliases in registered:
        entry = _Layer(layer, {name: _park(module, aliases[id(p)], p, device)
                               for name, p in zip(names, unit.params.values())},
                       context.handle)
        managed.layers[unit.name] = entry
        for sub in unit.owners + unit.inner:
            managed._wrap(sub, entry)
    module.__dict__["_strata_managed"] = managed
    return managed


def _register(module, group, module_types, checkpoint, checkpoint_prefix, context, group_name):
    """Registers one layer per unit of _plan: [(unit, Layer, strata tensor names in the
    unit's parameter order, {id(Parameter): its qualified names in `module`})]."""
    aliases = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    registered = []
    ckpt = context.open_checkpoint(checkpoint) if checkpoint is not None else None
    try:
        held = _checkpoint_names(checkpoint) if checkpoint is not None else set()
        for unit in _plan(module, module_types):
            layer_name = f"{group_name}/{unit.name}" if unit.name else group_name
            if ckpt is not None:
                names = []
                for p in unit.params.values():
                    candidates = [checkpoint_prefix + a for a in aliases[id(p)]]
                    found = next((c for c in candidates if c in held), None)
                    if found is None:
                        raise ValueError(
                            f"the checkpoint has none of {candidates}: a tied weight that the "
                            "model built on the meta device has not tied yet? (call "
                            "model.tie_weights() after accelerate.init_empty_weights())")
                    names.append(found)
                layer = group.register_tensors(ckpt, layer_name, names)
            else:
                names = [aliases[id(p)][0] for p in unit.params.values()]
                # `keep` holds the host copies until register_host has copied them.
                tensors, keep = _host_tensors(layer_name, zip(names, unit.params.values()))
                layer = group.register_host(layer_name, tensors)
            registered.append((unit, layer, names, aliases))
    finally:
        if ckpt is not None:
            ckpt.close()
    return registered


def _placeholder(param, device):
    """What a parameter holds between calls: one element expanded to its shape (its bytes
    live in strata). Not meta: torch cannot swap a meta tensor's data for a real one."""
    return torch.zeros((), dtype=param.dtype, device=device).expand(param.shape)


def _park(module, names, param, device):
    """Points `param` (known in `module` as each of `names`) at a placeholder on `device`.
    Returns (the Parameter the hooks fill: the same object, or a new one replacing a meta
    parameter under all its names, its original device, the placeholder)."""
    placeholder = _placeholder(param, device)
    if param.device.type != "meta":
        original = param.device
        param.data = placeholder
        return param, original, placeholder
    replacement = nn.Parameter(placeholder, requires_grad=param.requires_grad)
    for name in names:
        owner_name, _, local = name.rpartition(".")
        module.get_submodule(owner_name)._parameters[local] = replacement
    return replacement, param.device, placeholder


def _host_tensors(layer_name, params):
    """(name -> (dtype, shape, address), the host tensors behind the addresses)."""
    tensors, keep = {}, []
    for pname, param in params:
        if param.device.type == "meta":
            raise ValueError(f"{pname} (layer {layer_name}) is on the meta device: pass "
                             "checkpoint=")
        if param.dtype not in _TORCH_DTYPES:
            raise ValueError(f"{pname} (layer {layer_name}): strata has no dtype for "
                             f"{param.dtype}")
        host = param.detach().to("cpu").contiguous()
        keep.append(host)
        tensors[pname] = (_TORCH_DTYPES[param.dtype], tuple(host.shape), host.data_ptr())
    return tensors, keep


def _move_buffers(module, device):
    """Moves the buffers (strata holds only parameters) to the compute device."""
    for mname, sub in module.named_modules():
        for bname, buffer in list(sub._buffers.items()):
            if buffer is None:
                continue
            if buffer.device.type == "meta":
                raise ValueError(f"buffer {mname}.{bname} is on the meta device: strata holds "
                                 "parameters only (accelerate.init_empty_weights() keeps "
                                 "buffers real unless include_buffers=True)")
            sub._buffers[bname] = buffer.to(device)


def disable_vram_management(module):
    """Undoes enable_vram_management: the same Parameter objects get their values back from
    strata (in their original dtype, on the device each had, the CPU for meta ones), and the
    hooks, the group (and a context strata created) go. The values are what strata holds: a
    model managed with a narrower stored dtype (offload_dtype bf16, fp8 with or without
    quantization) gets the rounded weights back, not the originals."""
    managed = module.__dict__.pop("_strata_managed")
    managed._unwrap()
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

    def __init__(self, vram_limit=None, device=None, prefetch_depth=None, store=None):
        self.device = torch.device(device) if device is not None else _default_device()
        self.context = _context_for(self.device, vram_limit, prefetch_depth, store)
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
