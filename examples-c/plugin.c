/*
 * plugin.c: strata inside a game-engine plugin that runs a model beside the renderer.
 *
 * Shaped the way an engine drives a plugin: plugin_load() creates a context with a log callback
 * and registers the model's layers; plugin_frame() runs once per frame, acquiring and releasing a
 * few layers (one model step) and, when the renderer needs memory back or gives it up, shrinking
 * or growing the budget live with strata_context_set_vram_limit; plugin_unload() tears down.
 * Every view's values are checked, and after every frame the memory strata holds is checked
 * against the budget in force. Prints the figures and "plugin: OK".
 *
 * Build (after scripts/install.sh --prefix PREFIX, with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig):
 *   cc -std=c11 -Wall -Wextra -pedantic examples-c/plugin.c $(pkg-config --cflags --libs strata) \
 *      -Wl,-rpath,PREFIX/lib -o plugin
 */

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "strata.h"

#define LAYERS 12
#define ROWS 32
#define COLS 32
#define LAYERS_PER_FRAME 4
#define FRAMES 40

typedef struct plugin {
  strata_context *ctx;
  uint64_t group;
  uint64_t layers[LAYERS];
  /* Device bytes of one layer while in use (bf16 resident + f32 computation), and resident. */
  uint64_t layer_in_use, layer_resident;
  uint64_t budget, max_budget;
  uint32_t prefetch_depth;
  uint64_t budget_changes, bad_values, over_budget_frames;
  uint64_t messages[STRATA_LOG_DEBUG + 1];
} plugin;

/* The value element i of layer l holds: small integers, exact in bf16. */
static float expected_value(int l, int i) { return (float)((l * 7 + i) % 128); }

static int failed(const char *what, strata_status status) {
  if (status == STRATA_OK) {
    return 0;
  }
  char message[512];
  strata_last_error(message, sizeof message);
  fprintf(stderr, "%s failed: %s: %s\n", what, strata_status_name(status), message);
  return 1;
}

/* strata calls this as a call returns, outside its locks; an engine would forward to its console. */
static void on_log(void *user, uint32_t level, const char *message) {
  plugin *p = user;
  if (level <= STRATA_LOG_DEBUG) {
    p->messages[level]++;
  }
  if (level <= STRATA_LOG_INFO) {
    printf("  [strata %s] %s\n", level == STRATA_LOG_WARN ? "warn" : level == STRATA_LOG_INFO ? "info" : "error",
           message);
  }
}

static int plugin_load(plugin *p) {
  strata_options options = strata_options_default();
  options.vram_limit = STRATA_UNLIMITED; /* sized once the layers' footprint is known */
  options.log_fn = on_log;
  options.log_user = p;
  p->prefetch_depth = options.prefetch_depth;
  if (failed("strata_context_create", strata_context_create(&options, &p->ctx))) {
    return 1;
  }
  strata_tiers tiers = strata_tiers_default();
  tiers.offload.dtype = STRATA_DTYPE_BF16;     /* kept in RAM as bf16 */
  tiers.preparing.dtype = STRATA_DTYPE_BF16;   /* resident on the device as bf16 */
  tiers.computation.dtype = STRATA_DTYPE_F32;  /* handed to the shaders as f32 */
  if (failed("strata_group_create", strata_group_create(p->ctx, "model", &tiers, &p->group))) {
    return 1;
  }
  static float weights[ROWS * COLS];
  const int64_t shape[2] = {ROWS, COLS};
  for (int l = 0; l < LAYERS; l++) {
    for (int i = 0; i < ROWS * COLS; i++) {
      weights[i] = expected_value(l, i);
    }
    char name[32];
    snprintf(name, sizeof name, "block.%d", l);
    strata_host_tensor tensor = {"weight", STRATA_DTYPE_F32, 2, shape, weights};
    if (failed("strata_layer_register_host",
               strata_layer_register_host(p->ctx, p->group, name, &tensor, 1, &p->layers[l]))) {
      return 1;
    }
  }
  /* bf16 resident copy plus the f32 copy handed out: 2 + 4 bytes per element. */
  p->layer_resident = (uint64_t)ROWS * COLS * 2;
  p->layer_in_use = (uint64_t)ROWS * COLS * 6;
  /* Room for one layer in use and half the others resident. */
  p->budget = p->max_budget = p->layer_in_use + (LAYERS / 2) * p->layer_resident;
  return failed("strata_context_set_vram_limit", strata_context_set_vram_limit(p->ctx, p->budget));
}

static int set_budget(plugin *p, uint64_t bytes, const char *why) {
  printf("frame budget: %" PRIu64 " -> %" PRIu64 " bytes (%s)\n", p->budget, bytes, why);
  p->budget = bytes;
  p->budget_changes++;
  if (bytes > p->max_budget) {
    p->max_budget = bytes;
  }
  return failed("strata_context_set_vram_limit", strata_context_set_vram_limit(p->ctx, bytes));
}

static int plugin_frame(plugin *p, int frame) {
  /* The renderer's memory needs change: a cutscene with heavy textures, then back. */
  if (frame == 12 && set_budget(p, p->layer_in_use, "renderer needs memory: one layer in use")) {
    return 1;
  }
  if (frame == 24 && set_budget(p, p->layer_in_use + LAYERS * p->layer_resident, "renderer idle: all")) {
    return 1;
  }
  if (frame == 32 && set_budget(p, 0, "minimised: nothing resident")) {
    return 1;
  }
  for (int k = 0; k < LAYERS_PER_FRAME; k++) {
    int l = (frame * LAYERS_PER_FRAME + k) % LAYERS;
    strata_tensor_view view;
    size_t count = 0;
    if (failed("strata_acquire_for_compute",
               strata_acquire_for_compute(p->ctx, p->layers[l], NULL, &view, 1, &count))) {
      return 1;
    }
    const float *values = view.data;
    if (count != 1 || view.dtype != STRATA_DTYPE_F32 || view.nbytes != sizeof(float) * ROWS * COLS) {
      p->bad_values++;
    } else {
      for (int i = 0; i < ROWS * COLS; i++) {
        p->bad_values += values[i] != expected_value(l, i);
      }
    }
    if (failed("strata_release", strata_release(p->ctx, p->layers[l], NULL))) {
      return 1;
    }
  }
  /* Between frames no layer is in use: strata must hold no more than the budget in force; under
     budget 0 that is the layers its copy engine fetched ahead, at most prefetch_depth of them. */
  strata_stats stats = {0};
  stats.struct_size = sizeof stats;
  if (failed("strata_stats_get", strata_stats_get(p->ctx, &stats))) {
    return 1;
  }
  uint64_t allowed = p->budget == 0 ? p->prefetch_depth * p->layer_in_use : p->budget;
  if (stats.vram_limit != p->budget || stats.vram_in_use > allowed) {
    fprintf(stderr, "frame %d: %" PRIu64 " bytes held, budget %" PRIu64 " (stats say %" PRIu64 ")\n", frame,
            stats.vram_in_use, p->budget, stats.vram_limit);
    p->over_budget_frames++;
  }
  return 0;
}

static void plugin_unload(plugin *p) {
  strata_context_destroy(p->ctx); /* destroys the group and its layers too */
  p->ctx = NULL;
}

int main(void) {
  plugin p = {0};
  if (plugin_load(&p)) {
    plugin_unload(&p);
    return 1;
  }
  for (int frame = 0; frame < FRAMES; frame++) {
    if (plugin_frame(&p, frame)) {
      plugin_unload(&p);
      return 1;
    }
  }
  strata_stats stats = {0};
  stats.struct_size = sizeof stats;
  if (failed("strata_stats_get", strata_stats_get(p.ctx, &stats))) {
    plugin_unload(&p);
    return 1;
  }
  plugin_unload(&p);

  printf("%d frames x %d layers: %" PRIu64 " acquires, %" PRIu64 " resident hits, %" PRIu64 " misses, %" PRIu64
         " evictions\n",
         FRAMES, LAYERS_PER_FRAME, stats.acquires, stats.resident_hits, stats.misses, stats.evictions);
  printf("device: peak %" PRIu64 " bytes, largest budget %" PRIu64 ", %" PRIu64 " budget changes\n",
         stats.vram_peak, p.max_budget, p.budget_changes);
  printf("log: %" PRIu64 " warn, %" PRIu64 " info, %" PRIu64 " debug messages\n", p.messages[STRATA_LOG_WARN],
         p.messages[STRATA_LOG_INFO], p.messages[STRATA_LOG_DEBUG]);
  printf("checks: %" PRIu64 " wrong values, %" PRIu64 " frames over budget\n", p.bad_values,
         p.over_budget_frames);

  int ok = p.bad_values == 0 && p.over_budget_frames == 0 &&
           stats.acquires == (uint64_t)FRAMES * LAYERS_PER_FRAME && stats.vram_peak <= p.max_budget &&
           stats.evictions > 0 && p.messages[STRATA_LOG_INFO] >= p.budget_changes;
  if (!ok) {
    fprintf(stderr, "plugin: a figure is off (see above)\n");
    return 1;
  }
  printf("plugin: OK\n");
  return 0;
}
