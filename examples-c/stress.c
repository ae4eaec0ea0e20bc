/*
 * stress.c: several threads acquiring and releasing random layers under a small budget.
 *
 * Registers a model from host memory in three groups: plain f32 (handed out in place), f32
 * kept resident on the device as bf16 and computed in f32, and f32 computed in f16. The values
 * are small integers, exact in every one of those dtypes, so each view must equal bytes this
 * program computes itself: the f32 views the registered arrays (memcmp), the f16 views f16 bit
 * patterns built here. The budget is 2.5 times the largest layer's in-use footprint, measured
 * first in a context of its own. Each thread holds one layer, sometimes two; a second acquire
 * may be refused with STRATA_ERR_BUDGET (this thread's own layer fills the budget), a first one
 * never. After every acquire the device bytes held must be within the budget. At the end every
 * group is destroyed and strata must hold 0 bytes. Prints the figures and "stress: OK".
 *
 * Usage: stress [seconds (default 2)] [threads (default 4)]
 * Build (after scripts/install.sh --prefix PREFIX, with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig):
 *   cc -std=c11 -Wall -Wextra -pedantic -pthread examples-c/stress.c \
 *      $(pkg-config --cflags --libs strata) -Wl,-rpath,PREFIX/lib -o stress
 */

#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "strata.h"

#define GROUPS 3
#define LAYERS_PER_GROUP 4
#define LAYERS (GROUPS * LAYERS_PER_GROUP)
#define ROWS 32
#define COLS 24
#define MAX_THREADS 64

/* What a group hands out for f32 input: the same f32 bytes, or f16. */
typedef enum { OUT_F32, OUT_F16 } output;

typedef struct group_spec {
  const char *name;
  uint32_t offload, preparing, computation; /* STRATA_DTYPE_*; SOURCE keeps the tier before */
  output out;
} group_spec;

static const group_spec GROUP_SPECS[GROUPS] = {
    {"plain", STRATA_DTYPE_SOURCE, STRATA_DTYPE_SOURCE, STRATA_DTYPE_SOURCE, OUT_F32},
    {"bf16_resident", STRATA_DTYPE_BF16, STRATA_DTYPE_BF16, STRATA_DTYPE_F32, OUT_F32},
    {"f16_compute", STRATA_DTYPE_SOURCE, STRATA_DTYPE_SOURCE, STRATA_DTYPE_F16, OUT_F16},
};

typedef struct layer {
  uint64_t id;
  char names[2][32]; /* weight, bias */
  float values[2][ROWS * COLS];
  size_t numel[2];
  /* What acquire must hand out, byte for byte. */
  unsigned char expected[2][ROWS * COLS * sizeof(float)];
  size_t expected_bytes[2];
  uint32_t expected_dtype;
} layer;

typedef struct shared {
  strata_context *ctx;
  uint64_t groups[GROUPS];
  layer layers[LAYERS];
  uint64_t limit;
  double seconds;
} shared;

typedef struct worker {
  pthread_t thread;
  shared *s;
  uint64_t rng;
  uint64_t verified, refusals, second_tries, failures, peak_seen;
} worker;

static int failed(const char *what, strata_status status) {
  if (status == STRATA_OK) {
    return 0;
  }
  char message[512];
  strata_last_error(message, sizeof message);
  fprintf(stderr, "%s failed: %s: %s\n", what, strata_status_name(status), message);
  return 1;
}

/* Element i of tensor t of layer l: an integer in [-127, 127], exact in f32, f16 and bf16. */
static float value(int l, int t, int i) { return (float)((l * 131 + t * 17 + i * 7) % 255 - 127); }

/* The f16 bit pattern of an integer of magnitude below 2048 (exactly representable). */
static uint16_t f16_bits(int v) {
  if (v == 0) {
    return 0;
  }
  uint16_t sign = v < 0 ? 0x8000u : 0u;
  unsigned m = (unsigned)(v < 0 ? -v : v);
  unsigned e = 0;
  while ((m >> (e + 1)) != 0) {
    e++;
  }
  /* m = 1.f * 2^e: biased exponent e + 15, the bits below the leading one as the fraction. */
  return (uint16_t)(sign | ((e + 15u) << 10) | ((m - (1u << e)) << (10u - e)));
}

static uint64_t next(uint64_t *state) {
  *state ^= *state << 13;
  *state ^= *state >> 7;
  *state ^= *state << 17;
  return *state;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int register_model(shared *s) {
  for (int g = 0; g < GROUPS; g++) {
    const group_spec *spec = &GROUP_SPECS[g];
    strata_tiers tiers = strata_tiers_default();
    tiers.offload.dtype = spec->offload;
    tiers.preparing.dtype = spec->preparing;
    tiers.computation.dtype = spec->computation;
    if (failed("strata_group_create", strata_group_create(s->ctx, spec->name, &tiers, &s->groups[g]))) {
      return 1;
    }
  }
  const int64_t weight_shape[2] = {ROWS, COLS};
  const int64_t bias_shape[1] = {ROWS};
  for (int l = 0; l < LAYERS; l++) {
    layer *ly = &s->layers[l];
    const group_spec *spec = &GROUP_SPECS[l % GROUPS];
    ly->numel[0] = ROWS * COLS;
    ly->numel[1] = ROWS;
    ly->expected_dtype = spec->out == OUT_F16 ? STRATA_DTYPE_F16 : STRATA_DTYPE_F32;
    for (int t = 0; t < 2; t++) {
      snprintf(ly->names[t], sizeof ly->names[t], "%s.%d.%s", spec->name, l, t == 0 ? "weight" : "bias");
      for (size_t i = 0; i < ly->numel[t]; i++) {
        ly->values[t][i] = value(l, t, (int)i);
        if (spec->out == OUT_F16) {
          uint16_t bits = f16_bits((int)ly->values[t][i]);
          memcpy(&ly->expected[t][i * sizeof bits], &bits, sizeof bits); /* little-endian host */
        }
      }
      if (spec->out == OUT_F32) {
        memcpy(ly->expected[t], ly->values[t], ly->numel[t] * sizeof(float));
      }
      ly->expected_bytes[t] = ly->numel[t] * (spec->out == OUT_F16 ? 2 : sizeof(float));
    }
    const strata_host_tensor tensors[2] = {
        {ly->names[0], STRATA_DTYPE_F32, 2, weight_shape, ly->values[0]},
        {ly->names[1], STRATA_DTYPE_F32, 1, bias_shape, ly->values[1]},
    };
    char name[32];
    snprintf(name, sizeof name, "layer.%d", l);
    if (failed("strata_layer_register_host",
               strata_layer_register_host(s->ctx, s->groups[l % GROUPS], name, tensors, 2, &ly->id))) {
      return 1;
    }
  }
  return 0;
}

/* 0 when the views are exactly what layer l must hand out; else prints what differs. */
static int verify(const layer *ly, const strata_tensor_view *views, size_t count) {
  if (count != 2) {
    fprintf(stderr, "%s: %zu views\n", ly->names[0], count);
    return 1;
  }
  for (int t = 0; t < 2; t++) {
    const strata_tensor_view *v = &views[t];
    if (strcmp(v->name, ly->names[t]) != 0 || v->dtype != ly->expected_dtype || v->device != STRATA_DEVICE_CPU ||
        v->nbytes != ly->expected_bytes[t] || v->shape[0] != ROWS) {
      fprintf(stderr, "%s: got %s, dtype %" PRIu32 ", %" PRIu64 " bytes\n", ly->names[t], v->name, v->dtype,
              v->nbytes);
      return 1;
    }
    if (memcmp(v->data, ly->expected[t], ly->expected_bytes[t]) != 0) {
      fprintf(stderr, "%s: the bytes differ from the expected ones\n", ly->names[t]);
      return 1;
    }
  }
  return 0;
}

/* 0 when the device bytes strata holds are within the budget; remembers the most seen. */
static int within_budget(worker *w) {
  strata_stats stats = {0};
  stats.struct_size = sizeof stats;
  if (failed("strata_stats_get", strata_stats_get(w->s->ctx, &stats))) {
    return 1;
  }
  if (stats.vram_in_use > w->peak_seen) {
    w->peak_seen = stats.vram_in_use;
  }
  if (stats.vram_in_use > w->s->limit || stats.overcommit_peak != 0) {
    fprintf(stderr, "%" PRIu64 " bytes held, over vram_limit %" PRIu64 "\n", stats.vram_in_use, w->s->limit);
    return 1;
  }
  return 0;
}

static void *work(void *arg) {
  worker *w = arg;
  shared *s = w->s;
  double deadline = now() + s->seconds;
  strata_tensor_view views[2][2];
  while (now() < deadline && w->failures == 0) {
    int held[2];
    int n = 0;
    size_t count = 0;
    int first = (int)(next(&w->rng) % LAYERS);
    /* Holding nothing, a thread waits for room: any refusal is a failure. */
    if (failed("strata_acquire_for_compute (holding nothing)",
               strata_acquire_for_compute(s->ctx, s->layers[first].id, NULL, views[0], 2, &count))) {
      w->failures++;
      break;
    }
    held[n++] = first;
    w->failures += verify(&s->layers[first], views[0], count) + within_budget(w);
    if (next(&w->rng) % 4 == 0) {
      int second = (int)(next(&w->rng) % LAYERS);
      w->second_tries++;
      strata_status status = strata_acquire_for_compute(s->ctx, s->layers[second].id, NULL, views[1], 2, &count);
      if (status == STRATA_OK) {
        held[n++] = second;
        w->failures += verify(&s->layers[second], views[1], count) + within_budget(w);
      } else if (status == STRATA_ERR_BUDGET) {
        w->refusals++;
      } else {
        failed("strata_acquire_for_compute (holding one layer)", status);
        w->failures++;
      }
    }
    for (int k = n - 1; k >= 0; k--) {
      /* Unchanged while in use: nothing evicted or refilled a layer this thread holds. */
      w->failures += verify(&s->layers[held[k]], views[k], 2);
      w->verified++;
      w->failures += failed("strata_release", strata_release(s->ctx, s->layers[held[k]].id, NULL));
    }
  }
  return NULL;
}

/* The device bytes the largest layer takes while in use: each acquired alone, in a context of its
 * own without a limit (so the stress context's peak is the stress run's). */
static int largest_footprint(uint64_t *out) {
  static shared probe;
  strata_options options = strata_options_default();
  options.prefetch_depth = 0;
  int bad = failed("strata_context_create", strata_context_create(&options, &probe.ctx)) || register_model(&probe);
  *out = 0;
  for (int l = 0; l < LAYERS && !bad; l++) {
    strata_stats before = {0}, during = {0};
    before.struct_size = during.struct_size = sizeof before;
    strata_tensor_view views[2];
    size_t count = 0;
    if (failed("strata_stats_get", strata_stats_get(probe.ctx, &before)) ||
        failed("strata_acquire_for_compute",
               strata_acquire_for_compute(probe.ctx, probe.layers[l].id, NULL, views, 2, &count))) {
      bad = 1;
      break;
    }
    bad = verify(&probe.layers[l], views, count) || failed("strata_stats_get", strata_stats_get(probe.ctx, &during));
    bad |= failed("strata_release", strata_release(probe.ctx, probe.layers[l].id, NULL));
    if (during.vram_in_use - before.vram_in_use > *out) {
      *out = during.vram_in_use - before.vram_in_use;
    }
  }
  strata_context_destroy(probe.ctx);
  return bad;
}

int main(int argc, char **argv) {
  static shared s; /* the layers' arrays are too large for the stack */
  static worker workers[MAX_THREADS];
  s.seconds = argc > 1 ? atof(argv[1]) : 2.0;
  int threads = argc > 2 ? atoi(argv[2]) : 4;
  if (threads < 1 || threads > MAX_THREADS || !(s.seconds >= 0.0)) {
    fprintf(stderr, "usage: stress [seconds] [threads (1 to %d)]\n", MAX_THREADS);
    return 2;
  }

  uint64_t largest = 0;
  if (largest_footprint(&largest)) {
    return 1;
  }
  strata_options options = strata_options_default();
  s.limit = options.vram_limit = largest * 5 / 2;
  if (failed("strata_context_create", strata_context_create(&options, &s.ctx)) || register_model(&s)) {
    strata_context_destroy(s.ctx);
    return 1;
  }

  int started = 0;
  for (; started < threads; started++) {
    workers[started].s = &s;
    workers[started].rng = 0x9E3779B97F4A7C15u * (uint64_t)(started + 1) | 1u;
    if (pthread_create(&workers[started].thread, NULL, work, &workers[started]) != 0) {
      fprintf(stderr, "pthread_create failed\n");
      break;
    }
  }
  uint64_t verified = 0, refusals = 0, second_tries = 0, failures = started < threads, peak_seen = 0;
  for (int t = 0; t < started; t++) {
    pthread_join(workers[t].thread, NULL);
    verified += workers[t].verified;
    refusals += workers[t].refusals;
    second_tries += workers[t].second_tries;
    failures += workers[t].failures;
    peak_seen = workers[t].peak_seen > peak_seen ? workers[t].peak_seen : peak_seen;
  }

  strata_stats stats = {0}, after = {0};
  stats.struct_size = after.struct_size = sizeof stats;
  failures += failed("strata_stats_get", strata_stats_get(s.ctx, &stats));
  for (int g = 0; g < GROUPS; g++) {
    failures += failed("strata_group_destroy", strata_group_destroy(s.ctx, s.groups[g]));
  }
  failures += failed("strata_stats_get", strata_stats_get(s.ctx, &after));
  strata_context_destroy(s.ctx);

  printf("%d threads, %.1f s, %d layers: %" PRIu64 " verified acquires, %" PRIu64 " of %" PRIu64
         " second acquires refused (STRATA_ERR_BUDGET)\n",
         started, s.seconds, LAYERS, verified, refusals, second_tries);
  printf("device: peak %" PRIu64 " bytes of vram_limit %" PRIu64 " (largest layer %" PRIu64 "), %" PRIu64
         " misses, %" PRIu64 " evictions\n",
         stats.vram_peak, s.limit, largest, stats.misses, stats.evictions);
  printf("after destroying the groups: %" PRIu64 " device bytes, %" PRIu64 " host bytes held\n", after.vram_in_use,
         after.host_in_use);
  if (failures != 0 || verified == 0 || stats.vram_peak > s.limit || after.vram_in_use != 0 ||
      after.host_in_use != 0) {
    fprintf(stderr, "stress: %" PRIu64 " failures (see above)\n", failures);
    return 1;
  }
  printf("stress: OK\n");
  return 0;
}
