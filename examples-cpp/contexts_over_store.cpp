/*
 * contexts_over_store.cpp: two contexts (one per GPU, in a real program) over one host store,
 * with strata.hpp.
 *
 * Writes model.safetensors in the current directory (3 blocks, each a u8 weight [128, 128]), then
 * streams every block through RAM in two contexts attached to one strata::store: each block is
 * read from the file once and held once, and both contexts' views point into that copy. Checks
 * every byte and the store's counters, and shows a second attach as an exception.
 */

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "strata.hpp"

namespace {

constexpr int kBlocks = 3;
constexpr size_t kSide = 128;
constexpr size_t kBlockBytes = kSide * kSide;

unsigned char expected_byte(int block, size_t at) {
  return static_cast<unsigned char>((static_cast<size_t>(block) * 7 + at / kSide + at % kSide) % 251);
}

/* safetensors: 8 bytes of header length (little-endian), the JSON header, the data. */
bool write_checkpoint(const std::string &path) {
  std::string header = "{";
  for (int i = 0; i < kBlocks; i++) {
    header += (i == 0 ? "\"blocks." : ",\"blocks.") + std::to_string(i) +
              ".weight\":{\"dtype\":\"U8\",\"shape\":[" + std::to_string(kSide) + "," +
              std::to_string(kSide) + "],\"data_offsets\":[" + std::to_string(i * kBlockBytes) +
              "," + std::to_string((i + 1) * kBlockBytes) + "]}";
  }
  header += "}";
  header.resize((header.size() + 7) / 8 * 8, ' ');
  std::ofstream file(path, std::ios::binary);
  for (int b = 0; b < 8; b++) {
    file.put(static_cast<char>((static_cast<uint64_t>(header.size()) >> (8 * b)) & 0xff));
  }
  file << header;
  for (int i = 0; i < kBlocks; i++) {
    for (size_t at = 0; at < kBlockBytes; at++) {
      file.put(static_cast<char>(expected_byte(i, at)));
    }
  }
  return static_cast<bool>(file.flush());
}

/* A CPU context over `shared`. */
strata::context context_over(const strata::store &shared) {
  strata_options options = strata_options_default();
  options.vram_limit = 0;
  strata::context ctx(options);
  ctx.attach_store(shared);
  return ctx;
}

/* The model's blocks in `ctx`, streamed from the file through the onload tier in RAM. */
strata::group register_model(strata::context &ctx, const std::string &model) {
  strata_tiers tiers = strata_tiers_default();
  tiers.offload.device = STRATA_DEVICE_DISK;
  tiers.onload.device = STRATA_DEVICE_CPU;
  strata::group group = ctx.create_group("model", tiers);
  group.register_checkpoint_prefix(ctx.open_checkpoint(model), "blocks.", 2);
  return group;
}

}  // namespace

int main() {
  try {
    const std::string model = "model.safetensors";
    if (!write_checkpoint(model)) {
      std::fprintf(stderr, "writing %s failed\n", model.c_str());
      return 1;
    }
    strata::store shared;  // within this process; strata_store_options.name for several
    strata::context contexts[2] = {context_over(shared), context_over(shared)};
    strata::group groups[2] = {register_model(contexts[0], model), register_model(contexts[1], model)};
    bool exact = true;
    for (int i = 0; i < kBlocks; i++) {
      const void *addresses[2] = {nullptr, nullptr};
      for (int c = 0; c < 2; c++) {
        strata::acquired views = contexts[c].acquire(contexts[c].find_layer("blocks." + std::to_string(i)));
        const auto *bytes = static_cast<const unsigned char *>(views[0].data);
        exact = exact && views.size() == 1 && views[0].nbytes == kBlockBytes;
        for (size_t at = 0; at < kBlockBytes && exact; at++) {
          exact = bytes[at] == expected_byte(i, at);
        }
        addresses[c] = views[0].data;
      }
      exact = exact && addresses[0] == addresses[1];
    }

    bool threw = false;
    try {
      contexts[0].attach_store(shared);
    } catch (const strata::error &e) {
      threw = e.status() == STRATA_ERR_STATE;
      std::printf("a second attach: %s\n", e.what());
    }

    strata_store_stats stats = shared.stats();
    const uint64_t read = contexts[0].stats().bytes_from_disk + contexts[1].stats().bytes_from_disk;
    std::printf("store: %" PRIu64 " layers, %" PRIu64 " fills, %" PRIu64 " shared; contexts read %" PRIu64
                " bytes from disk\n",
                stats.layers, stats.fills, stats.shared, read);
    if (!exact || !threw || stats.layers != kBlocks || stats.fills != kBlocks || stats.shared != kBlocks ||
        read != kBlocks * kBlockBytes) {
      std::fprintf(stderr, "contexts_over_store: a byte or a figure is off (see above)\n");
      return 1;
    }
    std::printf("contexts_over_store: OK\n");
    return 0;
  } catch (const strata::error &e) {
    std::fprintf(stderr, "contexts_over_store: %s\n", e.what());
    return 1;
  }
}
