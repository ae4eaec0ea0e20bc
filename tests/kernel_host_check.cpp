// The conversion kernels of kernels/convert.cu compiled as host C++, for tests/kernels.rs: each
// kernel entry point is called once per thread of an emulated grid (its grid-stride loop and
// index → scale mapping included), and the output bytes are written for the test to compare
// with strata::convert::convert.
//
// Usage: kernel_host_check JOBS, where every line of the file JOBS is one launch:
//   KERNEL NUMEL ROW_LEN BLOCKS THREADS SRC SCALES DST
// KERNEL is an entry point's name (strata_convert_f8e4m3_to_bf16); SRC holds NUMEL source
// elements; SCALES holds the f32 scales, or is "-" for none (a NULL scales pointer); DST is
// written. Prints "kernel_host_check: OK" last when every job ran.
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
    ENTRY(f16, 2, f32, 4),    ENTRY(bf16, 2, f32, 4),   ENTRY(f8e4m3, 1, f32, 4),
    ENTRY(f8e5m2, 1, f32, 4), ENTRY(f32, 4, f16, 2),    ENTRY(bf16, 2, f16, 2),
    ENTRY(f8e4m3, 1, f16, 2), ENTRY(f8e5m2, 1, f16, 2), ENTRY(f32, 4, bf16, 2),
    ENTRY(f16, 2, bf16, 2),   ENTRY(f8e4m3, 1, bf16, 2), ENTRY(f8e5m2, 1, bf16, 2),
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
  size_t src_len = 0;
  unsigned char *src = read_file(src_path, &src_len);
  if (src_len != numel * entry->src_size) {
    fail("source size does not match numel", src_path);
  }
  float *scales = 0;
  if (std::strcmp(scales_path, "-") != 0) {
    size_t scales_len = 0;
    unsigned char *bytes = read_file(scales_path, &scales_len);
    size_t count = scales_len / 4;
    scales = (float *)std::malloc((count + GUARD_SCALES) * sizeof(float));
    if (!scales) {
      fail("out of memory for", scales_path);
    }
    std::memcpy(scales, bytes, count * 4);
    for (size_t i = count; i < count + GUARD_SCALES; i++) {
      std::memcpy(&scales[i], &GUARD_SCALE_BITS, 4);
    }
    std::free(bytes);
  }
  size_t dst_len = numel * entry->dst_size;
  unsigned char *dst = (unsigned char *)std::malloc(dst_len + GUARD_BYTES + 1);
  if (!dst) {
    fail("out of memory for", dst_path);
  }
  std::memset(dst, GUARD_BYTE, dst_len + GUARD_BYTES);

  for (unsigned block = 0; block < blocks; block++) {
    for (unsigned thread = 0; thread < threads; thread++) {
      strata_host_grid_now.block_idx = block;
      strata_host_grid_now.block_dim = threads;
      strata_host_grid_now.grid_dim = blocks;
      strata_host_grid_now.thread_idx = thread;
      entry->kernel(src, dst, scales, numel, row_len);
    }
  }

  for (size_t i = dst_len; i < dst_len + GUARD_BYTES; i++) {
    if (dst[i] != GUARD_BYTE) {
      fail("wrote past the end of the output", name);
    }
  }
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
    char name[128], src[1024], scales[1024], dst[1024];
    unsigned long long numel = 0, row_len = 0;
    unsigned blocks = 0, threads = 0;
    int fields = std::sscanf(line, "%127s %llu %llu %u %u %1023s %1023s %1023s", name, &numel,
                             &row_len, &blocks, &threads, src, scales, dst);
    if (fields != 8) {
      fail("bad job line", line);
    }
    run_job(name, numel, row_len, blocks, threads, src, scales, dst);
    count++;
  }
  std::fclose(jobs);
  std::printf("%d jobs\nkernel_host_check: OK\n", count);
  return 0;
}
