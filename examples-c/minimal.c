/*
 * minimal.c: the smallest useful strata program.
 *
 * Creates a context on the CPU, registers one layer (a 4x3 weight and a bias of 4, both f32)
 * from host memory, acquires it, prints its values through the views, releases it, provokes one
 * error on purpose to show how errors are reported, prints the statistics and cleans up.
 *
 * Build (from the repository root, after `scripts/install.sh --prefix "$HOME/.local"`):
 *   export PKG_CONFIG_PATH="$HOME/.local/lib/pkgconfig"
 *   cc -std=c11 -Wall -Wextra -pedantic examples-c/minimal.c $(pkg-config --cflags --libs strata) \
 *      -Wl,-rpath,"$HOME/.local/lib" -o minimal
 */

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "strata.h"

/* Prints the status name and this thread's last error message. */
static void report(const char *what, strata_status status) {
  /* strata_last_error(NULL, 0) returns the message's length: ask first, then fetch it whole. */
  size_t len = strata_last_error(NULL, 0);
  char *message = malloc(len + 1);
  if (message != NULL) {
    strata_last_error(message, len + 1);
  }
  fprintf(stderr, "%s failed: %s: %s\n", what, strata_status_name(status),
          message != NULL ? message : "(no memory for the message)");
  free(message);
}

/* Returns 1 (and reports) when a call did not succeed, so calls read as `if (failed(...))`. */
static int failed(const char *what, strata_status status) {
  if (status == STRATA_OK) {
    return 0;
  }
  report(what, status);
  return 1;
}

/* Prints one view's values; only valid for f32 tensors in host memory (the CPU device). */
static int print_view(const strata_tensor_view *view) {
  if (view->dtype != STRATA_DTYPE_F32 || view->device != STRATA_DEVICE_CPU) {
    fprintf(stderr, "%s: expected an f32 tensor on the CPU, got dtype %" PRIu32 " device %" PRIu32 "\n",
            view->name, view->dtype, view->device);
    return 1;
  }
  const float *values = view->data;
  /* A 1-D tensor prints as one row; a 2-D tensor as shape[0] rows of shape[1]. */
  int64_t rows = view->ndim == 2 ? view->shape[0] : 1;
  int64_t cols = view->ndim == 2 ? view->shape[1] : view->shape[0];
  if (view->ndim < 1 || view->ndim > 2 || (uint64_t)(rows * cols) * sizeof(float) != view->nbytes) {
    fprintf(stderr, "%s: unexpected shape (ndim %" PRIu32 ", %" PRIu64 " bytes)\n", view->name,
            view->ndim, view->nbytes);
    return 1;
  }
  printf("  %s [", view->name);
  for (uint32_t d = 0; d < view->ndim; d++) {
    printf(d == 0 ? "%" PRId64 : ", %" PRId64, view->shape[d]);
  }
  printf("]\n");
  for (int64_t r = 0; r < rows; r++) {
    printf("   ");
    for (int64_t c = 0; c < cols; c++) {
      printf(" %6.2f", values[r * cols + c]);
    }
    printf("\n");
  }
  return 0;
}

int main(void) {
  int exit_code = 1;
  strata_context *ctx = NULL;
  strata_tensor_view *views = NULL;

  /* A program built against one header but run against another library build is caught here. */
  uint32_t version = strata_version();
  uint32_t expected = ((uint32_t)STRATA_VERSION_MAJOR << 16) | ((uint32_t)STRATA_VERSION_MINOR << 8) |
                      (uint32_t)STRATA_VERSION_PATCH;
  printf("strata %" PRIu32 ".%" PRIu32 ".%" PRIu32 "\n", version >> 16, (version >> 8) & 0xff,
         version & 0xff);
  if (version != expected) {
    fprintf(stderr, "header version %#" PRIx32 " does not match the library's %#" PRIx32 "\n",
            expected, version);
    return 1;
  }

  /* The defaults: the CPU device, no memory limit. */
  strata_options options = strata_options_default();
  if (failed("strata_context_create", strata_context_create(&options, &ctx))) {
    goto done;
  }

  /* Default tiers: host memory while offloaded and onloaded, the compute device (here the CPU)
   * for preparing and computation, every tier in the stored dtype. */
  strata_tiers tiers = strata_tiers_default();
  uint64_t group = 0;
  if (failed("strata_group_create", strata_group_create(ctx, "model", &tiers, &group))) {
    goto done;
  }

  /* One linear layer. strata copies the bytes during registration, so these arrays may live on
   * the stack (or be freed) once strata_layer_register_host returns. */
  const float weight[4 * 3] = {
      1.0f, 2.0f,  3.0f,  /* row 0 */
      4.0f, 5.0f,  6.0f,  /* row 1 */
      7.0f, 8.0f,  9.0f,  /* row 2 */
      10.f, 11.0f, 12.0f, /* row 3 */
  };
  const float bias[4] = {0.5f, -0.5f, 0.25f, -0.25f};
  const int64_t weight_shape[2] = {4, 3};
  const int64_t bias_shape[1] = {4};
  const strata_host_tensor tensors[2] = {
      {"linear.weight", STRATA_DTYPE_F32, 2, weight_shape, weight},
      {"linear.bias", STRATA_DTYPE_F32, 1, bias_shape, bias},
  };
  uint64_t layer = 0;
  if (failed("strata_layer_register_host",
             strata_layer_register_host(ctx, group, "linear", tensors, 2, &layer))) {
    goto done;
  }

  /* Ask how many views the acquire will fill, rather than hard-coding 2. */
  size_t capacity = 0;
  if (failed("strata_layer_tensor_count", strata_layer_tensor_count(ctx, layer, &capacity))) {
    goto done;
  }
  views = calloc(capacity, sizeof *views);
  if (views == NULL) {
    fprintf(stderr, "out of memory\n");
    goto done;
  }

  /* The stream argument is ignored on the CPU device. */
  size_t count = 0;
  if (failed("strata_acquire_for_compute",
             strata_acquire_for_compute(ctx, layer, NULL, views, capacity, &count))) {
    goto done;
  }
  printf("acquired layer \"linear\": %zu tensors\n", count);
  int bad_view = 0;
  for (size_t i = 0; i < count; i++) {
    bad_view |= print_view(&views[i]);
  }
  /* Release even when a view looked wrong, so the layer is not left in use. */
  if (failed("strata_release", strata_release(ctx, layer, NULL)) || bad_view) {
    goto done;
  }

  /* The error path, on purpose: a second release without an acquire is STRATA_ERR_STATE. */
  strata_status status = strata_release(ctx, layer, NULL);
  if (status != STRATA_ERR_STATE) {
    fprintf(stderr, "a release without an acquire returned %s, expected STRATA_ERR_STATE\n",
            strata_status_name(status));
    goto done;
  }
  char message[256];
  strata_last_error(message, sizeof message); /* truncated to fit, always NUL-terminated */
  printf("expected error: %s: %s\n", strata_status_name(status), message);

  strata_stats stats = {0};
  stats.struct_size = sizeof stats; /* lets the library know which fields this program has */
  if (failed("strata_stats_get", strata_stats_get(ctx, &stats))) {
    goto done;
  }
  printf("stats: acquires %" PRIu64 ", vram_peak %" PRIu64 " bytes\n", stats.acquires,
         stats.vram_peak);

  exit_code = 0;
done:
  free(views);
  strata_context_destroy(ctx); /* NULL is a no-op; destroys the group and layer with it */
  if (exit_code == 0) {
    printf("minimal: OK\n");
  }
  return exit_code;
}
