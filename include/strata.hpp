/*
 * strata.hpp: C++17 wrappers over strata.h, header-only.
 *
 * RAII owners for the context, its groups and checkpoints, host stores, and an acquire guard that
 * releases the layer when it goes out of scope; failures throw strata::error (the status and the
 * library's message). The types are move-only, and nothing here changes the C ABI: get() gives
 * the C handle for any call not wrapped here.
 *
 *   strata::context ctx(options);                      // strata_context_create / _destroy
 *   strata::group dit = ctx.create_group("dit", tiers); // strata_group_create / _destroy
 *   uint64_t layer = dit.register_host("blocks.0", tensors);
 *   {
 *     strata::acquired views = ctx.acquire(layer, stream);
 *     for (const strata_tensor_view &v : views) { ... }  // also views[i], views.find("weight")
 *   }                                                    // strata_release
 *
 * Destroy groups and checkpoints before their context (declare them after it). A group outliving
 * its context is harmless: its destructor's call is refused as a stale handle.
 */

#ifndef STRATA_HPP
#define STRATA_HPP

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "strata.h"

namespace strata {

/* This thread's last error message (see strata_last_error). */
inline std::string last_error() {
  std::vector<char> buffer(strata_last_error(nullptr, 0) + 1);
  size_t length = strata_last_error(buffer.data(), buffer.size());
  return std::string(buffer.data(), length < buffer.size() ? length : buffer.size() - 1);
}

/* A failed call: status() is its strata_status, what() "STATUS_NAME: the library's message". */
class error : public std::runtime_error {
 public:
  error(strata_status status, const std::string &message)
      : std::runtime_error(std::string(strata_status_name(status)) + ": " + message), status_(status) {}
  strata_status status() const noexcept { return status_; }
  const char *name() const noexcept { return strata_status_name(status_); }

 private:
  strata_status status_;
};

/* Throws strata::error unless status is STRATA_OK. */
inline void check(strata_status status) {
  if (status != STRATA_OK) {
    throw error(status, last_error());
  }
}

/* A layer in use, from acquire until this guard is released or destroyed. A range of its views:
   begin/end/size/operator[], in the order the layer's tensors were registered. */
class acquired {
 public:
  using value_type = strata_tensor_view;
  using const_iterator = const strata_tensor_view *;

  acquired(acquired &&other) noexcept
      : ctx_(std::exchange(other.ctx_, nullptr)), layer_(other.layer_), stream_(other.stream_),
        views_(std::move(other.views_)) {}
  acquired &operator=(acquired &&other) noexcept {
    if (this != &other) {
      reset();
      ctx_ = std::exchange(other.ctx_, nullptr);
      layer_ = other.layer_;
      stream_ = other.stream_;
      views_ = std::move(other.views_);
    }
    return *this;
  }
  acquired(const acquired &) = delete;
  acquired &operator=(const acquired &) = delete;
  /* Releases the layer; a failure here cannot throw and is left in strata_last_error. */
  ~acquired() { reset(); }

  /* Releases the layer now, throwing on failure; the views are invalid afterwards. */
  void release() {
    strata_context *ctx = std::exchange(ctx_, nullptr);
    views_.clear();
    if (ctx != nullptr) {
      check(strata_release(ctx, layer_, stream_));
    }
  }

  uint64_t layer() const noexcept { return layer_; }
  const_iterator begin() const noexcept { return views_.data(); }
  const_iterator end() const noexcept { return views_.data() + views_.size(); }
  size_t size() const noexcept { return views_.size(); }
  bool empty() const noexcept { return views_.empty(); }
  const strata_tensor_view &operator[](size_t i) const noexcept { return views_[i]; }
  /* The view of the tensor named `name`, or nullptr. */
  const strata_tensor_view *find(const std::string &name) const noexcept {
    for (const strata_tensor_view &view : views_) {
      if (name == view.name) {
        return &view;
      }
    }
    return nullptr;
  }

 private:
  friend class context;
  acquired(strata_context *ctx, uint64_t layer, void *stream) : layer_(layer), stream_(stream) {
    size_t count = 0;
    check(strata_layer_tensor_count(ctx, layer, &count));
    views_.resize(count);
    check(strata_acquire_for_compute(ctx, layer, stream, views_.data(), views_.size(), &count));
    views_.resize(count);
    ctx_ = ctx;
  }
  void reset() noexcept {
    if (ctx_ != nullptr) {
      (void)strata_release(ctx_, layer_, stream_);
      ctx_ = nullptr;
    }
    views_.clear();
  }

  strata_context *ctx_ = nullptr;
  uint64_t layer_ = 0;
  void *stream_ = nullptr;
  std::vector<strata_tensor_view> views_;
};

/* An open checkpoint (strata_checkpoint_open / _close). Layers registered from it stay valid after
   it is closed. */
class checkpoint {
 public:
  checkpoint(checkpoint &&other) noexcept : ckpt_(std::exchange(other.ckpt_, nullptr)) {}
  checkpoint &operator=(checkpoint &&other) noexcept {
    if (this != &other) {
      strata_checkpoint_close(ckpt_);
      ckpt_ = std::exchange(other.ckpt_, nullptr);
    }
    return *this;
  }
  checkpoint(const checkpoint &) = delete;
  checkpoint &operator=(const checkpoint &) = delete;
  ~checkpoint() { strata_checkpoint_close(ckpt_); }

  strata_checkpoint *get() const noexcept { return ckpt_; }

 private:
  friend class context;
  explicit checkpoint(strata_checkpoint *ckpt) noexcept : ckpt_(ckpt) {}
  strata_checkpoint *ckpt_ = nullptr;
};

/* A group of layers with its tiers (strata_group_create / _destroy). */
class group {
 public:
  group(group &&other) noexcept : ctx_(std::exchange(other.ctx_, nullptr)), id_(other.id_) {}
  group &operator=(group &&other) noexcept {
    if (this != &other) {
      reset();
      ctx_ = std::exchange(other.ctx_, nullptr);
      id_ = other.id_;
    }
    return *this;
  }
  group(const group &) = delete;
  group &operator=(const group &) = delete;
  /* Destroys the group and its layers; a failure (a layer still in use) is left in
     strata_last_error. */
  ~group() { reset(); }

  uint64_t id() const noexcept { return id_; }
  void onload() { check(strata_group_onload(ctx_, id_)); }
  void offload() { check(strata_group_offload(ctx_, id_)); }

  /* Registers a layer from host tensors (their bytes are copied); returns its id. */
  uint64_t register_host(const std::string &layer, const std::vector<strata_host_tensor> &tensors) {
    uint64_t id = 0;
    check(strata_layer_register_host(ctx_, id_, layer.c_str(), tensors.data(), tensors.size(), &id));
    return id;
  }
  /* Registers the named tensors of `ckpt` as one layer; returns its id. */
  uint64_t register_checkpoint(const checkpoint &ckpt, const std::string &layer,
                               const std::vector<std::string> &tensor_names) {
    std::vector<const char *> names;
    names.reserve(tensor_names.size());
    for (const std::string &name : tensor_names) {
      names.push_back(name.c_str());
    }
    uint64_t id = 0;
    check(strata_layer_register_checkpoint(ctx_, id_, ckpt.get(), layer.c_str(), names.data(),
                                           names.size(), &id));
    return id;
  }
  /* Registers every tensor under `prefix`, grouped into layers (see
     strata_group_register_checkpoint); returns the number of layers. */
  size_t register_checkpoint_prefix(const checkpoint &ckpt, const std::string &prefix,
                                    uint32_t keep_components) {
    size_t n = 0;
    check(strata_group_register_checkpoint(ctx_, id_, ckpt.get(), prefix.c_str(), keep_components, &n));
    return n;
  }

 private:
  friend class context;
  group(strata_context *ctx, uint64_t id) noexcept : ctx_(ctx), id_(id) {}
  void reset() noexcept {
    if (ctx_ != nullptr) {
      (void)strata_group_destroy(ctx_, id_);
      ctx_ = nullptr;
    }
  }

  strata_context *ctx_ = nullptr;
  uint64_t id_ = 0;
};

/* A host store (strata_store_create / _destroy): one host copy of each checkpoint layer, read
   once, for every context attached to it (one per GPU); named (options.name), for every process
   of the machine. Thread-safe. Contexts attached keep the store after this handle goes. */
class store {
 public:
  explicit store(const strata_store_options &options = strata_store_options_default()) {
    check(strata_store_create(&options, &store_));
  }
  store(store &&other) noexcept : store_(std::exchange(other.store_, nullptr)) {}
  store &operator=(store &&other) noexcept {
    if (this != &other) {
      strata_store_destroy(store_);
      store_ = std::exchange(other.store_, nullptr);
    }
    return *this;
  }
  store(const store &) = delete;
  store &operator=(const store &) = delete;
  ~store() { strata_store_destroy(store_); }

  strata_store *get() const noexcept { return store_; }

  strata_store_stats stats() const {
    strata_store_stats stats{};
    stats.struct_size = sizeof stats;
    check(strata_store_stats_get(store_, &stats));
    return stats;
  }

 private:
  strata_store *store_ = nullptr;
};

/* One compute device, its budget and everything registered on it (strata_context_create /
   _destroy). Thread-safe like the C context: share it by reference. */
class context {
 public:
  /* Receives log messages: (STRATA_LOG_ERROR.._DEBUG, message). Called on a thread calling strata,
     outside strata's locks; it may call strata. An exception it throws is dropped (it cannot
     cross the C ABI). */
  using log_function = std::function<void(uint32_t level, const char *message)>;

  explicit context(strata_options options = strata_options_default()) {
    check(strata_context_create(&options, &ctx_));
  }
  /* As above, with `log` receiving the log messages (in place of options.log_fn). */
  context(strata_options options, log_function log) : log_(std::make_unique<log_function>(std::move(log))) {
    options.log_fn = &context::deliver_log;
    options.log_user = log_.get();
    check(strata_context_create(&options, &ctx_));
  }
  context(context &&other) noexcept
      : ctx_(std::exchange(other.ctx_, nullptr)), log_(std::move(other.log_)) {}
  context &operator=(context &&other) noexcept {
    if (this != &other) {
      strata_context_destroy(ctx_);
      ctx_ = std::exchange(other.ctx_, nullptr);
      log_ = std::move(other.log_);
    }
    return *this;
  }
  context(const context &) = delete;
  context &operator=(const context &) = delete;
  /* Destroys the context; views it handed out become invalid. The log function outlives it. */
  ~context() { strata_context_destroy(ctx_); }

  strata_context *get() const noexcept { return ctx_; }

  group create_group(const std::string &name, const strata_tiers &tiers = strata_tiers_default()) {
    uint64_t id = 0;
    check(strata_group_create(ctx_, name.c_str(), &tiers, &id));
    return group(ctx_, id);
  }
  checkpoint open_checkpoint(const std::string &path) {
    strata_checkpoint *ckpt = nullptr;
    check(strata_checkpoint_open(ctx_, path.c_str(), &ckpt));
    return checkpoint(ckpt);
  }
  /* Host copies read from checkpoints from now on come from `shared` (once per context). */
  void attach_store(const store &shared) { check(strata_context_attach_store(ctx_, shared.get())); }
  uint64_t find_layer(const std::string &name) const {
    uint64_t id = 0;
    check(strata_layer_find(ctx_, name.c_str(), &id));
    return id;
  }
  /* Acquires a layer for compute; released when the returned guard goes. `stream` is a CUstream
     (nullptr: CUDA's default stream; ignored on the CPU). */
  acquired acquire(uint64_t layer, void *stream = nullptr) { return acquired(ctx_, layer, stream); }

  strata_stats stats() const {
    strata_stats stats{};
    stats.struct_size = sizeof stats;
    check(strata_stats_get(ctx_, &stats));
    return stats;
  }
  /* The budget, live: unused layers are evicted down to it before this returns. */
  void set_vram_limit(uint64_t bytes) { check(strata_context_set_vram_limit(ctx_, bytes)); }
  void set_host_limit(uint64_t bytes) { check(strata_context_set_host_limit(ctx_, bytes)); }
  void write_trace(const std::string &path) { check(strata_trace_write(ctx_, path.c_str())); }

 private:
  static void deliver_log(void *user, uint32_t level, const char *message) noexcept {
    try {
      (*static_cast<log_function *>(user))(level, message);
    } catch (...) {
      /* Nowhere to report it: an exception must not unwind into strata. */
    }
  }

  strata_context *ctx_ = nullptr;
  /* On the heap, so the pointer strata holds stays valid when the context is moved. */
  std::unique_ptr<log_function> log_;
};

}  // namespace strata

#endif /* STRATA_HPP */
