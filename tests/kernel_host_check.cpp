// The conversion kernels of kernels/convert.cu compiled as host C++, for tests/kernels.rs: each
// kernel entry point is called once per thread of an emulated grid (its grid-stride loop and
// index → scale mapping included), and the output bytes are written for the test to compare
// with strata::convert::convert.
//
// Usage: kernel_host_check JOBS, where every line of the file JOBS is one job, either a launch
// of a conversion kernel:
//   convert KERNEL NUMEL ROW_LEN BLOCKS THREADS SRC SCALES DST
// KERNEL is an entry point's name (strata_convert_f8e4m3_to_bf16); SRC holds NUMEL source
// elements; SCALES holds the f32 scales, or is "-" for none (a NULL scales pointer); DST is
// written. Or an absmax quantization, the four launches src/backend/cuda makes in its order:
//   quantize SRC_DTYPE DST_DTYPE NUMEL GROUPS BLOCKS THREADS SRC SRC_SCALES DST DST_SCALES
// (dtypes as the kernels name them: bf16, f8e4m3); SRC_SCALES is "-" or the source's scales,
// one per NUMEL / count elements; DST and DST_SCALES (GROUPS f32 scales) are written.
// Prints "kernel_host_check: OK" last when every job ran.
//
// Only the C library is used, so that any C++ compiler can build it without extra runtimes.

#include "convert.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>

typedef void (*strata_kernel)(const unsigned char *, unsigned char *, const float *,
                              unsigned long long, unsigned long long);

struct kernel_entry {
  const char *name;
  strata_kernel kernel;
  size_t src_size;
  size_t dst_size;
};

#define ENTRY(SRC, SRC_SIZE, DST, DST_SIZE)                                                        \
  {"strata_convert_" #SRC "_to_" #DST, strata_convert_##SRC##_to_##DST, SRC_SIZE, DST_SIZE}

static const kernel_entry KERNELS[] = {
    ENTRY(f16, 2, f32, 4),       ENTRY(bf16, 2, f32, 4),      ENTRY(f8e4m3, 1, f32, 4),
    ENTRY(f8e5m2, 1, f32, 4),    ENTRY(f32, 4, f16, 2),       ENTRY(bf16, 2, f16, 2),
    ENTRY(f8e4m3, 1, f16, 2),    ENTRY(f8e5m2, 1, f16, 2),    ENTRY(f32, 4, bf16, 2),
    ENTRY(f16, 2, bf16, 2),      ENTRY(f8e4m3, 1, bf16, 2),   ENTRY(f8e5m2, 1, bf16, 2),
    ENTRY(f32, 4, f8e4m3, 1),    ENTRY(f16, 2, f8e4m3, 1),    ENTRY(bf16, 2, f8e4m3, 1),
    ENTRY(f8e4m3, 1, f8e4m3, 1), ENTRY(f8e5m2, 1, f8e4m3, 1), ENTRY(f32, 4, f8e5m2, 1),
    ENTRY(f16, 2, f8e5m2, 1),    ENTRY(bf16, 2, f8e5m2, 1),   ENTRY(f8e4m3, 1, f8e5m2, 1),
    ENTRY(f8e5m2, 1, f8e5m2, 1),
};

typedef void (*absmax_kernel)(const unsigned char *, const float *, strata_u32 *,
                              unsigned long long, unsigned long long, unsigned long long);
typedef void (*scales_kernel)(strata_u32 *, unsigned long long);
typedef void (*quantize_kernel)(const unsigned char *, const float *, unsigned char *,
                                const float *, unsigned long long, unsigned long long,
                                unsigned long long);

struct quant_source {
  const char *name;
  size_t size;
  absmax_kernel absmax;
  quantize_kernel to_f8e4m3, to_f8e5m2;
};

#define QUANT_SOURCE(SRC, SIZE)                                                                    \
  {#SRC, SIZE, strata_absmax_##SRC, strata_quantize_##SRC##_to_f8e4m3,                            \
   strata_quantize_##SRC##_to_f8e5m2}

static const quant_source QUANT_SOURCES[] = {
    QUANT_SOURCE(f32, 4),    QUANT_SOURCE(f16, 2),    QUANT_SOURCE(bf16, 2),
    QUANT_SOURCE(f8e4m3, 1), QUANT_SOURCE(f8e5m2, 1),
};

// Bytes written past the output, and f32 scales past the real ones, that no kernel may touch.
// The guard scales are NaNs: a kernel that read one would make NaN outputs, which the test sees.
static const size_t GUARD_BYTES = 64;
static const size_t GUARD_SCALES = 16;
static const unsigned char GUARD_BYTE = 0xA5;
static const unsigned int GUARD_SCALE_BITS = 0x7FA5A5A5u;

static void fail(const char *what, const char *detail) {
  std::fprintf(stderr, "kernel_host_check: %s: %s\n", what, detail);
  std::exit(1);
}

// The whole file, in memory from malloc (aligned for every element type).
static unsigned char *read_file(const char *path, size_t *len) {
  FILE *f = std::fopen(path, "rb");
  if (!f) {
    fail("cannot open", path);
  }
  std::fseek(f, 0, SEEK_END);
  long size = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  if (size < 0) {
    fail("cannot size", path);
  }
  unsigned char *bytes = (unsigned char *)std::malloc((size_t)size + 1);
  if (!bytes) {
    fail("out of memory reading", path);
  }
  if (size > 0 && std::fread(bytes, 1, (size_t)size, f) != (size_t)size) {
    fail("cannot read", path);
  }
  std::fclose(f);
  *len = (size_t)size;
  return bytes;
}

static void write_file(const char *path, const unsigned char *bytes, size_t len) {
  FILE *f = std::fopen(path, "wb");
  if (!f || (len > 0 && std::fwrite(bytes, 1, len, f) != len) || std::fclose(f) != 0) {
    fail("cannot write", path);
  }
}

// The NUMEL elements of `size` bytes in `path`.
static unsigned char *read_source(const char *path, unsigned long long numel, size_t size) {
  size_t len = 0;
  unsigned char *src = read_file(path, &len);
  if (len != numel * size) {
    fail("source size does not match numel", path);
  }
  return src;
}

// Calls `launch` once per thread of a blocks x threads grid, with the grid position set.
template <class Launch> static void run_grid(unsigned blocks, unsigned threads, Launch launch) {
  for (unsigned block = 0; block < blocks; block++) {
    for (unsigned thread = 0; thread < threads; thread++) {
      strata_host_grid_now.block_idx = block;
      strata_host_grid_now.block_dim = threads;
      strata_host_grid_now.grid_dim = blocks;
      strata_host_grid_now.thread_idx = thread;
      launch();
    }
  }
}

// The f32 scales in `path` followed by guard scales, or NULL for "-"; `count` gets how many.
static float *read_scales(const char *path, size_t *count) {
  *count = 0;
  if (std::strcmp(path, "-") == 0) {
    return 0;
  }
  size_t scales_len = 0;
  unsigned char *bytes = read_file(path, &scales_len);
  *count = scales_len / 4;
  float *scales = (float *)std::malloc((*count + GUARD_SCALES) * sizeof(float));
  if (!scales) {
    fail("out of memory for", path);
  }
  std::memcpy(scales, bytes, *count * 4);
  for (size_t i = *count; i < *count + GUARD_SCALES; i++) {
    std::memcpy(&scales[i], &GUARD_SCALE_BITS, 4);
  }
  std::free(bytes);
  return scales;
}

// A destination of `len` bytes followed by guard bytes.
static unsigned char *guarded_output(size_t len, const char *what) {
  unsigned char *out = (unsigned char *)std::malloc(len + GUARD_BYTES + 1);
  if (!out) {
    fail("out of memory for", what);
  }
  std::memset(out, GUARD_BYTE, len + GUARD_BYTES);
  return out;
}

static void check_guard(const unsigned char *out, size_t len, const char *what) {
  for (size_t i = len; i < len + GUARD_BYTES; i++) {
    if (out[i] != GUARD_BYTE) {
      fail("wrote past the end of the output", what);
    }
  }
}

static void run_quantize(const char *src_dtype, const char *dst_dtype, unsigned long long numel,
                         unsigned long long groups, unsigned blocks, unsigned threads,
                         const char *src_path, const char *src_scales_path, const char *dst_path,
                         const char *dst_scales_path) {
  const quant_source *source = 0;
  for (const quant_source &q : QUANT_SOURCES) {
    if (std::strcmp(q.name, src_dtype) == 0) {
      source = &q;
    }
  }
  if (!source) {
    fail("no quantization reads", src_dtype);
  }
  bool e4m3 = std::strcmp(dst_dtype, "f8e4m3") == 0;
  if (!e4m3 && std::strcmp(dst_dtype, "f8e5m2") != 0) {
    fail("no quantization into", dst_dtype);
  }
  unsigned char *src = read_source(src_path, numel, source->size);
  size_t src_scale_count = 0;
  float *src_scales = read_scales(src_scales_path, &src_scale_count);
  unsigned long long src_row_len = src_scale_count ? numel / src_scale_count : 0;
  unsigned long long row_len = groups ? numel / groups : 0;
  unsigned char *dst = guarded_output(numel, dst_path);
  // Fresh device memory holds garbage: so do the scales before the absmax is cleared.
  unsigned char *scales = guarded_output(groups * 4, dst_scales_path);
  strata_u32 *absmax = (strata_u32 *)scales;

  run_grid(blocks, threads, [&] { strata_absmax_clear(absmax, groups); });
  run_grid(blocks, threads, [&] {
    source->absmax(src, src_scales, absmax, numel, src_row_len, row_len);
  });
  run_grid(blocks, threads, [&] {
    if (e4m3) {
      strata_scales_f8e4m3(absmax, groups);
    } else {
      strata_scales_f8e5m2(absmax, groups);
    }
  });
  quantize_kernel quantize = e4m3 ? source->to_f8e4m3 : source->to_f8e5m2;
  run_grid(blocks, threads, [&] {
    quantize(src, src_scales, dst, (const float *)scales, numel, src_row_len, row_len);
  });

  check_guard(dst, numel, dst_path);
  check_guard(scales, groups * 4, dst_scales_path);
  write_file(dst_path, dst, numel);
  write_file(dst_scales_path, scales, groups * 4);
  std::free(src);
  std::free(src_scales);
  std::free(dst);
  std::free(scales);
}

static void run_job(const char *name, unsigned long long numel, unsigned long long row_len,
                    unsigned blocks, unsigned threads, const char *src_path,
                    const char *scales_path, const char *dst_path) {
  const kernel_entry *entry = 0;
  for (const kernel_entry &k : KERNELS) {
    if (std::strcmp(k.name, name) == 0) {
      entry = &k;
    }
  }
  if (!entry) {
    fail("no such kernel", name);
  }
  unsigned char *src = read_source(src_path, numel, entry->src_size);
  size_t scale_count = 0;
  float *scales = read_scales(scales_path, &scale_count);
  size_t dst_len = numel * entry->dst_size;
  unsigned char *dst = guarded_output(dst_len, dst_path);
  run_grid(blocks, threads, [&] { entry->kernel(src, dst, scales, numel, row_len); });
  check_guard(dst, dst_len, name);
  write_file(dst_path, dst, dst_len);
  std::free(src);
  std::free(scales);
  std::free(dst);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fail("usage", "kernel_host_check JOBS");
  }
  FILE *jobs = std::fopen(argv[1], "r");
  if (!jobs) {
    fail("cannot open", argv[1]);
  }
  char line[4096];
  int count = 0;
  while (std::fgets(line, sizeof line, jobs)) {
    char kind[16], name[128], dst_dtype[16], src[1024], scales[1024], dst[1024], dst_scales[1024];
    unsigned long long numel = 0, row_len = 0;
    unsigned blocks = 0, threads = 0;
    if (std::sscanf(line, "%15s", kind) != 1) {
      fail("bad job line", line);
    }
    if (std::strcmp(kind, "convert") == 0) {
      int fields = std::sscanf(line, "%*s %127s %llu %llu %u %u %1023s %1023s %1023s", name,
                               &numel, &row_len, &blocks, &threads, src, scales, dst);
      if (fields != 8) {
        fail("bad job line", line);
      }
      run_job(name, numel, row_len, blocks, threads, src, scales, dst);
    } else if (std::strcmp(kind, "quantize") == 0) {
      unsigned long long groups = 0;
      int fields = std::sscanf(line, "%*s %127s %15s %llu %llu %u %u %1023s %1023s %1023s %1023s",
                               name, dst_dtype, &numel, &groups, &blocks, &threads, src, scales,
                               dst, dst_scales);
      if (fields != 10) {
        fail("bad job line", line);
      }
      run_quantize(name, dst_dtype, numel, groups, blocks, threads, src, scales, dst, dst_scales);
    } else {
      fail("bad job kind", line);
    }
    count++;
  }
  std::fclose(jobs);
  std::printf("%d jobs\nkernel_host_check: OK\n", count);
  return 0;
}
