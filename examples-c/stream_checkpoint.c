/*
 * stream_checkpoint.c: stream a model from a safetensors file under a memory budget.
 *
 *   stream_checkpoint MODEL.safetensors [TRACE.json]
 *
 * 1. Writes a small model to MODEL.safetensors: 8 blocks, each a bf16 weight [256, 512] and a bf16
 *    bias [256], deterministic pseudo-random values (std about 0.02).
 * 2. Opens it with strata: the weights stay in the file (offload and onload tiers on DISK), are
 *    kept resident on the compute device as fp8 e4m3 scaled per output channel (preparing tier),
 *    and are handed out as bf16 (computation tier), under a vram_limit that holds only a few
 *    blocks, so most of each pass streams from disk.
 * 3. Runs 3 passes of y = W x + b over the blocks, checks every y against the same product
 *    computed from the bf16 values written in step 1 (fp8 loses precision: the relative error of
 *    y's norm must stay under 5%), and checks after each pass that strata never held more than
 *    vram_limit bytes on the device.
 * 4. Writes strata's timeline to TRACE.json when given (open it in Perfetto or chrome://tracing).
 *
 * Only the CPU device is used, so this runs anywhere; on a GPU the views would point to device
 * memory and the product would run there instead.
 */

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "strata.h"

#define N_BLOCKS 8
#define ROWS 256 /* output features: the weight's dimension 0, one fp8 scale per row */
#define COLS 512 /* input features */
#define N_PASSES 3
#define MAX_REL_ERROR 0.05

/* ----- error reporting ----- */

static void report(const char *what, strata_status status) {
  char message[512];
  strata_last_error(message, sizeof message); /* truncated to fit, always NUL-terminated */
  fprintf(stderr, "%s failed: %s: %s\n", what, strata_status_name(status), message);
}

/* Returns 1 (and reports) when a call did not succeed, so calls read as `if (failed(...))`. */
static int failed(const char *what, strata_status status) {
  if (status == STRATA_OK) {
    return 0;
  }
  report(what, status);
  return 1;
}

/* ----- bf16 and deterministic values ----- */

/* bf16 is the upper half of an f32: widening is a shift, narrowing rounds to nearest even. */
static float bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static uint16_t float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  bits += 0x7fffu + ((bits >> 16) & 1u); /* no NaNs here, so no special case for them */
  return (uint16_t)(bits >> 16);
}

/* xorshift64*: the same values on every platform, unlike rand(). */
static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static double uniform(void) { /* in [-1, 1) */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  uint64_t r = rng_state * 0x2545f4914f6cdd1du;
  return (double)(r >> 11) / (double)(UINT64_C(1) << 52) - 1.0;
}

/* Uniform on [-a, a] has std a / sqrt(3): a = 0.02 * sqrt(3) gives std 0.02. */
static uint16_t random_weight(void) { return float_to_bf16((float)(uniform() * 0.02 * sqrt(3.0))); }

/* ----- writing the safetensors file ----- */

/* The original values, kept to compute the reference products. */
typedef struct block {
  uint16_t weight[ROWS * COLS];
  uint16_t bias[ROWS];
} block;

static int write_le_u16s(FILE *f, const uint16_t *values, size_t n) {
  /* safetensors data is little-endian whatever the host is: write byte by byte. */
  for (size_t i = 0; i < n; i++) {
    if (fputc(values[i] & 0xff, f) == EOF || fputc(values[i] >> 8, f) == EOF) {
      return 1;
    }
  }
  return 0;
}

/* Format: 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a multiple
 * of 8, so the data is aligned), then the tensors' bytes at the offsets the header gives. */
static int write_checkpoint(const char *path, const block *blocks) {
  char header[8192];
  size_t len = 0;
  uint64_t offset = 0;
  len += (size_t)snprintf(header + len, sizeof header - len, "{");
  for (int i = 0; i < N_BLOCKS && len < sizeof header; i++) {
    uint64_t weight_end = offset + (uint64_t)ROWS * COLS * 2;
    uint64_t bias_end = weight_end + (uint64_t)ROWS * 2;
    len += (size_t)snprintf(header + len, sizeof header - len,
                            "%s\"blocks.%d.weight\":{\"dtype\":\"BF16\",\"shape\":[%d,%d],"
                            "\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]},"
                            "\"blocks.%d.bias\":{\"dtype\":\"BF16\",\"shape\":[%d],"
                            "\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}",
                            i == 0 ? "" : ",", i, ROWS, COLS, offset, weight_end, i, ROWS,
                            weight_end, bias_end);
    offset = bias_end;
  }
  if (len < sizeof header) {
    len += (size_t)snprintf(header + len, sizeof header - len, "}");
  }
  while (len < sizeof header && len % 8 != 0) {
    header[len++] = ' ';
  }
  if (len >= sizeof header) {
    fprintf(stderr, "the safetensors header does not fit in %zu bytes\n", sizeof header);
    return 1;
  }

  FILE *f = fopen(path, "wb");
  if (f == NULL) {
    perror(path);
    return 1;
  }
  int bad = 0;
  for (int b = 0; b < 8; b++) {
    bad |= fputc((int)(((uint64_t)len >> (8 * b)) & 0xff), f) == EOF;
  }
  bad |= fwrite(header, 1, len, f) != len;
  for (int i = 0; i < N_BLOCKS && !bad; i++) {
    bad |= write_le_u16s(f, blocks[i].weight, ROWS * COLS);
    bad |= write_le_u16s(f, blocks[i].bias, ROWS);
  }
  bad |= fclose(f) != 0;
  if (bad) {
    fprintf(stderr, "%s: write failed\n", path);
  }
  return bad;
}

/* ----- one block's product through strata's views ----- */

static const strata_tensor_view *find_view(const strata_tensor_view *views, size_t count,
                                           const char *suffix) {
  size_t n = strlen(suffix);
  for (size_t i = 0; i < count; i++) {
    size_t len = strlen(views[i].name);
    if (len >= n && strcmp(views[i].name + len - n, suffix) == 0) {
      return &views[i];
    }
  }
  return NULL;
}

/* Checks that a view is what the computation tier promises: bf16, on the CPU, of this shape. */
static int check_view(const strata_tensor_view *v, const char *what, uint32_t ndim, int64_t d0,
                      int64_t d1) {
  if (v == NULL) {
    fprintf(stderr, "acquire returned no %s view\n", what);
    return 1;
  }
  uint64_t numel = (uint64_t)d0 * (uint64_t)(ndim == 2 ? d1 : 1);
  if (v->dtype != STRATA_DTYPE_BF16 || v->device != STRATA_DEVICE_CPU || v->ndim != ndim ||
      v->shape[0] != d0 || (ndim == 2 && v->shape[1] != d1) || v->nbytes != numel * 2) {
    fprintf(stderr,
            "%s: expected bf16 on the CPU with %" PRIu64 " elements, got dtype %" PRIu32
            " device %" PRIu32 " ndim %" PRIu32 " nbytes %" PRIu64 "\n",
            v->name, numel, v->dtype, v->device, v->ndim, v->nbytes);
    return 1;
  }
  return 0;
}

/* y = W x + b from bf16 arrays (strata's views or the original values). */
static void linear(const uint16_t *w, const uint16_t *b, const float *x, double *y) {
  for (int r = 0; r < ROWS; r++) {
    double acc = bf16_to_float(b[r]);
    for (int c = 0; c < COLS; c++) {
      acc += (double)bf16_to_float(w[r * COLS + c]) * x[c];
    }
    y[r] = acc;
  }
}

static double relative_error(const double *y, const double *reference) {
  double diff = 0.0, norm = 0.0;
  for (int r = 0; r < ROWS; r++) {
    diff += (y[r] - reference[r]) * (y[r] - reference[r]);
    norm += reference[r] * reference[r];
  }
  return sqrt(diff / norm);
}

static int get_stats(strata_context *ctx, strata_stats *stats) {
  memset(stats, 0, sizeof *stats);
  stats->struct_size = sizeof *stats;
  return failed("strata_stats_get", strata_stats_get(ctx, stats));
}

int main(int argc, char **argv) {
  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: %s MODEL.safetensors [TRACE.json]\n", argv[0]);
    return 2;
  }
  const char *model_path = argv[1];
  const char *trace_path = argc == 3 ? argv[2] : NULL;

  int exit_code = 1;
  strata_context *ctx = NULL;
  strata_checkpoint *ckpt = NULL;
  strata_tensor_view *views = NULL;
  block *blocks = malloc(N_BLOCKS * sizeof *blocks);
  if (blocks == NULL) {
    fprintf(stderr, "out of memory\n");
    return 1;
  }

  /* 1. The model. */
  for (int i = 0; i < N_BLOCKS; i++) {
    for (int j = 0; j < ROWS * COLS; j++) {
      blocks[i].weight[j] = random_weight();
    }
    for (int j = 0; j < ROWS; j++) {
      blocks[i].bias[j] = random_weight();
    }
  }
  if (write_checkpoint(model_path, blocks)) {
    goto done;
  }
  float x[COLS];
  for (int c = 0; c < COLS; c++) {
    x[c] = (float)((c * 37) % 101) / 50.0f - 1.0f; /* fixed values in [-1, 1] */
  }

  /* 2. The budget. A block in the preparing tier takes 1 byte per weight (fp8), one f32 scale per
   * row and its bias (1-D tensors are not stored as fp8: they keep bf16). The budget also counts
   * the bf16 copy of the block being computed (the conversion temporary, 2 bytes per weight), so
   * it must hold that on top of the preparing blocks: 2.5 preparing blocks alone would be smaller
   * than one block in use (its fp8 copy plus its bf16 copy, 3 preparing blocks' worth), and every
   * acquire would overcommit. */
  const uint64_t preparing_block = (uint64_t)ROWS * COLS + ROWS * 4 + ROWS * 2;
  const uint64_t computation_block = ((uint64_t)ROWS * COLS + ROWS) * 2;
  const uint64_t vram_limit = preparing_block * 5 / 2 + computation_block;
  strata_options options = strata_options_default();
  options.vram_limit = vram_limit;
  if (failed("strata_context_create", strata_context_create(&options, &ctx))) {
    goto done;
  }

  strata_tiers tiers = strata_tiers_default();
  tiers.offload = (strata_placement){STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE};
  tiers.onload = (strata_placement){STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE};
  tiers.preparing = (strata_placement){STRATA_DEVICE_DEFAULT, STRATA_DTYPE_F8_E4M3FN};
  tiers.computation = (strata_placement){STRATA_DEVICE_DEFAULT, STRATA_DTYPE_BF16};
  tiers.quantization = STRATA_QUANT_PER_CHANNEL;
  uint64_t group = 0;
  if (failed("strata_group_create", strata_group_create(ctx, "blocks", &tiers, &group))) {
    goto done;
  }

  if (failed("strata_checkpoint_open", strata_checkpoint_open(ctx, model_path, &ckpt))) {
    goto done;
  }
  /* keep_components = 2: "blocks.3.weight" and "blocks.3.bias" form layer "blocks.3". */
  size_t n_layers = 0;
  if (failed("strata_group_register_checkpoint",
             strata_group_register_checkpoint(ctx, group, ckpt, "blocks.", 2, &n_layers))) {
    goto done;
  }
  /* The layers keep the file open themselves: the checkpoint handle is no longer needed. */
  strata_checkpoint_close(ckpt);
  ckpt = NULL;
  if (n_layers != N_BLOCKS) {
    fprintf(stderr, "registered %zu layers, expected %d\n", n_layers, N_BLOCKS);
    goto done;
  }

  uint64_t layers[N_BLOCKS];
  size_t capacity = 0;
  for (int i = 0; i < N_BLOCKS; i++) {
    char name[32];
    snprintf(name, sizeof name, "blocks.%d", i);
    size_t count = 0;
    if (failed("strata_layer_find", strata_layer_find(ctx, name, &layers[i])) ||
        failed("strata_layer_tensor_count", strata_layer_tensor_count(ctx, layers[i], &count))) {
      goto done;
    }
    capacity = count > capacity ? count : capacity;
  }
  views = calloc(capacity, sizeof *views);
  if (views == NULL) {
    fprintf(stderr, "out of memory\n");
    goto done;
  }
  printf("%d blocks of %d x %d bf16, preparing fp8 e4m3 per channel, vram_limit %" PRIu64
         " bytes (one bf16 block + %.1f preparing blocks)\n",
         N_BLOCKS, ROWS, COLS, vram_limit,
         (double)(vram_limit - computation_block) / (double)preparing_block);

  /* 3. The passes. */
  strata_stats before;
  if (get_stats(ctx, &before)) {
    goto done;
  }
  for (int pass = 0; pass < N_PASSES; pass++) {
    double worst = 0.0;
    for (int i = 0; i < N_BLOCKS; i++) {
      size_t count = 0;
      if (failed("strata_acquire_for_compute",
                 strata_acquire_for_compute(ctx, layers[i], NULL, views, capacity, &count))) {
        goto done;
      }
      const strata_tensor_view *w = find_view(views, count, ".weight");
      const strata_tensor_view *b = find_view(views, count, ".bias");
      int bad = check_view(w, "weight", 2, ROWS, COLS) || check_view(b, "bias", 1, ROWS, 0);
      double y[ROWS] = {0}, reference[ROWS];
      if (!bad) {
        linear(w->data, b->data, x, y);
      }
      /* Release before judging the result, so a failed check leaves nothing acquired. */
      if (failed("strata_release", strata_release(ctx, layers[i], NULL)) || bad) {
        goto done;
      }
      linear(blocks[i].weight, blocks[i].bias, x, reference);
      double error = relative_error(y, reference);
      if (!(error < MAX_REL_ERROR)) { /* also catches a NaN */
        fprintf(stderr, "pass %d, blocks.%d: relative error %.4f, over %.2f\n", pass + 1, i,
                error, MAX_REL_ERROR);
        goto done;
      }
      worst = error > worst ? error : worst;
    }

    /* The counters are cumulative: print this pass's share, and the peak so far. */
    strata_stats after;
    if (get_stats(ctx, &after)) {
      goto done;
    }
    printf("pass %d: bytes_to_device %" PRIu64 ", bytes_from_disk %" PRIu64 ", misses %" PRIu64
           ", resident_hits %" PRIu64 ", prefetch_hits %" PRIu64 ", evictions %" PRIu64
           ", vram_peak %" PRIu64 " / %" PRIu64 ", worst relative error %.4f\n",
           pass + 1, after.bytes_to_device - before.bytes_to_device,
           after.bytes_from_disk - before.bytes_from_disk, after.misses - before.misses,
           after.resident_hits - before.resident_hits, after.prefetch_hits - before.prefetch_hits,
           after.evictions - before.evictions, after.vram_peak, vram_limit, worst);
    if (after.vram_peak > vram_limit || after.overcommit_peak != 0) {
      fprintf(stderr, "pass %d: vram_peak %" PRIu64 " exceeds vram_limit %" PRIu64
              " (overcommit_peak %" PRIu64 ")\n",
              pass + 1, after.vram_peak, vram_limit, after.overcommit_peak);
      goto done;
    }
    before = after;
  }

  /* 4. The timeline. */
  if (trace_path != NULL) {
    if (failed("strata_trace_write", strata_trace_write(ctx, trace_path))) {
      goto done;
    }
    printf("trace written to %s\n", trace_path);
  }

  exit_code = 0;
done:
  free(views);
  strata_checkpoint_close(ckpt); /* NULL is a no-op */
  strata_context_destroy(ctx);   /* NULL is a no-op */
  free(blocks);
  if (exit_code == 0) {
    printf("stream_checkpoint: OK\n");
  }
  return exit_code;
}
