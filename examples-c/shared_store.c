/*
 * shared_store.c: several contexts (one per GPU, in a real program) over one host store.
 *
 *   shared_store MODEL.safetensors
 *
 * 1. Writes a small model to MODEL.safetensors: 4 blocks, each a u8 weight [256, 256] whose
 *    bytes are (block + row + column) mod 251, read straight from the file on every pass.
 * 2. A store within this process: two contexts attach to it and stream the blocks through the
 *    onload tier in RAM. Each block is read from disk once, by whichever context needs it
 *    first, held once, and both contexts' views point into that one copy.
 * 3. A named store (/dev/shm/strata-example-PID): opened twice, as two processes would open it;
 *    the second open attaches to what the first created.
 * Every byte is checked, and the store's counters: one fill per block, the model's bytes held
 * once, the contexts reading the model once between them.
 */

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "strata.h"

#define N_BLOCKS 4
#define SIDE 256
#define BLOCK_BYTES (SIDE * SIDE)

static int failed(const char *what, strata_status status) {
  if (status == STRATA_OK) {
    return 0;
  }
  char message[512];
  strata_last_error(message, sizeof message);
  fprintf(stderr, "%s failed: %s: %s\n", what, strata_status_name(status), message);
  return 1;
}

static unsigned char expected_byte(int block, size_t at) {
  return (unsigned char)((size_t)block + at / SIDE + at % SIDE) % 251;
}

static int write_checkpoint(const char *path) {
  char header[2048];
  size_t len = 0;
  len += (size_t)snprintf(header + len, sizeof header - len, "{");
  for (int i = 0; i < N_BLOCKS; i++) {
    len += (size_t)snprintf(header + len, sizeof header - len,
                            "%s\"blocks.%d.weight\":{\"dtype\":\"U8\",\"shape\":[%d,%d],"
                            "\"data_offsets\":[%d,%d]}",
                            i == 0 ? "" : ",", i, SIDE, SIDE, i * BLOCK_BYTES,
                            (i + 1) * BLOCK_BYTES);
  }
  len += (size_t)snprintf(header + len, sizeof header - len, "}");
  while (len % 8 != 0) {
    header[len++] = ' ';
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
    for (size_t at = 0; at < BLOCK_BYTES && !bad; at++) {
      bad |= fputc(expected_byte(i, at), f) == EOF;
    }
  }
  bad |= fclose(f) != 0;
  return bad;
}

/* A CPU context over `store`, with the model in one group onloaded to RAM from the file. */
static strata_context *context_over(strata_store *store, const char *model) {
  strata_options options = strata_options_default();
  options.vram_limit = 0;
  strata_context *ctx = NULL;
  if (failed("strata_context_create", strata_context_create(&options, &ctx))) {
    return NULL;
  }
  strata_tiers tiers = strata_tiers_default();
  tiers.offload.device = STRATA_DEVICE_DISK;
  tiers.onload.device = STRATA_DEVICE_CPU;
  uint64_t group = 0;
  strata_checkpoint *ckpt = NULL;
  size_t n = 0;
  if (failed("strata_context_attach_store", strata_context_attach_store(ctx, store)) ||
      failed("strata_group_create", strata_group_create(ctx, "model", &tiers, &group)) ||
      failed("strata_checkpoint_open", strata_checkpoint_open(ctx, model, &ckpt)) ||
      failed("strata_group_register_checkpoint",
             strata_group_register_checkpoint(ctx, group, ckpt, "blocks.", 2, &n)) ||
      failed("strata_group_onload", strata_group_onload(ctx, group))) {
    strata_checkpoint_close(ckpt);
    strata_context_destroy(ctx);
    return NULL;
  }
  strata_checkpoint_close(ckpt);
  return ctx;
}

/* Acquires block `i` and checks its bytes; returns its address, or NULL on failure. */
static const void *check_block(strata_context *ctx, int i) {
  char name[32];
  snprintf(name, sizeof name, "blocks.%d", i);
  uint64_t layer = 0;
  strata_tensor_view view;
  size_t count = 0;
  if (failed("strata_layer_find", strata_layer_find(ctx, name, &layer)) ||
      failed("strata_acquire_for_compute",
             strata_acquire_for_compute(ctx, layer, NULL, &view, 1, &count))) {
    return NULL;
  }
  const unsigned char *bytes = view.data;
  int bad = view.nbytes != BLOCK_BYTES;
  for (size_t at = 0; at < BLOCK_BYTES && !bad; at++) {
    bad = bytes[at] != expected_byte(i, at);
  }
  if (failed("strata_release", strata_release(ctx, layer, NULL)) || bad) {
    fprintf(stderr, "%s: wrong bytes\n", name);
    return NULL;
  }
  return view.data;
}

static int check_stats(strata_store *store, strata_context *const *contexts, int n_contexts) {
  strata_store_stats stats;
  memset(&stats, 0, sizeof stats);
  stats.struct_size = sizeof stats;
  if (failed("strata_store_stats_get", strata_store_stats_get(store, &stats))) {
    return 1;
  }
  uint64_t read = 0;
  for (int c = 0; c < n_contexts; c++) {
    strata_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = sizeof s;
    if (failed("strata_stats_get", strata_stats_get(contexts[c], &s))) {
      return 1;
    }
    read += s.bytes_from_disk;
  }
  printf("  store: %" PRIu64 " layers, %" PRIu64 " fills, %" PRIu64 " bytes held; contexts read %" PRIu64
         " bytes from disk\n",
         stats.layers, stats.fills, stats.host_in_use, read);
  if (stats.fills != N_BLOCKS || stats.layers != N_BLOCKS || read != N_BLOCKS * BLOCK_BYTES ||
      stats.host_in_use < (uint64_t)N_BLOCKS * BLOCK_BYTES) {
    fprintf(stderr, "the store did not hold each block once, read once\n");
    return 1;
  }
  return 0;
}

/* Two contexts, each over its own handle to the store (the same one for a store within the
 * process; two attachments of a named store): every block checked in both. */
static int run(strata_store *first, strata_store *second, const char *model, int one_copy) {
  strata_context *contexts[2] = {context_over(first, model), context_over(second, model)};
  int bad = contexts[0] == NULL || contexts[1] == NULL;
  for (int i = 0; i < N_BLOCKS && !bad; i++) {
    const void *a = check_block(contexts[0], i);
    const void *b = check_block(contexts[1], i);
    bad = a == NULL || b == NULL || (one_copy && a != b);
  }
  bad = bad || check_stats(first, contexts, 2);
  strata_context_destroy(contexts[0]);
  strata_context_destroy(contexts[1]);
  return bad;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s MODEL.safetensors\n", argv[0]);
    return 2;
  }
  const char *model = argv[1];
  if (write_checkpoint(model)) {
    return 1;
  }

  printf("two contexts over a store within this process:\n");
  strata_store_options options = strata_store_options_default();
  strata_store *store = NULL;
  if (failed("strata_store_create", strata_store_create(&options, &store))) {
    return 1;
  }
  int bad = run(store, store, model, 1);
  strata_store_destroy(store);

  printf("two attachments of a named store:\n");
  char name[64];
  snprintf(name, sizeof name, "example-%ld", (long)getpid());
  options.name = name;
  options.checkpoint = model;
  strata_store *created = NULL, *attached = NULL;
  if (failed("strata_store_create (creating)", strata_store_create(&options, &created)) ||
      failed("strata_store_create (attaching)", strata_store_create(&options, &attached))) {
    strata_store_destroy(created);
    return 1;
  }
  bad = bad || run(created, attached, model, 0);
  strata_store_destroy(created);
  strata_store_destroy(attached); /* the last out removes /dev/shm/strata-NAME */
  if (!bad) {
    printf("every byte matched; each block was read once and held once\n");
    printf("shared_store: OK\n");
  }
  return bad;
}
