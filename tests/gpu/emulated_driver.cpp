// An emulated CUDA driver: the entry points of libcuda.so that strata and tests/cuda.rs call,
// implemented on the host, so that the CUDA backend's own code runs where no GPU exists (CI).
// tests/cuda.rs builds it as a libcuda.so and runs its GPU tests a second time against it.
//
// It stands in for a GPU where that can be done faithfully, and is strict where a real driver
// would fail later or only sometimes:
// - Streams run asynchronously, each on a thread of its own, in order; events and stream waits
//   order them as on a GPU. Copies from pinned host memory read it when the stream gets to them;
//   copies from pageable memory stage the bytes at once, after waiting for the stream or not.
// - Device memory lives at addresses the host cannot dereference (a PROT_NONE reservation, never
//   reused), backed elsewhere: host code that touches a device pointer faults, as it would.
//   Allocations fail with CUDA_ERROR_OUT_OF_MEMORY beyond STRATA_EMULATED_CUDA_MEMORY bytes
//   (1 GiB by default), and fresh memory holds garbage, not zeros. Pinning host memory
//   (cuMemHostAlloc, cuMemHostRegister) fails beyond STRATA_EMULATED_CUDA_PINNABLE bytes, as a
//   memlock limit makes it fail.
// - STRATA_EMULATED_CUDA_DEVICES devices (1 by default), each with its own memory (of
//   STRATA_EMULATED_CUDA_MEMORY bytes), primary context and counts of allocations and uploads
//   (strata_emulated_cuda_counts, for the tests). A kernel that reaches another device's memory
//   poisons the driver, as a GPU without peer access faults. Pinned host memory is pinned for the
//   context that pinned it, or for every context when pinned portably (CU_MEMHOSTALLOC_PORTABLE,
//   CU_MEMHOSTREGISTER_PORTABLE): from any other context it is pageable memory, and copies from it
//   are counted as such.
// - A kernel or copy that reaches outside a live allocation, and memory (device, pinned or
//   registered) freed while queued work still uses it, poison the driver as an illegal address
//   does: every later call fails with CUDA_ERROR_ILLEGAL_ADDRESS, and stderr says what happened.
// - Calls need a current context; a stream of another context is refused where CUDA refuses it;
//   unknown stream, event and function handles get CUDA_ERROR_INVALID_HANDLE.
// - Kernels: strata's conversion and quantization kernels are the ones in kernels/convert.cu
//   compiled for the host (the PTX must name them), and the tests' checksum and spin kernels are
//   written out below.
// - Operations are delayed at random (see `jitter`), and pinned host memory that changes between
//   a copy's enqueue and its run is reported as the race it is.
//
// What it does not emulate, and so cannot catch:
// - the legacy default stream's implicit synchronisation with blocking streams (strata's streams
//   are non-blocking);
// - stream capture beyond its modes' rule for the calls that may synchronise (allocating,
//   freeing, pinning, synchronous copies and memsets, waiting on streams and events, loading
//   modules), cuCtxSynchronize's refusal during any capture, and cuStreamIsCapturing's
//   CUDA_ERROR_STREAM_CAPTURE_IMPLICIT for the legacy stream while a blocking stream of its
//   context is captured: other uses a capture forbids, such as other work on the legacy stream
//   then, or waiting on an event recorded during capture, are not refused;
// - cuCtxDestroy on the primary context, which it refuses outright;
// - which handles a real driver reports as invalid once destroyed: here every destroyed stream
//   and event handle is refused (their addresses are never reused), where a GPU may hand the
//   address out again or fail differently;
// - speed, of which it says nothing.
// Per-thread default streams keep their worker thread until their context ends.

#include "convert.cu"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

namespace {

enum : CUresult {
  SUCCESS = 0,
  INVALID_VALUE = 1,
  OUT_OF_MEMORY = 2,
  NOT_INITIALIZED = 3,
  INVALID_DEVICE = 101,
  INVALID_IMAGE = 200,
  INVALID_CONTEXT = 201,
  INVALID_HANDLE = 400,
  NOT_FOUND = 500,
  NOT_READY = 600,
  ILLEGAL_ADDRESS = 700,
  HOST_MEMORY_ALREADY_REGISTERED = 712,
  HOST_MEMORY_NOT_REGISTERED = 713,
  STREAM_CAPTURE_UNSUPPORTED = 900,
  STREAM_CAPTURE_INVALIDATED = 901,
  STREAM_CAPTURE_UNMATCHED = 903,
  STREAM_CAPTURE_IMPLICIT = 906,
};

const char *error_name(CUresult code) {
  switch (code) {
  case SUCCESS: return "CUDA_SUCCESS";
  case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
  case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
  case NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
  case INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
  case INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
  case INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
  case INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
  case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
  case NOT_READY: return "CUDA_ERROR_NOT_READY";
  case ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
  case HOST_MEMORY_ALREADY_REGISTERED: return "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED";
  case HOST_MEMORY_NOT_REGISTERED: return "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED";
  case STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
  case STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
  case STREAM_CAPTURE_UNMATCHED: return "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED";
  default: return nullptr;
  }
}

const char *error_text(CUresult code) {
  switch (code) {
  case SUCCESS: return "no error";
  case INVALID_VALUE: return "invalid argument";
  case OUT_OF_MEMORY: return "out of memory";
  case NOT_INITIALIZED: return "initialization error";
  case INVALID_DEVICE: return "invalid device ordinal";
  case INVALID_IMAGE: return "device kernel image is invalid";
  case INVALID_CONTEXT: return "invalid device context";
  case INVALID_HANDLE: return "invalid resource handle";
  case NOT_FOUND: return "named symbol not found";
  case NOT_READY: return "device not ready";
  case ILLEGAL_ADDRESS: return "an illegal memory access was encountered";
  case HOST_MEMORY_ALREADY_REGISTERED: return "part or all of the requested memory range is "
                                              "already mapped";
  case HOST_MEMORY_NOT_REGISTERED: return "pointer does not correspond to a registered memory "
                                          "region";
  case STREAM_CAPTURE_UNSUPPORTED: return "operation not permitted when stream is capturing";
  case STREAM_CAPTURE_INVALIDATED: return "operation failed due to a previous error during "
                                          "capture";
  case STREAM_CAPTURE_UNMATCHED: return "capture was not initiated in this stream";
  case STREAM_CAPTURE_IMPLICIT: return "operation would make the legacy stream depend on a "
                                       "capturing blocking stream";
  default: return nullptr;
  }
}

// cuda.h's handles for the default streams.
const uintptr_t STREAM_LEGACY = 1;
const uintptr_t STREAM_PER_THREAD = 2;
const unsigned EVENT_DISABLE_TIMING = 2;
const int CAPTURE_NONE = 0, CAPTURE_ACTIVE = 1, CAPTURE_INVALIDATED = 2;
const int MODE_GLOBAL = 0, MODE_THREAD_LOCAL = 1, MODE_RELAXED = 2;
const int ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;

struct Context;

// One cuEventRecord: the event's latest record is what waits, queries and synchronizations look
// at, and each record completes on its own, so a later record on a faster stream never stands in
// for an earlier one that a wait was queued on.
struct Record {
  bool done = false;
  std::chrono::steady_clock::time_point done_at;
};

// One piece of device memory an operation reads or writes, resolved to its backing storage just
// before it runs.
struct DeviceRange {
  CUdeviceptr address;
  size_t len;
};

struct Op {
  const char *what;
  std::vector<DeviceRange> device;
  // Pinned host memory the op reads or writes when it runs.
  uintptr_t host_start = 0, host_end = 0;
  std::function<void(const std::vector<unsigned char *> &, std::string &)> work;
  std::shared_ptr<Record> waits_for;
  std::shared_ptr<Record> completes;
};

struct Stream {
  Context *context;
  // Created without CU_STREAM_NON_BLOCKING: the legacy stream synchronises with it.
  bool blocking = false;
  std::deque<Op> queue;
  bool destroyed = false;
  int capture = CAPTURE_NONE;
  int capture_mode = MODE_GLOBAL;
  std::thread::id capture_thread;
  std::vector<Op> captured;
};

struct Event {
  Context *context;
  bool timing;
  std::shared_ptr<Record> latest; // none until first recorded: then it counts as complete
};

struct Context {
  bool primary;
  int device;
  int retained = 0;
  std::shared_ptr<Stream> legacy;
};

struct Allocation {
  size_t len;
  unsigned char *backing;
  Context *context;
  int device;
};

// Host memory pinned by cuMemHostAlloc or cuMemHostRegister, up to `end`: pinned for the context
// `owner` only, unless portable.
struct PinnedRange {
  uintptr_t end;
  Context *owner;
  bool portable;
};

const unsigned PORTABLE = 1; // CU_MEMHOSTALLOC_PORTABLE and CU_MEMHOSTREGISTER_PORTABLE

} // namespace

// What one device has seen since cuInit, for the tests (strata_emulated_cuda_counts).
struct strata_emulated_cuda_device_counts {
  unsigned long long allocations;
  // Host-to-device bytes copied from memory pinned for the copying context, and from memory that
  // is pageable there.
  unsigned long long pinned_upload_bytes;
  unsigned long long pageable_upload_bytes;
  // Host bytes cuMemHostRegister pinned in place from this device's contexts.
  unsigned long long registered_bytes;
};

namespace {

struct Device {
  size_t used = 0;
  Context primary;
  strata_emulated_cuda_device_counts counts{};
};

struct Module {
  Context *context;
  std::set<std::string> entries;
};

enum class KernelKind { Convert, AbsmaxClear, Absmax, Scales, Quantize, Checksum, Spin };

typedef void (*ConvertKernel)(const unsigned char *, unsigned char *, const float *,
                              unsigned long long, unsigned long long);
typedef void (*ClearKernel)(strata_u32 *, unsigned long long);
typedef void (*AbsmaxKernel)(const unsigned char *, const float *, strata_u32 *,
                             unsigned long long, unsigned long long, unsigned long long);
typedef void (*QuantizeKernel)(const unsigned char *, const float *, unsigned char *,
                               const float *, unsigned long long, unsigned long long,
                               unsigned long long);

struct Function {
  Module *module;
  KernelKind kind;
  ConvertKernel convert = nullptr;
  ClearKernel groups_kernel = nullptr; // strata_absmax_clear and strata_scales_*
  AbsmaxKernel absmax = nullptr;
  QuantizeKernel quantize = nullptr;
  size_t src_size = 0, dst_size = 0;
  bool scaled_source = false;
};

struct Graph {
  std::vector<Op> ops;
};

// strata's kernels by name: what each one is, its element sizes, and whether its source may
// carry fp8 scales.
struct KernelEntry {
  const char *name;
  KernelKind kind;
  ConvertKernel convert;
  ClearKernel groups_kernel;
  AbsmaxKernel absmax;
  QuantizeKernel quantize;
  size_t src_size, dst_size;
  bool fp8;
};

#define CONVERT(SRC, SRC_SIZE, DST, DST_SIZE, FP8)                                                  \
  {"strata_convert_" #SRC "_to_" #DST, KernelKind::Convert, strata_convert_##SRC##_to_##DST,      \
   nullptr, nullptr, nullptr, SRC_SIZE, DST_SIZE, FP8}
#define ABSMAX(SRC, SRC_SIZE, FP8)                                                                 \
  {"strata_absmax_" #SRC, KernelKind::Absmax, nullptr, nullptr, strata_absmax_##SRC, nullptr,     \
   SRC_SIZE, 4, FP8}
#define SCALES(FMT)                                                                                \
  {"strata_scales_" #FMT, KernelKind::Scales, nullptr, strata_scales_##FMT, nullptr, nullptr, 4, 4, \
   false}
#define QUANTIZE(SRC, SRC_SIZE, DST, FP8)                                                          \
  {"strata_quantize_" #SRC "_to_" #DST, KernelKind::Quantize, nullptr, nullptr, nullptr,          \
   strata_quantize_##SRC##_to_##DST, SRC_SIZE, 1, FP8}

const KernelEntry KERNELS[] = {
    CONVERT(f16, 2, f32, 4, false),      CONVERT(bf16, 2, f32, 4, false),
    CONVERT(f8e4m3, 1, f32, 4, true),    CONVERT(f8e5m2, 1, f32, 4, true),
    CONVERT(f32, 4, f16, 2, false),      CONVERT(bf16, 2, f16, 2, false),
    CONVERT(f8e4m3, 1, f16, 2, true),    CONVERT(f8e5m2, 1, f16, 2, true),
    CONVERT(f32, 4, bf16, 2, false),     CONVERT(f16, 2, bf16, 2, false),
    CONVERT(f8e4m3, 1, bf16, 2, true),   CONVERT(f8e5m2, 1, bf16, 2, true),
    CONVERT(f32, 4, f8e4m3, 1, false),   CONVERT(f16, 2, f8e4m3, 1, false),
    CONVERT(bf16, 2, f8e4m3, 1, false),  CONVERT(f8e4m3, 1, f8e4m3, 1, true),
    CONVERT(f8e5m2, 1, f8e4m3, 1, true), CONVERT(f32, 4, f8e5m2, 1, false),
    CONVERT(f16, 2, f8e5m2, 1, false),   CONVERT(bf16, 2, f8e5m2, 1, false),
    CONVERT(f8e4m3, 1, f8e5m2, 1, true), CONVERT(f8e5m2, 1, f8e5m2, 1, true),
    {"strata_absmax_clear", KernelKind::AbsmaxClear, nullptr, strata_absmax_clear, nullptr,
     nullptr, 4, 4, false},
    ABSMAX(f32, 4, false),               ABSMAX(f16, 2, false),
    ABSMAX(bf16, 2, false),              ABSMAX(f8e4m3, 1, true),
    ABSMAX(f8e5m2, 1, true),             SCALES(f8e4m3),
    SCALES(f8e5m2),                      QUANTIZE(f32, 4, f8e4m3, false),
    QUANTIZE(f16, 2, f8e4m3, false),     QUANTIZE(bf16, 2, f8e4m3, false),
    QUANTIZE(f8e4m3, 1, f8e4m3, true),   QUANTIZE(f8e5m2, 1, f8e4m3, true),
    QUANTIZE(f32, 4, f8e5m2, false),     QUANTIZE(f16, 2, f8e5m2, false),
    QUANTIZE(bf16, 2, f8e5m2, false),    QUANTIZE(f8e4m3, 1, f8e5m2, true),
    QUANTIZE(f8e5m2, 1, f8e5m2, true),
};

// Everything below is guarded by `mu`; `changed` is signalled whenever work completes, an event
// does, or a queue grows. Leaked on purpose: stream threads outlive static destructors.
struct Driver {
  std::mutex mu;
  std::condition_variable changed;
  bool initialized = false;
  std::string poisoned;
  int device_count = 0;
  // Each device's memory is `total` bytes. A deque: contexts point into it.
  size_t total = 0;
  std::deque<Device> devices;
  uintptr_t address_space = 0, address_space_end = 0, next_address = 0;
  std::map<uintptr_t, Allocation> allocations;
  // Pinned host ranges by start: cuMemHostAlloc's and cuMemHostRegister's.
  std::map<uintptr_t, PinnedRange> host_allocations, registrations;
  // Host memory pinned either way, and the most that may be (STRATA_EMULATED_CUDA_PINNABLE).
  size_t pinned_bytes = 0, pinnable = SIZE_MAX;
  std::set<Context *> contexts;
  std::map<Stream *, std::shared_ptr<Stream>> streams;
  std::map<Event *, std::shared_ptr<Event>> events;
  std::set<Module *> modules;
  std::set<Function *> functions;
  std::set<Graph *> graphs;
  // Each thread's per-thread default stream, per context.
  std::map<std::pair<std::thread::id, Context *>, std::shared_ptr<Stream>> per_thread;
  // Streams destroyed with work still queued: that work runs, and still counts as in flight.
  std::set<std::shared_ptr<Stream>> draining;
  // Destroyed streams and events, kept so that no new handle takes a destroyed one's address:
  // a stale handle is then always refused (a real driver may hand the address out again).
  std::vector<std::shared_ptr<void>> retired;
  std::mutex kernels; // the host kernels share one emulated grid position
};

Driver &driver = *new Driver;
thread_local std::vector<Context *> context_stack;
thread_local int thread_capture_mode = MODE_GLOBAL; // cuThreadExchangeStreamCaptureMode's

size_t env_bytes(const char *name, size_t fallback) {
  const char *value = std::getenv(name);
  return value && *value ? (size_t)std::strtoull(value, nullptr, 10) : fallback;
}

void poison(std::unique_lock<std::mutex> &, const std::string &why) {
  if (driver.poisoned.empty()) {
    driver.poisoned = why;
    std::fprintf(stderr, "emulated CUDA driver: illegal address: %s\n", why.c_str());
  }
}

Context *current() { return context_stack.empty() ? nullptr : context_stack.back(); }

// Whether `device` names one of the devices (CUdevice is the ordinal here); call with the lock.
bool is_device(CUdevice device) { return device >= 0 && device < driver.device_count; }

// The common preconditions of a call made in the current context.
CUresult ready_in_context() {
  if (!driver.initialized) return NOT_INITIALIZED;
  if (!driver.poisoned.empty()) return ILLEGAL_ADDRESS;
  Context *context = current();
  if (context == nullptr || !driver.contexts.count(context)) return INVALID_CONTEXT;
  return SUCCESS;
}

// The live allocation holding [address, address + len) whole, or none.
std::map<uintptr_t, Allocation>::iterator allocation_of(CUdeviceptr address, size_t len) {
  auto it = driver.allocations.upper_bound((uintptr_t)address);
  if (it == driver.allocations.begin()) return driver.allocations.end();
  --it;
  uintptr_t start = it->first;
  if (address < start || address + len > start + it->second.len || address + len < address) {
    return driver.allocations.end();
  }
  return it;
}

// Where [address, address + len) of device memory is backed on the host, or nullptr when it
// does not lie inside one live allocation.
unsigned char *backing_of(CUdeviceptr address, size_t len) {
  auto it = allocation_of(address, len);
  if (it == driver.allocations.end()) return nullptr;
  return it->second.backing + (address - it->first);
}

// count elements of size bytes each, as the length of a range: one that overflows reaches past
// every allocation, as such a kernel would.
size_t bytes_of(unsigned long long count, size_t size) {
  return count > SIZE_MAX / size ? SIZE_MAX : (size_t)(count * size);
}

bool overlaps(uintptr_t a_start, uintptr_t a_end, uintptr_t b_start, uintptr_t b_end) {
  return a_start < b_end && b_start < a_end;
}

// Every stream that may hold work: created, default, per-thread and destroyed-but-draining.
template <typename Visit> void each_stream(Visit visit) {
  for (auto &entry : driver.streams) visit(*entry.second);
  for (Context *context : driver.contexts) visit(*context->legacy);
  for (auto &entry : driver.per_thread) visit(*entry.second);
  for (auto &stream : driver.draining) visit(*stream);
}

bool context_idle(Context *context) {
  bool idle = true;
  each_stream([&](const Stream &stream) {
    if (stream.context == context && !stream.queue.empty()) idle = false;
  });
  return idle;
}

// Whether the calling thread may make a call that can synchronise (allocating, freeing or pinning
// memory, synchronous copies, waiting on streams or events, loading modules) by the rules of
// capture modes: not while a capture of its own that is
// not relaxed is under way, nor, unless its own mode is thread-local, while another thread's
// global-mode capture is; unless its own mode is relaxed. A refused call invalidates the
// captures that refused it, as on a GPU.
CUresult capture_allows_unsafe_call() {
  if (thread_capture_mode == MODE_RELAXED) return SUCCESS;
  bool refused = false;
  each_stream([&](Stream &stream) {
    if (stream.capture != CAPTURE_ACTIVE || stream.capture_mode == MODE_RELAXED) return;
    bool own = stream.capture_thread == std::this_thread::get_id();
    if (own || (thread_capture_mode == MODE_GLOBAL && stream.capture_mode == MODE_GLOBAL)) {
      stream.capture = CAPTURE_INVALIDATED;
      refused = true;
    }
  });
  return refused ? STREAM_CAPTURE_UNSUPPORTED : SUCCESS;
}

// Whether [start, end) of device memory or (host) of pinned host memory is in queued or running
// work on any stream.
const char *in_flight(uintptr_t start, uintptr_t end, bool host) {
  auto check = [&](const std::deque<Op> &queue) -> const char * {
    for (const Op &op : queue) {
      if (host && overlaps(start, end, op.host_start, op.host_end)) return op.what;
      if (!host) {
        for (const DeviceRange &r : op.device) {
          if (r.len > 0 && overlaps(start, end, r.address, r.address + r.len)) return op.what;
        }
      }
    }
    return nullptr;
  };
  const char *found = nullptr;
  each_stream([&](const Stream &stream) {
    if (!found) found = check(stream.queue);
  });
  return found;
}

// Forgets a pinned range (`what` happened to it), unless queued work still reads it.
CUresult forget_pinned(std::unique_lock<std::mutex> &lock,
                       std::map<uintptr_t, PinnedRange> &ranges,
                       std::map<uintptr_t, PinnedRange>::iterator range, const char *what) {
  if (const char *op = in_flight(range->first, range->second.end, true)) {
    poison(lock, std::string(what) + " while queued work reads it: " + op);
    return ILLEGAL_ADDRESS;
  }
  driver.pinned_bytes -= range->second.end - range->first;
  ranges.erase(range);
  return SUCCESS;
}

// FNV-1a over the bytes, to tell whether they changed.
uint64_t fingerprint(const void *data, size_t len) {
  const unsigned char *bytes = (const unsigned char *)data;
  uint64_t hash = 0xcbf29ce484222325ull;
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t word;
    std::memcpy(&word, bytes + i, 8);
    hash = (hash ^ word) * 0x100000001b3ull;
  }
  for (; i < len; i++) hash = (hash ^ bytes[i]) * 0x100000001b3ull;
  return hash;
}

// Delays a quarter of the operations by up to STRATA_EMULATED_CUDA_JITTER_US microseconds (50 by
// default), so that streams drift against each other and against the host as a GPU's do, and an
// ordering bug shows in more runs.
std::minstd_rand &thread_random() {
  thread_local std::minstd_rand random(
      (unsigned)std::hash<std::thread::id>()(std::this_thread::get_id()));
  return random;
}

void jitter() {
  static const unsigned max_us = (unsigned)env_bytes("STRATA_EMULATED_CUDA_JITTER_US", 50);
  std::minstd_rand &random = thread_random();
  if (max_us > 0 && random() % 4 == 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(random() % (max_us + 1)));
  }
}

void run_stream(std::shared_ptr<Stream> stream) {
  std::unique_lock<std::mutex> lock(driver.mu);
  for (;;) {
    driver.changed.wait(lock, [&] { return !stream->queue.empty() || stream->destroyed; });
    if (stream->queue.empty()) {
      driver.draining.erase(stream);
      return;
    }
    Op &op = stream->queue.front();
    if (op.waits_for) {
      driver.changed.wait(lock, [&] { return op.waits_for->done; });
    }
    std::vector<unsigned char *> resolved;
    bool runnable = driver.poisoned.empty();
    for (const DeviceRange &range : op.device) {
      unsigned char *backing = range.len ? backing_of(range.address, range.len) : nullptr;
      if (range.len && backing == nullptr) {
        char why[160];
        std::snprintf(why, sizeof why, "%s reached 0x%llx + %zu, outside live device memory",
                      op.what, range.address, range.len);
        poison(lock, why);
        runnable = false;
        break;
      }
      resolved.push_back(backing);
    }
    if (runnable && op.work) {
      lock.unlock();
      jitter();
      std::string failure;
      op.work(resolved, failure);
      lock.lock();
      if (!failure.empty()) poison(lock, failure);
    }
    if (op.completes) {
      op.completes->done = true;
      op.completes->done_at = std::chrono::steady_clock::now();
    }
    stream->queue.pop_front();
    driver.changed.notify_all();
  }
}

std::shared_ptr<Stream> new_stream(Context *context) {
  auto stream = std::make_shared<Stream>();
  stream->context = context;
  std::thread(run_stream, stream).detach();
  return stream;
}

// The stream a handle names in the current context (the default-stream handles name one there).
CUresult resolve(void *handle, std::shared_ptr<Stream> &out) {
  uintptr_t raw = (uintptr_t)handle;
  Context *context = current();
  if (raw == 0 || raw == STREAM_LEGACY) {
    out = context->legacy;
    return SUCCESS;
  }
  if (raw == STREAM_PER_THREAD) {
    auto key = std::make_pair(std::this_thread::get_id(), context);
    auto &stream = driver.per_thread[key];
    if (!stream) stream = new_stream(context);
    out = stream;
    return SUCCESS;
  }
  auto it = driver.streams.find((Stream *)handle);
  if (it == driver.streams.end() || it->second->destroyed) return INVALID_HANDLE;
  out = it->second;
  return SUCCESS;
}

std::shared_ptr<Event> event_of(Event *handle) {
  auto it = driver.events.find(handle);
  return it == driver.events.end() ? nullptr : it->second;
}

void enqueue(Stream &stream, Op op) {
  if (stream.capture != CAPTURE_NONE) {
    stream.captured.push_back(std::move(op));
    return;
  }
  stream.queue.push_back(std::move(op));
  driver.changed.notify_all();
}

// Ends a stream: queued work still runs (and counts as in flight until it has), and its handle
// is never given out again.
void retire(const std::shared_ptr<Stream> &stream) {
  stream->destroyed = true;
  if (!stream->queue.empty()) driver.draining.insert(stream);
  driver.retired.push_back(stream);
  driver.changed.notify_all();
}

void forget_functions_of(Module *module) {
  for (auto it = driver.functions.begin(); it != driver.functions.end();) {
    if ((*it)->module == module) {
      delete *it;
      it = driver.functions.erase(it);
    } else {
      ++it;
    }
  }
}

void wait_idle(std::unique_lock<std::mutex> &lock, Stream &stream) {
  driver.changed.wait(lock, [&] { return stream.queue.empty(); });
}

CUresult check_device_range(CUdeviceptr address, size_t len) {
  return len == 0 || backing_of(address, len) ? SUCCESS : INVALID_VALUE;
}

// Whether [start, start + len) lies whole in one range pinned for `context`: pinned portably,
// or by that context.
bool pinned(uintptr_t start, size_t len, const Context *context) {
  for (auto *ranges : {&driver.host_allocations, &driver.registrations}) {
    auto it = ranges->upper_bound(start);
    if (it == ranges->begin()) continue;
    const PinnedRange &range = (--it)->second;
    if (start + len >= start && start + len <= range.end) {
      return range.portable || range.owner == context;
    }
  }
  return false;
}

struct Locked {
  std::unique_lock<std::mutex> lock{driver.mu};
};

// Runs `thread` once per thread of the grid, the emulated grid position set for each call.
template <typename Thread> void run_grid(unsigned grid, unsigned block, Thread thread) {
  std::lock_guard<std::mutex> alone(driver.kernels);
  for (unsigned b = 0; b < grid; b++) {
    for (unsigned t = 0; t < block; t++) {
      strata_host_grid_now = strata_host_grid{b, block, grid, t};
      thread();
    }
  }
}

// The groups of `numel` elements in rows of `row_len` (0: one group, as the kernels read it).
unsigned long long groups_of(unsigned long long numel, unsigned long long row_len) {
  return row_len ? (numel + row_len - 1) / row_len : 1;
}

} // namespace

extern "C" {

CUresult cuGetErrorName(CUresult error, const char **name) {
  if (!name) return INVALID_VALUE;
  *name = error_name(error);
  return *name ? SUCCESS : INVALID_VALUE;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
  if (!text) return INVALID_VALUE;
  *text = error_text(error);
  return *text ? SUCCESS : INVALID_VALUE;
}

// Ends a context once its work has run: frees its memory and forgets the handles made in it.
void tear_down(std::unique_lock<std::mutex> &lock, Context *context) {
  driver.changed.wait(lock, [&] { return context_idle(context); });
  // Retained again while its work drained: it lives on.
  if (context->primary && context->retained > 0) return;
  for (auto it = driver.allocations.begin(); it != driver.allocations.end();) {
    if (it->second.context == context) {
      driver.devices[it->second.device].used -= it->second.len;
      std::free(it->second.backing);
      it = driver.allocations.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = driver.streams.begin(); it != driver.streams.end();) {
    if (it->second->context == context) {
      retire(it->second);
      it = driver.streams.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = driver.per_thread.begin(); it != driver.per_thread.end();) {
    if (it->first.second == context) {
      it->second->destroyed = true;
      it = driver.per_thread.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = driver.events.begin(); it != driver.events.end();) {
    if (it->second->context == context) {
      driver.retired.push_back(it->second);
      it = driver.events.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = driver.modules.begin(); it != driver.modules.end();) {
    if ((*it)->context == context) {
      forget_functions_of(*it);
      delete *it;
      it = driver.modules.erase(it);
    } else {
      ++it;
    }
  }
  context->legacy->destroyed = true;
  driver.contexts.erase(context);
  driver.changed.notify_all();
}

CUresult cuInit(unsigned flags) {
  if (flags != 0) return INVALID_VALUE;
  Locked l;
  if (!driver.initialized) {
    driver.total = env_bytes("STRATA_EMULATED_CUDA_MEMORY", (size_t)1 << 30);
    driver.pinnable = env_bytes("STRATA_EMULATED_CUDA_PINNABLE", SIZE_MAX);
    // Addresses for device memory that the host cannot touch, never handed out twice.
    size_t span = (size_t)1 << 40;
    void *space = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
                       0);
    if (space == MAP_FAILED) return OUT_OF_MEMORY;
    driver.address_space = driver.next_address = (uintptr_t)space;
    driver.address_space_end = (uintptr_t)space + span;
    driver.device_count = (int)std::max<size_t>(1, env_bytes("STRATA_EMULATED_CUDA_DEVICES", 1));
    for (int d = 0; d < driver.device_count; d++) {
      driver.devices.emplace_back();
      driver.devices.back().primary = Context{true, d, 0, nullptr};
    }
    driver.initialized = true;
  }
  return SUCCESS;
}

CUresult cuDriverGetVersion(int *version) {
  if (!version) return INVALID_VALUE;
  *version = 12080;
  return SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
  Locked l;
  if (!driver.initialized) return NOT_INITIALIZED;
  if (!count) return INVALID_VALUE;
  *count = driver.device_count;
  return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
  Locked l;
  if (!driver.initialized) return NOT_INITIALIZED;
  if (!device) return INVALID_VALUE;
  if (!is_device(ordinal)) return INVALID_DEVICE;
  *device = ordinal;
  return SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
  Locked l;
  if (!is_device(device)) return INVALID_DEVICE;
  if (!name || len <= 0) return INVALID_VALUE;
  std::snprintf(name, (size_t)len, "strata emulated CUDA device %d", device);
  return SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
  Locked l;
  if (!is_device(device)) return INVALID_DEVICE;
  if (!value) return INVALID_VALUE;
  // Compute capability 9.0; everything else (memory pools included) reads as absent.
  *value = attribute == ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR ? 9 : 0;
  return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice device) {
  Locked l;
  if (!is_device(device)) return INVALID_DEVICE;
  if (!bytes) return INVALID_VALUE;
  *bytes = driver.total;
  return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(Context **context, CUdevice device) {
  Locked l;
  if (!driver.initialized) return NOT_INITIALIZED;
  if (!is_device(device)) return INVALID_DEVICE;
  if (!context) return INVALID_VALUE;
  // The first retain, and the first after the last release, makes it anew (unless the release
  // is still waiting for its work, which then keeps it).
  Context &primary = driver.devices[device].primary;
  if (primary.retained++ == 0 && (!primary.legacy || primary.legacy->destroyed)) {
    primary.legacy = new_stream(&primary);
    driver.contexts.insert(&primary);
  }
  *context = &primary;
  return SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
  Locked l;
  if (!driver.initialized) return NOT_INITIALIZED;
  if (!is_device(device)) return INVALID_DEVICE;
  Context &primary = driver.devices[device].primary;
  if (primary.retained == 0) return INVALID_CONTEXT;
  // At zero the real driver destroys it: its memory, streams, events and modules are gone, and a
  // thread that still has it current can make no call until it is retained again.
  if (--primary.retained == 0) tear_down(l.lock, &primary);
  return SUCCESS;
}

CUresult cuCtxCreate_v2(Context **context, unsigned, CUdevice device) {
  Locked l;
  if (!driver.initialized) return NOT_INITIALIZED;
  if (!is_device(device)) return INVALID_DEVICE;
  if (!context) return INVALID_VALUE;
  Context *created = new Context{false, device, 0, nullptr};
  created->legacy = new_stream(created);
  driver.contexts.insert(created);
  context_stack.push_back(created);
  *context = created;
  return SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice *device) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (!device) return INVALID_VALUE;
  *device = current()->device;
  return SUCCESS;
}

// Not a CUDA entry point: what `device` has seen since cuInit, for the tests.
CUresult strata_emulated_cuda_counts(CUdevice device, strata_emulated_cuda_device_counts *out) {
  Locked l;
  if (!driver.initialized) return NOT_INITIALIZED;
  if (!is_device(device)) return INVALID_DEVICE;
  if (!out) return INVALID_VALUE;
  *out = driver.devices[device].counts;
  return SUCCESS;
}

CUresult cuCtxDestroy_v2(Context *context) {
  Locked l;
  if (!driver.contexts.count(context) || context->primary) return INVALID_CONTEXT;
  tear_down(l.lock, context);
  context->legacy = nullptr;
  context_stack.erase(std::remove(context_stack.begin(), context_stack.end(), context),
                      context_stack.end());
  return SUCCESS;
}

CUresult cuCtxGetCurrent(Context **context) {
  Locked l;
  if (!driver.initialized) return NOT_INITIALIZED;
  if (!context) return INVALID_VALUE;
  *context = current();
  return SUCCESS;
}

CUresult cuCtxSetCurrent(Context *context) {
  Locked l;
  if (!driver.initialized) return NOT_INITIALIZED;
  if (context && !driver.contexts.count(context)) return INVALID_CONTEXT;
  if (!context_stack.empty()) context_stack.pop_back();
  if (context) context_stack.push_back(context);
  return SUCCESS;
}

CUresult cuCtxPushCurrent_v2(Context *context) {
  Locked l;
  if (!driver.initialized) return NOT_INITIALIZED;
  if (!driver.contexts.count(context)) return INVALID_CONTEXT;
  context_stack.push_back(context);
  return SUCCESS;
}

CUresult cuCtxPopCurrent_v2(Context **context) {
  Locked l;
  if (!driver.initialized) return NOT_INITIALIZED;
  if (context_stack.empty()) return INVALID_CONTEXT;
  if (context) *context = context_stack.back();
  context_stack.pop_back();
  return SUCCESS;
}

CUresult cuCtxSynchronize() {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  Context *context = current();
  // Invalid during any capture in the context, whatever the modes.
  bool capturing = false;
  each_stream([&](Stream &stream) {
    if (stream.context == context && stream.capture == CAPTURE_ACTIVE) {
      stream.capture = CAPTURE_INVALIDATED;
      capturing = true;
    }
  });
  if (capturing) return STREAM_CAPTURE_UNSUPPORTED;
  driver.changed.wait(l.lock, [&] { return context_idle(context); });
  return driver.poisoned.empty() ? SUCCESS : ILLEGAL_ADDRESS;
}

CUresult cuMemGetInfo_v2(size_t *free, size_t *total) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (!free || !total) return INVALID_VALUE;
  *free = driver.total - driver.devices[current()->device].used;
  *total = driver.total;
  return SUCCESS;
}

// cuda.h's CUmemAllocationProp, as far as this driver reads it.
struct MemAllocationProp {
  int type;                  // 1: CU_MEM_ALLOCATION_TYPE_PINNED
  int requested_handle_types;
  int location_type;         // 1: CU_MEM_LOCATION_TYPE_DEVICE
  int location_id;
};

// Allocations are charged in 512-byte units (cuMemAlloc_v2), which strata reads here.
CUresult cuMemGetAllocationGranularity(size_t *granularity, const MemAllocationProp *prop,
                                       int option) {
  Locked l;
  if (!granularity || !prop || option < 0 || option > 1) return INVALID_VALUE;
  if (prop->type != 1 || prop->location_type != 1) return INVALID_VALUE;
  if (!is_device(prop->location_id)) return INVALID_DEVICE;
  *granularity = 512;
  return SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr *pointer, size_t bytes) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  if (!pointer || bytes == 0) return INVALID_VALUE;
  size_t charged = (bytes + 511) / 512 * 512;
  Device &device = driver.devices[current()->device];
  if (charged > driver.total - device.used) return OUT_OF_MEMORY;
  if (charged > driver.address_space_end - driver.next_address) return OUT_OF_MEMORY;
  unsigned char *backing = (unsigned char *)std::malloc(charged);
  if (!backing) return OUT_OF_MEMORY;
  // Fresh device memory is not zeroed; the huge allocations of the tests' memory hogs are left
  // untouched, so they take no host memory.
  if (charged <= ((size_t)128 << 20)) std::memset(backing, 0xCD, charged);
  uintptr_t address = driver.next_address;
  driver.next_address += charged;
  device.used += charged;
  device.counts.allocations++;
  driver.allocations[address] = Allocation{charged, backing, current(), current()->device};
  *pointer = address;
  return SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr pointer) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  auto it = driver.allocations.find((uintptr_t)pointer);
  if (it == driver.allocations.end()) return INVALID_VALUE;
  if (const char *what = in_flight(it->first, it->first + it->second.len, false)) {
    poison(l.lock, std::string("device memory freed while queued work still uses it: ") + what);
    return ILLEGAL_ADDRESS;
  }
  driver.devices[it->second.device].used -= it->second.len;
  std::free(it->second.backing);
  driver.allocations.erase(it);
  return SUCCESS;
}

CUresult cuMemHostAlloc(void **pointer, size_t bytes, unsigned flags) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  if (!pointer || bytes == 0) return INVALID_VALUE;
  // As the memlock limit refuses it.
  if (bytes > driver.pinnable - driver.pinned_bytes) return OUT_OF_MEMORY;
  void *memory = std::malloc(bytes);
  if (!memory) return OUT_OF_MEMORY;
  driver.pinned_bytes += bytes;
  driver.host_allocations[(uintptr_t)memory] =
      PinnedRange{(uintptr_t)memory + bytes, current(), (flags & PORTABLE) != 0};
  *pointer = memory;
  return SUCCESS;
}

CUresult cuMemAllocHost_v2(void **pointer, size_t bytes) { return cuMemHostAlloc(pointer, bytes, 0); }

CUresult cuMemFreeHost(void *pointer) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  auto it = driver.host_allocations.find((uintptr_t)pointer);
  if (it == driver.host_allocations.end()) return INVALID_VALUE;
  CUresult forgotten = forget_pinned(l.lock, driver.host_allocations, it, "pinned host memory freed");
  if (forgotten == SUCCESS) std::free(pointer);
  return forgotten;
}

CUresult cuMemHostRegister_v2(void *pointer, size_t bytes, unsigned flags) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  if (!pointer || bytes == 0) return INVALID_VALUE;
  uintptr_t start = (uintptr_t)pointer, end = start + bytes;
  if (end < start) return INVALID_VALUE;
  for (auto *ranges : {&driver.host_allocations, &driver.registrations}) {
    for (auto &range : *ranges) {
      if (overlaps(start, end, range.first, range.second.end)) {
        return HOST_MEMORY_ALREADY_REGISTERED;
      }
    }
  }
  if (bytes > driver.pinnable - driver.pinned_bytes) return OUT_OF_MEMORY;
  driver.pinned_bytes += bytes;
  driver.registrations[start] = PinnedRange{end, current(), (flags & PORTABLE) != 0};
  driver.devices[current()->device].counts.registered_bytes += bytes;
  return SUCCESS;
}

CUresult cuMemHostUnregister(void *pointer) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  auto it = driver.registrations.find((uintptr_t)pointer);
  if (it == driver.registrations.end()) return HOST_MEMORY_NOT_REGISTERED;
  return forget_pinned(l.lock, driver.registrations, it, "host memory unregistered");
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t bytes, void *handle) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(handle, stream)) return r;
  if (bytes == 0) return SUCCESS;
  if (!src) return INVALID_VALUE;
  if (CUresult r = check_device_range(dst, bytes)) return r;
  Op op;
  op.what = "a host-to-device copy";
  op.device = std::vector<DeviceRange>{{dst, bytes}};
  strata_emulated_cuda_device_counts &counts = driver.devices[stream->context->device].counts;
  if (pinned((uintptr_t)src, bytes, stream->context)) {
    counts.pinned_upload_bytes += bytes;
    op.host_start = (uintptr_t)src;
    op.host_end = (uintptr_t)src + bytes;
    // The copy reads the host bytes when the stream gets to it: bytes changed before then are a
    // race that a GPU loses only sometimes, so it is reported every time.
    uint64_t enqueued = fingerprint(src, bytes);
    op.work = [src, bytes, enqueued](const std::vector<unsigned char *> &p, std::string &failure) {
      if (fingerprint(src, bytes) != enqueued) {
        failure = "pinned host memory changed between a copy's enqueue and its run";
      }
      std::memcpy(p[0], src, bytes);
    };
  } else {
    counts.pageable_upload_bytes += bytes;
    // Pageable memory: the driver has read the bytes on return, and may or may not have waited
    // for the stream first; each way is taken half the time, so code must be right under both.
    if (stream->capture == CAPTURE_NONE && thread_random()() % 2 == 0) wait_idle(l.lock, *stream);
    auto staged = std::make_shared<std::vector<unsigned char>>(
        (const unsigned char *)src, (const unsigned char *)src + bytes);
    op.work = [staged](const std::vector<unsigned char *> &p, std::string &) {
      std::memcpy(p[0], staged->data(), staged->size());
    };
  }
  enqueue(*stream, std::move(op));
  return SUCCESS;
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void *handle) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(handle, stream)) return r;
  if (CUresult r = check_device_range(dst, bytes)) return r;
  if (CUresult r = check_device_range(src, bytes)) return r;
  Op op;
  op.what = "a device-to-device copy";
  op.device = std::vector<DeviceRange>{{dst, bytes}, {src, bytes}};
  op.work = [bytes](const std::vector<unsigned char *> &p, std::string &) {
    if (bytes) std::memmove(p[0], p[1], bytes);
  };
  enqueue(*stream, std::move(op));
  return SUCCESS;
}

// A copy of device memory at `src` into host memory at `dst`, for any stream.
Op copy_to_host(void *dst, CUdeviceptr src, size_t bytes) {
  Op op;
  op.what = "a device-to-host copy";
  op.device = std::vector<DeviceRange>{{src, bytes}};
  op.host_start = (uintptr_t)dst;
  op.host_end = (uintptr_t)dst + bytes;
  op.work = [dst, bytes](const std::vector<unsigned char *> &p, std::string &) {
    std::memcpy(dst, p[0], bytes);
  };
  return op;
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t bytes) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  if (bytes == 0) return SUCCESS;
  if (!dst) return INVALID_VALUE;
  if (CUresult r = check_device_range(src, bytes)) return r;
  Stream &legacy = *current()->legacy;
  enqueue(legacy, copy_to_host(dst, src, bytes));
  wait_idle(l.lock, legacy);
  return driver.poisoned.empty() ? SUCCESS : ILLEGAL_ADDRESS;
}

// Into pinned memory it returns at once and the copy lands when the stream gets to it; into
// pageable memory it returns once the bytes are there.
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t bytes, void *handle) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(handle, stream)) return r;
  if (bytes == 0) return SUCCESS;
  if (!dst) return INVALID_VALUE;
  if (CUresult r = check_device_range(src, bytes)) return r;
  bool to_pinned = pinned((uintptr_t)dst, bytes, stream->context);
  if (!to_pinned) {
    if (CUresult r = capture_allows_unsafe_call()) return r;
  }
  enqueue(*stream, copy_to_host(dst, src, bytes));
  if (!to_pinned && stream->capture == CAPTURE_NONE) wait_idle(l.lock, *stream);
  return driver.poisoned.empty() ? SUCCESS : ILLEGAL_ADDRESS;
}

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t bytes) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  if (CUresult r = check_device_range(dst, bytes)) return r;
  Op op;
  op.what = "a memset";
  op.device = std::vector<DeviceRange>{{dst, bytes}};
  op.work = [value, bytes](const std::vector<unsigned char *> &p, std::string &) {
    if (bytes) std::memset(p[0], value, bytes);
  };
  // On device memory it may return before it is done, on the legacy stream.
  enqueue(*current()->legacy, std::move(op));
  return SUCCESS;
}

CUresult cuStreamCreate(Stream **handle, unsigned flags) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (!handle) return INVALID_VALUE;
  std::shared_ptr<Stream> stream = new_stream(current());
  stream->blocking = !(flags & 1 /* CU_STREAM_NON_BLOCKING */);
  driver.streams[stream.get()] = stream;
  *handle = stream.get();
  return SUCCESS;
}

CUresult cuStreamDestroy_v2(Stream *handle) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  auto it = driver.streams.find(handle);
  if (it == driver.streams.end()) return INVALID_HANDLE;
  retire(it->second);
  driver.streams.erase(it);
  return SUCCESS;
}

CUresult cuStreamSynchronize(void *handle) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(handle, stream)) return r;
  if (stream->capture != CAPTURE_NONE) {
    stream->capture = CAPTURE_INVALIDATED;
    return STREAM_CAPTURE_UNSUPPORTED;
  }
  if (CUresult r = capture_allows_unsafe_call()) return r;
  wait_idle(l.lock, *stream);
  return driver.poisoned.empty() ? SUCCESS : ILLEGAL_ADDRESS;
}

CUresult cuStreamGetCtx(void *handle, Context **context) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (!context) return INVALID_VALUE;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(handle, stream)) return r;
  *context = stream->context;
  return SUCCESS;
}

CUresult cuStreamIsCapturing(void *handle, int *status) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (!status) return INVALID_VALUE;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(handle, stream)) return r;
  // The legacy stream cannot be asked while a blocking stream it would wait for is captured.
  if ((uintptr_t)handle == 0 || (uintptr_t)handle == STREAM_LEGACY) {
    bool implicit = false;
    each_stream([&](Stream &other) {
      if (other.context == stream->context && other.blocking && other.capture == CAPTURE_ACTIVE) {
        implicit = true;
      }
    });
    if (implicit) return STREAM_CAPTURE_IMPLICIT;
  }
  *status = stream->capture;
  return SUCCESS;
}

CUresult cuStreamBeginCapture_v2(void *handle, int mode) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(handle, stream)) return r;
  if ((uintptr_t)handle <= STREAM_LEGACY) return STREAM_CAPTURE_UNSUPPORTED;
  if (stream->capture != CAPTURE_NONE) return STREAM_CAPTURE_UNSUPPORTED;
  if (mode < MODE_GLOBAL || mode > MODE_RELAXED) return INVALID_VALUE;
  stream->capture = CAPTURE_ACTIVE;
  stream->capture_mode = mode;
  stream->capture_thread = std::this_thread::get_id();
  stream->captured.clear();
  return SUCCESS;
}

CUresult cuThreadExchangeStreamCaptureMode(int *mode) {
  if (!mode || *mode < MODE_GLOBAL || *mode > MODE_RELAXED) return INVALID_VALUE;
  std::swap(*mode, thread_capture_mode);
  return SUCCESS;
}

CUresult cuStreamEndCapture(void *handle, Graph **graph) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (!graph) return INVALID_VALUE;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(handle, stream)) return r;
  if (stream->capture == CAPTURE_NONE) return STREAM_CAPTURE_UNMATCHED;
  bool invalidated = stream->capture == CAPTURE_INVALIDATED;
  stream->capture = CAPTURE_NONE;
  if (invalidated) {
    stream->captured.clear();
    *graph = nullptr;
    return STREAM_CAPTURE_INVALIDATED;
  }
  Graph *made = new Graph{std::move(stream->captured)};
  stream->captured.clear();
  driver.graphs.insert(made);
  *graph = made;
  return SUCCESS;
}

CUresult cuGraphDestroy(Graph *graph) {
  Locked l;
  if (!driver.graphs.erase(graph)) return INVALID_VALUE;
  delete graph;
  return SUCCESS;
}

CUresult cuEventCreate(Event **handle, unsigned flags) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (!handle) return INVALID_VALUE;
  auto event = std::make_shared<Event>();
  event->context = current();
  event->timing = (flags & EVENT_DISABLE_TIMING) == 0;
  driver.events[event.get()] = event;
  *handle = event.get();
  return SUCCESS;
}

CUresult cuEventDestroy_v2(Event *handle) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  std::shared_ptr<Event> event = event_of(handle);
  if (!event) return INVALID_HANDLE;
  driver.retired.push_back(event);
  driver.events.erase(handle);
  return SUCCESS;
}

CUresult cuEventRecord(Event *handle, void *stream_handle) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  std::shared_ptr<Event> event = event_of(handle);
  if (!event) return INVALID_HANDLE;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(stream_handle, stream)) return r;
  if (stream->context != event->context) return INVALID_HANDLE;
  Op op;
  op.what = "an event record";
  if (stream->capture == CAPTURE_NONE) {
    event->latest = std::make_shared<Record>();
    op.completes = event->latest;
  }
  enqueue(*stream, std::move(op));
  return SUCCESS;
}

CUresult cuEventSynchronize(Event *handle) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  std::shared_ptr<Event> event = event_of(handle);
  if (!event) return INVALID_HANDLE;
  std::shared_ptr<Record> until = event->latest;
  if (until) driver.changed.wait(l.lock, [&] { return until->done; });
  return driver.poisoned.empty() ? SUCCESS : ILLEGAL_ADDRESS;
}

CUresult cuEventQuery(Event *handle) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  std::shared_ptr<Event> event = event_of(handle);
  if (!event) return INVALID_HANDLE;
  return !event->latest || event->latest->done ? SUCCESS : NOT_READY;
}

CUresult cuEventElapsedTime(float *ms, Event *start_handle, Event *end_handle) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (!ms) return INVALID_VALUE;
  std::shared_ptr<Event> start = event_of(start_handle), end = event_of(end_handle);
  if (!start || !end) return INVALID_HANDLE;
  if (!start->timing || !end->timing) return INVALID_HANDLE;
  if (!start->latest || !end->latest) return INVALID_HANDLE;
  if (!start->latest->done || !end->latest->done) return NOT_READY;
  *ms = std::chrono::duration<float, std::milli>(end->latest->done_at - start->latest->done_at)
            .count();
  return SUCCESS;
}

CUresult cuStreamWaitEvent(void *stream_handle, Event *handle, unsigned flags) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (flags != 0) return INVALID_VALUE;
  std::shared_ptr<Event> event = event_of(handle);
  if (!event) return INVALID_HANDLE;
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(stream_handle, stream)) return r;
  Op op;
  op.what = "a wait for an event";
  op.waits_for = event->latest;
  enqueue(*stream, std::move(op));
  return SUCCESS;
}

CUresult cuModuleLoadData(Module **module, const void *image) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  if (!module || !image) return INVALID_VALUE;
  std::string ptx((const char *)image);
  if (ptx.find(".version") == std::string::npos || ptx.find(".target") == std::string::npos) {
    return INVALID_IMAGE;
  }
  Module *loaded = new Module{current(), {}};
  for (size_t at = ptx.find(".entry "); at != std::string::npos;
       at = ptx.find(".entry ", at + 1)) {
    size_t start = at + 7, end = ptx.find_first_of("( \t\n", start);
    loaded->entries.insert(ptx.substr(start, end - start));
  }
  driver.modules.insert(loaded);
  *module = loaded;
  return SUCCESS;
}

CUresult cuModuleUnload(Module *module) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (CUresult r = capture_allows_unsafe_call()) return r;
  if (!driver.modules.erase(module)) return INVALID_HANDLE;
  forget_functions_of(module);
  delete module;
  return SUCCESS;
}

CUresult cuModuleGetFunction(Function **function, Module *module, const char *name) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (!function || !name) return INVALID_VALUE;
  if (!driver.modules.count(module)) return INVALID_HANDLE;
  if (!module->entries.count(name)) return NOT_FOUND;
  Function made{module, KernelKind::Convert};
  std::string wanted(name);
  if (wanted == "strata_test_checksum") {
    made.kind = KernelKind::Checksum;
  } else if (wanted == "strata_test_spin") {
    made.kind = KernelKind::Spin;
  } else {
    const KernelEntry *entry = nullptr;
    for (const KernelEntry &e : KERNELS) {
      if (wanted == e.name) entry = &e;
    }
    if (!entry) return NOT_FOUND; // in the PTX, but not emulated
    made.kind = entry->kind;
    made.convert = entry->convert;
    made.groups_kernel = entry->groups_kernel;
    made.absmax = entry->absmax;
    made.quantize = entry->quantize;
    made.src_size = entry->src_size;
    made.dst_size = entry->dst_size;
    made.scaled_source = entry->fp8;
  }
  Function *f = new Function(made);
  driver.functions.insert(f);
  *function = f;
  return SUCCESS;
}

CUresult cuLaunchKernel(Function *function, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                        unsigned block_x, unsigned block_y, unsigned block_z, unsigned,
                        void *stream_handle, void **params, void **extra) {
  Locked l;
  if (CUresult r = ready_in_context()) return r;
  if (!driver.functions.count(function)) return INVALID_HANDLE;
  if (function->module->context != current()) return INVALID_HANDLE;
  if (grid_x == 0 || grid_y != 1 || grid_z != 1 || block_x == 0 || block_x > 1024 ||
      block_y != 1 || block_z != 1 || extra != nullptr || params == nullptr) {
    return INVALID_VALUE;
  }
  std::shared_ptr<Stream> stream;
  if (CUresult r = resolve(stream_handle, stream)) return r;
  auto param = [&](int i) { return *(const unsigned long long *)params[i]; };
  Op op;
  Function f = *function;
  switch (f.kind) {
  case KernelKind::Convert: {
    unsigned long long src = param(0), dst = param(1), scales = param(2), numel = param(3),
                       row_len = param(4);
    bool scaled = f.scaled_source && scales != 0;
    op.what = "a conversion kernel";
    op.device = std::vector<DeviceRange>{{src, bytes_of(numel, f.src_size)},
                                         {dst, bytes_of(numel, f.dst_size)}};
    if (scaled) op.device.push_back({scales, bytes_of(groups_of(numel, row_len), 4)});
    op.work = [f, grid_x, block_x, numel, row_len, scaled](const std::vector<unsigned char *> &p,
                                                          std::string &) {
      const float *scales = scaled ? (const float *)p[2] : nullptr;
      run_grid(grid_x, block_x, [&] { f.convert(p[0], p[1], scales, numel, row_len); });
    };
    break;
  }
  case KernelKind::AbsmaxClear:
  case KernelKind::Scales: {
    unsigned long long words = param(0), groups = param(1);
    op.what = f.kind == KernelKind::Scales ? "a scales kernel" : "an absmax clearing kernel";
    op.device = std::vector<DeviceRange>{{words, bytes_of(groups, 4)}};
    op.work = [f, grid_x, block_x, groups](const std::vector<unsigned char *> &p, std::string &) {
      run_grid(grid_x, block_x, [&] { f.groups_kernel((strata_u32 *)p[0], groups); });
    };
    break;
  }
  case KernelKind::Absmax:
  case KernelKind::Quantize: {
    // absmax: (src, src_scales, absmax, numel, src_row_len, row_len);
    // quantize: (src, src_scales, dst, scales, numel, src_row_len, row_len).
    bool quantize = f.kind == KernelKind::Quantize;
    int at = quantize ? 4 : 3;
    unsigned long long src = param(0), src_scales = param(1), out = param(2),
                       numel = param(at), src_row_len = param(at + 1), row_len = param(at + 2);
    unsigned long long scales = quantize ? param(3) : 0;
    bool scaled = f.scaled_source && src_scales != 0;
    op.what = quantize ? "a quantization kernel" : "an absmax kernel";
    op.device = std::vector<DeviceRange>{{src, bytes_of(numel, f.src_size)}};
    unsigned long long groups = groups_of(numel, row_len);
    op.device.push_back({out, quantize ? bytes_of(numel, 1) : bytes_of(groups, 4)});
    if (quantize) op.device.push_back({scales, bytes_of(groups, 4)});
    if (scaled) op.device.push_back({src_scales, bytes_of(groups_of(numel, src_row_len), 4)});
    op.work = [f, grid_x, block_x, numel, src_row_len, row_len, scaled,
               quantize](const std::vector<unsigned char *> &p, std::string &) {
      const float *src_scales = scaled ? (const float *)p[quantize ? 3 : 2] : nullptr;
      run_grid(grid_x, block_x, [&] {
        if (quantize) {
          f.quantize(p[0], src_scales, p[1], (const float *)p[2], numel, src_row_len, row_len);
        } else {
          f.absmax(p[0], src_scales, (strata_u32 *)p[1], numel, src_row_len, row_len);
        }
      });
    };
    break;
  }
  case KernelKind::Checksum: {
    unsigned long long data = param(0), words = param(1), out = param(2);
    op.what = "the checksum kernel";
    op.device = std::vector<DeviceRange>{{data, bytes_of(words, 4)}, {out, 4}};
    op.work = [words](const std::vector<unsigned char *> &p, std::string &) {
      unsigned sum = 0;
      for (unsigned long long i = 0; i < words; i++) {
        unsigned word;
        std::memcpy(&word, p[0] + 4 * i, 4);
        sum += word * (unsigned)(2 * i + 1);
      }
      unsigned total;
      std::memcpy(&total, p[1], 4);
      total += sum;
      std::memcpy(p[1], &total, 4);
    };
    break;
  }
  case KernelKind::Spin: {
    unsigned long long cycles = param(0);
    op.what = "the spin kernel";
    // At the 1 GHz this emulated device pretends to run.
    op.work = [cycles](const std::vector<unsigned char *> &, std::string &) {
      std::this_thread::sleep_for(std::chrono::nanoseconds(cycles));
    };
    break;
  }
  }
  for (const DeviceRange &range : op.device) {
    if (range.len == 0) continue;
    auto allocation = allocation_of(range.address, range.len);
    char why[200] = "";
    if (allocation == driver.allocations.end()) {
      std::snprintf(why, sizeof why, "%s was launched on 0x%llx + %zu, outside live device memory",
                    op.what, range.address, range.len);
    } else if (allocation->second.device != stream->context->device) {
      std::snprintf(why, sizeof why,
                    "%s on device %d was launched on 0x%llx + %zu, memory of device %d (no peer "
                    "access)",
                    op.what, stream->context->device, range.address, range.len,
                    allocation->second.device);
    }
    if (*why) {
      poison(l.lock, why);
      return SUCCESS; // a kernel's bad access shows at the next synchronising call
    }
  }
  enqueue(*stream, std::move(op));
  return SUCCESS;
}

} // extern "C"
