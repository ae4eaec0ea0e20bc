/*
 * engine.cpp: a C++ engine's forward pass through strata, with strata.hpp.
 *
 * Registers an 8-layer MLP (64x64 f32 weights and biases) kept in RAM as bf16 and computed in
 * f32, under a budget with room for about half of it; runs three passes of x <- relu(W x + b)
 * with an acquire guard per layer, checks the result against the same passes computed from the
 * bf16-rounded weights directly, shrinks the budget mid-run, shows a log callback and an error as
 * an exception, and prints the figures.
 *
 * Build (after scripts/install.sh --prefix PREFIX, with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig):
 *   c++ -std=c++17 examples-cpp/engine.cpp $(pkg-config --cflags --libs strata) \
 *       -Wl,-rpath,PREFIX/lib -o engine
 */

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "strata.hpp"

namespace {

constexpr int64_t kWidth = 64;
constexpr int kLayers = 8;
constexpr int kPasses = 3;

/* bf16 keeps the top 16 bits of an f32 (rounded to nearest even): what the offload tier stores. */
float round_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

struct Layer {
  std::vector<float> weight, bias;
};

Layer make_layer(int index) {
  Layer layer{std::vector<float>(kWidth * kWidth), std::vector<float>(kWidth)};
  uint32_t state = 2654435761u * static_cast<uint32_t>(index + 1);
  for (float &w : layer.weight) {
    state = state * 1664525u + 1013904223u;
    w = (static_cast<float>(state >> 8) / 16777216.0f - 0.5f) * 0.25f;
  }
  for (int64_t i = 0; i < kWidth; i++) {
    layer.bias[static_cast<size_t>(i)] = 0.01f * static_cast<float>(index - i % 3);
  }
  return layer;
}

/* x <- relu(W x + b), W row-major kWidth x kWidth. */
void forward(const float *weight, const float *bias, std::vector<float> &x) {
  std::vector<float> y(static_cast<size_t>(kWidth));
  for (int64_t r = 0; r < kWidth; r++) {
    float sum = bias[r];
    for (int64_t c = 0; c < kWidth; c++) {
      sum += weight[r * kWidth + c] * x[static_cast<size_t>(c)];
    }
    y[static_cast<size_t>(r)] = sum > 0.0f ? sum : 0.0f;
  }
  x.swap(y);
}

}  // namespace

int main() {
  try {
    std::vector<Layer> model;
    for (int i = 0; i < kLayers; i++) {
      model.push_back(make_layer(i));
    }

    /* One layer holds bf16 resident bytes and f32 computation bytes on the device: room for the
       one in use plus three resident ones. */
    const uint64_t layer_bf16 = static_cast<uint64_t>((kWidth * kWidth + kWidth) * 2);
    const uint64_t layer_in_use = 3 * layer_bf16;
    const uint64_t budget = layer_in_use + 3 * layer_bf16 + 1024;

    uint64_t messages[5] = {0, 0, 0, 0, 0};
    strata_options options = strata_options_default();
    options.vram_limit = budget;
    strata::context ctx(options, [&messages](uint32_t level, const char *message) {
      if (level <= STRATA_LOG_DEBUG) {
        messages[level]++;
      }
      if (level <= STRATA_LOG_INFO) {
        std::printf("  log %u: %s\n", level, message);
      }
    });

    strata_tiers tiers = strata_tiers_default();
    tiers.offload.dtype = STRATA_DTYPE_BF16;
    tiers.preparing.dtype = STRATA_DTYPE_BF16;
    tiers.computation.dtype = STRATA_DTYPE_F32;
    strata::group mlp = ctx.create_group("mlp", tiers);

    std::vector<uint64_t> layers;
    const int64_t weight_shape[2] = {kWidth, kWidth};
    const int64_t bias_shape[1] = {kWidth};
    for (int i = 0; i < kLayers; i++) {
      std::vector<strata_host_tensor> tensors = {
          {"weight", STRATA_DTYPE_F32, 2, weight_shape, model[static_cast<size_t>(i)].weight.data()},
          {"bias", STRATA_DTYPE_F32, 1, bias_shape, model[static_cast<size_t>(i)].bias.data()},
      };
      layers.push_back(mlp.register_host("mlp." + std::to_string(i), tensors));
    }

    std::vector<float> x(static_cast<size_t>(kWidth), 0.5f);
    std::vector<float> expected = x;
    for (int pass = 0; pass < kPasses; pass++) {
      if (pass == 2) {
        /* The renderer needs memory back: shrink the budget to one layer in use. */
        ctx.set_vram_limit(layer_in_use);
        std::printf("pass 2: vram_limit now %" PRIu64 " bytes, %" PRIu64 " held\n",
                    ctx.stats().vram_limit, ctx.stats().vram_in_use);
      }
      for (uint64_t layer : layers) {
        strata::acquired views = ctx.acquire(layer);
        const strata_tensor_view *weight = views.find("weight");
        const strata_tensor_view *bias = views.find("bias");
        if (views.size() != 2 || weight == nullptr || bias == nullptr || weight->dtype != STRATA_DTYPE_F32 ||
            weight->nbytes != static_cast<uint64_t>(kWidth * kWidth) * sizeof(float)) {
          std::fprintf(stderr, "unexpected views for layer %" PRIu64 "\n", layer);
          return 1;
        }
        forward(static_cast<const float *>(weight->data), static_cast<const float *>(bias->data), x);
      } /* the guard releases the layer here */
      for (const Layer &layer : model) {
        std::vector<float> w(layer.weight.size()), b(layer.bias.size());
        for (size_t i = 0; i < w.size(); i++) w[i] = round_to_bf16(layer.weight[i]);
        for (size_t i = 0; i < b.size(); i++) b[i] = round_to_bf16(layer.bias[i]);
        forward(w.data(), b.data(), expected);
      }
    }
    for (size_t i = 0; i < x.size(); i++) {
      if (x[i] != expected[i]) {
        std::fprintf(stderr, "x[%zu] = %g, expected %g\n", i, static_cast<double>(x[i]),
                     static_cast<double>(expected[i]));
        return 1;
      }
    }

    /* A made-up id is an exception carrying the status and the library's message. */
    bool threw = false;
    try {
      ctx.acquire(layers[0] ^ 0x5A5A0000);
    } catch (const strata::error &e) {
      threw = e.status() == STRATA_ERR_INVALID_HANDLE;
      std::printf("a made-up layer id: %s\n", e.what());
    }

    strata_stats stats = ctx.stats();
    std::printf("%d passes of %d layers: %" PRIu64 " acquires, %" PRIu64 " resident hits, %" PRIu64
                " misses, %" PRIu64 " evictions\n",
                kPasses, kLayers, stats.acquires, stats.resident_hits, stats.misses, stats.evictions);
    std::printf("device: peak %" PRIu64 " of budget %" PRIu64 " bytes, %" PRIu64 " held now (limit %" PRIu64 ")\n",
                stats.vram_peak, budget, stats.vram_in_use, stats.vram_limit);
    std::printf("log: %" PRIu64 " warn, %" PRIu64 " info, %" PRIu64 " debug messages\n", messages[STRATA_LOG_WARN],
                messages[STRATA_LOG_INFO], messages[STRATA_LOG_DEBUG]);
    std::printf("result: bit-identical to the bf16 reference (x[0] = %.6f)\n", static_cast<double>(x[0]));

    const bool ok = threw && stats.acquires == static_cast<uint64_t>(kPasses * kLayers) &&
                    stats.vram_peak <= budget && stats.vram_in_use <= layer_in_use &&
                    stats.vram_limit == layer_in_use && stats.evictions > 0 && messages[STRATA_LOG_DEBUG] > 0 &&
                    messages[STRATA_LOG_INFO] > 0;
    if (!ok) {
      std::fprintf(stderr, "engine: a figure is off (see above)\n");
      return 1;
    }
    std::printf("engine: OK\n");
    return 0;
  } catch (const strata::error &e) {
    std::fprintf(stderr, "engine: %s\n", e.what());
    return 1;
  }
}
