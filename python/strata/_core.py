"""Context, Group, Layer, Checkpoint, acquire leases and tensor views over the C ABI."""

import ctypes as C
import re
from collections.abc import Sequence

from . import _dlpack
from ._lib import (FLAG_STRICT_BUDGET, LOG_FN, PROGRESS_FN, UNLIMITED, Device, DType,
                   LogLevel, Quantization, lib, strata_host_tensor, strata_options, strata_stats,
                   strata_store_stats, strata_tensor_view, strata_tiers)
from .errors import (InvalidArgumentError, InvalidHandleError, StateError, UnsupportedError,
                     check)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value):
    """Bytes from an int, None (unlimited), or a string such as "512MiB" or "1.5 GiB"."""
    if value is None:
        return UNLIMITED
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size in bytes: {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _optional(function):
    """The library's `function`, which builds older than this binding lack (UnsupportedError)."""
    if not hasattr(lib(), function):
        raise UnsupportedError(f"this libstrata ({lib().path}) has no {function}", 7)
    return getattr(lib(), function)


def version():
    """The library's version as (major, minor, patch)."""
    v = lib().strata_version()
    return (v >> 16, (v >> 8) & 0xFF, v & 0xFF)


class Options(strata_options):
    """strata_options: the library's defaults (strata_options_default) with keyword overrides.

    log(level, message) (level: a LogLevel) and progress(phase, done, total) are Python
    callables, called on the thread of the strata call they report on, as it returns."""

    def __init__(self, compute_device=None, device_index=None, vram_limit=None, host_limit=None,
                 prefetch_depth=None, strict_budget=None, flags=None, log=None, progress=None,
                 vram_headroom=None):
        super().__init__()
        # The library fills only the fields it knows: a build older than this binding leaves
        # the trailing callback fields as ctypes zeroed them (NULL).
        default = lib().strata_options_default()
        C.memmove(C.addressof(self), C.addressof(default), C.sizeof(strata_options))
        self.library_struct_size = self.struct_size
        self.struct_size = C.sizeof(strata_options)
        self.log_fn, self.log_user, self.progress_fn, self.progress_user = (
            LOG_FN(), None, PROGRESS_FN(), None)
        if compute_device is not None:
            self.compute_device = Device.parse(compute_device)
        if device_index is not None:
            self.device_index = device_index
        if vram_limit is not None:
            self.vram_limit = parse_bytes(vram_limit)
        if host_limit is not None:
            self.host_limit = parse_bytes(host_limit)
        if prefetch_depth is not None:
            self.prefetch_depth = prefetch_depth
        if vram_headroom is not None:
            self.vram_headroom = parse_bytes(vram_headroom)
        if flags is not None:
            self.flags = flags
        if strict_budget is not None:
            self.flags = (self.flags | FLAG_STRICT_BUDGET if strict_budget
                          else self.flags & ~FLAG_STRICT_BUDGET)
        if log is not None:
            self.log_fn = LOG_FN(lambda _user, level, message: log(
                LogLevel(level) if level in LogLevel._value2member_map_ else level,
                message.decode("utf-8", "replace")))
        if progress is not None:
            self.progress_fn = PROGRESS_FN(lambda _user, phase, done, total: progress(
                phase.decode("utf-8", "replace"), done, total))


class Tiers(strata_tiers):
    """strata_tiers with DiffSynth's keyword names. Devices and dtypes take enums, ints or
    names ("disk", "cuda", "bf16", torch.bfloat16); None keeps strata_tiers_default()."""

    def __init__(self, offload_device=None, offload_dtype=None, onload_device=None,
                 onload_dtype=None, preparing_device=None, preparing_dtype=None,
                 computation_device=None, computation_dtype=None, quantization=None):
        super().__init__()
        default = lib().strata_tiers_default()
        C.memmove(C.addressof(self), C.addressof(default), C.sizeof(strata_tiers))
        self.struct_size = C.sizeof(strata_tiers)
        for tier, device, dtype in (("offload", offload_device, offload_dtype),
                                    ("onload", onload_device, onload_dtype),
                                    ("preparing", preparing_device, preparing_dtype),
                                    ("computation", computation_device, computation_dtype)):
            placement = getattr(self, tier)
            if device is not None:
                placement.device = Device.parse(device)
            if dtype is not None:
                placement.dtype = DType.parse(dtype)
        if quantization is not None:
            self.quantization = Quantization.parse(quantization)

    def __repr__(self):
        tiers = ", ".join(f"{t}=({Device(getattr(self, t).device).name}, "
                          f"{DType(getattr(self, t).dtype).name})"
                          for t in ("offload", "onload", "preparing", "computation"))
        return f"Tiers({tiers}, quantization={Quantization(self.quantization).name})"


class Stats(strata_stats):
    """strata_stats: the context's counters (bytes, hits, stalls)."""

    def as_dict(self):
        return {name: getattr(self, name) for name, _ in self._fields_ if name != "struct_size"}

    def __repr__(self):
        return "Stats(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


def _stream_pointer(stream):
    """A CUstream address from None, an int, or a torch (cuda_stream) / cupy (ptr) stream."""
    if stream is None or isinstance(stream, int):
        return stream
    for attribute in ("cuda_stream", "ptr"):
        if hasattr(stream, attribute):
            return getattr(stream, attribute)
    raise TypeError(f"not a CUDA stream: {stream!r}")


_TYPESTR_DTYPES = {"<f4": DType.F32, "<f2": DType.F16, "<f8": DType.F64, "<i8": DType.I64,
                   "<i4": DType.I32, "<i2": DType.I16, "|i1": DType.I8, "|u1": DType.U8,
                   "|b1": DType.BOOL}
# numpy has no bf16 or fp8: those views show their raw bits as unsigned integers.
_DTYPE_TYPESTRS = {dtype: typestr for typestr, dtype in _TYPESTR_DTYPES.items()}
_DTYPE_TYPESTRS.update({DType.BF16: "<u2", DType.F8_E4M3FN: "|u1", DType.F8_E5M2: "|u1"})


def _host_tensor(name, value):
    """(strata_host_tensor, objects to keep alive) from (dtype, shape, data) or an array.

    `data` is a C-contiguous buffer of exactly numel * itemsize bytes, or an int address."""
    if not isinstance(value, tuple) and hasattr(value, "__array_interface__"):
        interface = value.__array_interface__
        if interface["typestr"] not in _TYPESTR_DTYPES:
            raise InvalidArgumentError(f"tensor {name!r}: no strata dtype for "
                                       f"{interface['typestr']}; pass (dtype, shape, data)")
        value = (_TYPESTR_DTYPES[interface["typestr"]], interface["shape"], value)
    dtype, shape, data = value
    dtype = DType.parse(dtype)
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    keep = []
    if isinstance(data, int):
        address = data
    else:
        view = memoryview(data)
        if not view.c_contiguous:
            raise InvalidArgumentError(f"tensor {name!r}: data is not C-contiguous")
        if view.nbytes != numel * dtype.itemsize:
            raise InvalidArgumentError(f"tensor {name!r}: {view.nbytes} bytes of data for shape "
                                       f"{list(shape)} of {dtype.name} "
                                       f"({numel * dtype.itemsize} bytes)")
        if isinstance(data, bytes):
            holder = C.c_char_p(data)
            address = C.cast(holder, C.c_void_p).value
        elif view.readonly:
            holder = (C.c_char * view.nbytes).from_buffer_copy(view)
            address = C.addressof(holder)
        else:
            holder = (C.c_char * view.nbytes).from_buffer(view.cast("B"))
            address = C.addressof(holder)
        keep.append(holder)
    encoded = name.encode()
    shape_array = (C.c_int64 * len(shape))(*shape)
    keep += [encoded, shape_array]
    return strata_host_tensor(encoded, dtype, len(shape), shape_array, address), keep


class _Owned:
    """Something strata made and the caller owns: `close()` (idempotent, also on garbage
    collection and at the end of a `with` block) hands it back; `handle` refuses once closed.
    Subclasses name themselves in `_what` and hand the handle back in `_destroy`."""

    @property
    def handle(self):
        if self._handle is None:
            raise InvalidHandleError(f"the {self._what} is closed", 3)
        return self._handle

    def close(self):
        handle = getattr(self, "_handle", None)
        if handle is not None:
            self._destroy(handle)
            self._handle = None
            # Calls prepared with this very object (strata.torch's per-layer arguments) pass
            # NULL from now on, which strata refuses, instead of the destroyed handle.
            handle.value = None

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Context(_Owned):
    """One manager for one compute device: budget, copy engine, statistics.

    Context(compute_device="cpu", vram_limit="2GiB", ...) takes Options' keywords, or
    Context(options=Options(...)). store=: a Store attached at once (see attach_store). Use it
    as a context manager or call close(), which destroys the context and everything registered
    on it."""

    _what = "context"

    def __init__(self, options=None, store=None, **kwargs):
        if options is None:
            options = Options(**kwargs)
        elif kwargs:
            raise TypeError("pass either options or keywords, not both")
        # Holding the Options keeps its callback objects alive as long as the context.
        self.options = options
        handle = C.c_void_p()
        check(lib().strata_context_create(C.byref(options), C.byref(handle)))
        self._handle = handle
        if store is not None:
            try:
                self.attach_store(store)
            except BaseException:
                self.close()
                raise

    def _destroy(self, handle):
        lib().strata_context_destroy(handle)

    def group(self, name, tiers=None):
        """Creates a group (initially offloaded) with `tiers` (a Tiers; None: the defaults)."""
        tiers = Tiers() if tiers is None else tiers
        out = C.c_uint64()
        check(lib().strata_group_create(self.handle, name.encode(), C.byref(tiers),
                                        C.byref(out)))
        return Group(self, out.value, name)

    def open_checkpoint(self, path):
        """Opens a .safetensors file, a *.safetensors.index.json, or a directory of shards."""
        out = C.c_void_p()
        check(lib().strata_checkpoint_open(self.handle, str(path).encode(), C.byref(out)))
        return Checkpoint(self, out)

    def find_layer(self, name):
        out = C.c_uint64()
        check(lib().strata_layer_find(self.handle, name.encode(), C.byref(out)))
        return Layer(self, out.value, name)

    def acquire(self, layer, stream=None):
        """Acquires `layer` (a Layer) now, on `stream` (None, a CUstream address, or a torch /
        cupy stream; ignored on the CPU device). Use as `with ctx.acquire(layer) as views:`
        (released on exit, also on an exception), or call release() on the returned Lease."""
        return Lease(self, layer, stream)

    def set_vram_limit(self, value):
        """Changes the device budget now (bytes, "8GiB", None = unlimited): layers not in use
        are evicted down to it before this returns."""
        self._set_limit("strata_context_set_vram_limit", value)

    def set_host_limit(self, value):
        """Changes host_limit now (bytes, "8GiB", None = unlimited)."""
        self._set_limit("strata_context_set_host_limit", value)

    def _set_limit(self, function, value):
        check(_optional(function)(self.handle, parse_bytes(value)))

    def attach_store(self, store):
        """Makes the host copies this context reads from checkpoints from now on come from
        `store` (a Store), shared with every other context using it; copies made before stay
        the context's own. Once per context (a second is StateError). The context keeps the
        store alive after store.close(). Views of shared copies are shared: never write them."""
        if not isinstance(store, Store):
            raise TypeError(f"not a strata.Store: {store!r}")
        check(_optional("strata_context_attach_store")(self.handle, store.handle))

    def stats(self):
        out = Stats()
        out.struct_size = C.sizeof(Stats)
        check(lib().strata_stats_get(self.handle, C.byref(out)))
        return out

    def trace_write(self, path):
        """Writes the timeline as Chrome trace JSON (Perfetto opens it)."""
        check(lib().strata_trace_write(self.handle, str(path).encode()))


class StoreStats(strata_store_stats):
    """strata_store_stats: a store's counters (layers held, fills, waits, takeovers)."""

    as_dict = Stats.as_dict

    def __repr__(self):
        return "StoreStats(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


class Store(_Owned):
    """A host store: one host copy of each checkpoint layer, shared by every context attached
    to it (one per GPU), read from disk once and counted once against its own host_limit.

    Store() is a store within this process. Store(name="dit", checkpoint=path) is a named
    store, shared by every process of the machine that opens that name: the first creates it
    (a file strata-NAME in `dir`, /dev/shm by default, created with `mode`, 0600 by default),
    the others attach; one made from other files or by another strata version is StateError.
    host_limit: bytes or "8GiB" (None: unlimited; a named store reserves it whole at creation,
    OutOfMemoryError where the directory lacks the room). close() gives up this handle only:
    contexts attached keep the store, and a named store's file goes with its last process."""

    _what = "store"

    def __init__(self, name=None, checkpoint=None, host_limit=None, dir=None, mode=None):
        options = _optional("strata_store_options_default")()
        if host_limit is not None:
            options.host_limit = parse_bytes(host_limit)
        if mode is not None:
            options.mode = mode
        # The encoded strings live in these locals until strata_store_create has returned.
        name_bytes, checkpoint_bytes, dir_bytes = (None if v is None else str(v).encode()
                                                   for v in (name, checkpoint, dir))
        options.name, options.checkpoint, options.dir = name_bytes, checkpoint_bytes, dir_bytes
        handle = C.c_void_p()
        check(lib().strata_store_create(C.byref(options), C.byref(handle)))
        self._handle = handle
        self.name = name

    def _destroy(self, handle):
        lib().strata_store_destroy(handle)

    def __repr__(self):
        kind = "within this process" if self.name is None else f"named {self.name!r}"
        state = "closed" if self._handle is None else "open"
        return f"Store({kind}, {state})"

    def stats(self):
        out = StoreStats()
        out.struct_size = C.sizeof(StoreStats)
        check(lib().strata_store_stats_get(self.handle, C.byref(out)))
        return out

    @property
    def created(self):
        """Whether this process created the store (a named store), rather than attached."""
        return bool(self.stats().created)


class Group:
    """Layers that move together (a text encoder, a DiT, a VAE), with their tiers."""

    def __init__(self, context, id, name):
        self.context, self.id, self.name = context, id, name

    def __repr__(self):
        return f"Group({self.name!r}, id={self.id})"

    def onload(self):
        check(lib().strata_group_onload(self.context.handle, self.id))

    def offload(self):
        check(lib().strata_group_offload(self.context.handle, self.id))

    def destroy(self):
        check(lib().strata_group_destroy(self.context.handle, self.id))

    def register_host(self, layer_name, tensors):
        """Registers a layer from host tensors, copied during the call. `tensors` maps each
        tensor's name to (dtype, shape, data) or to a numpy array; data is a C-contiguous
        buffer (bytes, array.array, memoryview, ...) or an int address."""
        items = tensors.items() if hasattr(tensors, "items") else tensors
        built = [_host_tensor(name, value) for name, value in items]
        array = (strata_host_tensor * len(built))(*(t for t, _ in built))
        out = C.c_uint64()
        check(lib().strata_layer_register_host(self.context.handle, self.id, layer_name.encode(),
                                               array, len(built), C.byref(out)))
        return Layer(self.context, out.value, layer_name)

    def register_tensors(self, checkpoint, layer_name, tensor_names):
        """Registers the named tensors of an open checkpoint as one layer (nothing is read)."""
        names = (C.c_char_p * len(tensor_names))(*(n.encode() for n in tensor_names))
        out = C.c_uint64()
        check(lib().strata_layer_register_checkpoint(self.context.handle, self.id,
                                                     checkpoint.handle, layer_name.encode(),
                                                     names, len(tensor_names), C.byref(out)))
        return Layer(self.context, out.value, layer_name)

    def register_checkpoint(self, checkpoint, prefix="", keep_components=0):
        """Registers every tensor whose name starts with `prefix`; a layer is a tensor name cut
        to its first `keep_components` dot-separated parts (0: all but the last). Returns the
        number of layers."""
        out = C.c_size_t()
        check(lib().strata_group_register_checkpoint(self.context.handle, self.id,
                                                     checkpoint.handle, prefix.encode(),
                                                     keep_components, C.byref(out)))
        return out.value


class Layer:
    """The unit of acquire/release: a named set of tensors."""

    def __init__(self, context, id, name):
        self.context, self.id, self.name = context, id, name
        self._capacity = None

    def __repr__(self):
        return f"Layer({self.name!r}, id={self.id:#x})"

    @property
    def tensor_count(self):
        out = C.c_size_t()
        check(lib().strata_layer_tensor_count(self.context.handle, self.id, C.byref(out)))
        return out.value

    def capacity(self):
        """tensor_count, asked once: a layer's tensors are fixed when it is registered."""
        if self._capacity is None:
            self._capacity = self.tensor_count
        return self._capacity

    def unregister(self):
        """Removes the layer; its id becomes stale (InvalidHandleError from then on)."""
        check(lib().strata_layer_unregister(self.context.handle, self.id))


class Checkpoint(_Owned):
    """An open safetensors checkpoint. Layers registered from it outlive close()."""

    _what = "checkpoint"

    def __init__(self, context, handle):
        self.context, self._handle = context, handle

    def _destroy(self, handle):
        lib().strata_checkpoint_close(handle)


class Lease:
    """One acquire of a layer: `views` until release(). A context manager."""

    def __init__(self, context, layer, stream):
        self.context, self.layer = context, layer
        self.stream = _stream_pointer(stream)
        self.released = False
        self.capsules = []  # (capsule, block) made from this lease's views: see _dlpack
        raw, count = self._acquire(layer.capacity())
        self.views = Views([TensorView(self, raw[i]) for i in range(count)])

    def _acquire(self, capacity, raw=None):
        """strata_acquire_for_compute into `raw` (a new array by default): (raw, count)."""
        raw = (strata_tensor_view * capacity)() if raw is None else raw
        count = C.c_size_t()
        check(lib().strata_acquire_for_compute(self.context.handle, self.layer.id, self.stream,
                                               raw, capacity, C.byref(count)))
        return raw, count.value

    def release(self):
        """Ends this use of the layer: its views refuse access from now on."""
        if self.released:
            raise StateError(f"layer {self.layer.name!r}: this lease was already released", 10)
        self.released = True
        _dlpack.retire(self.capsules)
        self.capsules = []
        check(lib().strata_release(self.context.handle, self.layer.id, self.stream))

    def __enter__(self):
        return self.views

    def __exit__(self, *exc):
        if not self.released:
            self.release()


class Views(Sequence):
    """The views of one acquire, by position or by tensor name."""

    def __init__(self, views):
        self._list = views
        self._by_name = {v.name: v for v in views}

    def __getitem__(self, key):
        return self._by_name[key] if isinstance(key, str) else self._list[key]

    def __len__(self):
        return len(self._list)

    def keys(self):
        return self._by_name.keys()


class TensorView:
    """One tensor of an acquired layer, valid until its lease is released (or its context
    closed): from then on every access to its bytes raises StateError instead of reading freed
    memory. Tensors made from it
    (torch.from_dlpack, numpy.asarray) share its bytes and must not be used after release."""

    def __init__(self, lease, raw):
        self._lease = lease
        self.name = raw.name.decode()
        self.dtype = DType(raw.dtype)
        self.device = Device(raw.device)
        self.device_index = raw.device_index
        self.shape = tuple(raw.shape[:raw.ndim])
        self.nbytes = raw.nbytes
        self._data = raw.data or 0

    def __repr__(self):
        state = "released" if self._lease.released else "live"
        return (f"TensorView({self.name!r}, {self.dtype.name}, {list(self.shape)}, "
                f"{self.device.name}:{self.device_index}, {state})")

    @property
    def data_ptr(self):
        """The bytes' address (device memory on CUDA)."""
        if self._lease.released or self._lease.context._handle is None:
            raise StateError(f"view {self.name!r} of layer {self._lease.layer.name!r} used after "
                             "release (or after its context was closed)", 10)
        return self._data

    def _host_pointer(self):
        pointer = self.data_ptr
        if self.device != Device.CPU:
            raise BufferError(f"view {self.name!r} is on {self.device.name}, not in host memory")
        return pointer

    def tobytes(self):
        """A copy of the bytes (CPU views)."""
        return C.string_at(self._host_pointer(), self.nbytes)

    @property
    def __array_interface__(self):
        """numpy's zero-copy protocol, read-only (CPU views). numpy has no bf16 or fp8: those
        appear as their raw bits (uint16 for bf16, uint8 for fp8)."""
        return {"version": 3, "shape": self.shape, "typestr": _DTYPE_TYPESTRS[self.dtype],
                "data": (self._host_pointer(), True)}

    def __dlpack_device__(self):
        return _dlpack.device_of(self.device, self.device_index)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """A DLPack capsule over the bytes (zero-copy). On CUDA the consumer must use the
        stream the layer was acquired on (that stream waits for the bytes; another would not):
        DLPack's stream None and 1 mean the legacy default stream, as acquire's None does."""
        pointer = self.data_ptr
        if copy:
            raise BufferError("strata views are zero-copy: copy the imported tensor instead")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"view {self.name!r} is on {self.__dlpack_device__()}, "
                              f"not {tuple(dl_device)}")
        if self.device == Device.CUDA and stream != -1:
            acquired_on = self._lease.stream or 1
            if (stream or 1) != acquired_on:
                raise BufferError(f"view {self.name!r} was acquired on stream {acquired_on:#x}; "
                                  f"the consumer asked for {stream!r}: acquire on the stream "
                                  "that uses it")
        versioned = max_version is not None and max_version[0] >= 1
        capsule, block = _dlpack.capsule(pointer, self.dtype, self.shape, self.device,
                                         self.device_index, versioned)
        self._lease.capsules.append((capsule, block))
        return capsule
