/*
 * base.h — private helpers of the base layer shared by every other layer:
 * assertions for invariants, the arena allocator, files (mmap, atomic
 * write, checksums) and a thin wrapper over jansson for typed field access
 * with error messages that name the field.
 *
 * Internal names carry a module prefix (arena_, file_, js_, crc32_).
 */
#ifndef KILN_BASE_H
#define KILN_BASE_H

#include "kiln.h"

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- invariants ----------------------------------------------------- */

/* For programmer errors only; never fires on user input. */
#define KILN_ASSERT(cond)                                                  \
    do {                                                                   \
        if (!(cond)) kiln_assert_fail(#cond, __FILE__, __LINE__);          \
    } while (0)
void kiln_assert_fail(const char *expr, const char *file, int line)
    __attribute__((noreturn));

#define KILN_UNUSED(x) ((void)(x))
#define KILN_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KILN_MAX(a, b) ((a) > (b) ? (a) : (b))

/* malloc/calloc that record KILN_ERR_NOMEM on ctx when they fail. */
void *kiln_malloc(kiln_ctx *ctx, size_t n);
void *kiln_calloc(kiln_ctx *ctx, size_t count, size_t size);
/* 64-byte aligned allocation (free with free()); zeroed. */
void *kiln_aligned_alloc(kiln_ctx *ctx, size_t n);

/* ---- memo of precision AUTO (model/precision_auto.c) --------------- */

#define CTX_AUTO_WHY_CAP 192
/* The AUTO decision recorded on ctx for key (value a kiln_precision, why
 * the reason, f32/bf16 the probe's GFLOP/s or 0): false when none is
 * recorded for this key. *why points into ctx. */
bool ctx_auto_get(const kiln_ctx *ctx, int key, int *value, const char **why, double *f32,
                  double *bf16);
void ctx_auto_set(kiln_ctx *ctx, int key, int value, const char *why, double f32, double bf16);

/* ---- arena ---------------------------------------------------------- */

/* A bump allocator over one block: sized once, reset per step. Every
 * allocation is 64-byte aligned. */
typedef struct arena {
    unsigned char *base;
    size_t cap;
    size_t used;
    size_t peak;
} arena;

/* Allocates the block. Returns KILN_ERR_NOMEM on failure. */
kiln_status arena_init(kiln_ctx *ctx, arena *a, size_t cap);
/* Returns NULL when the arena is full (callers size it up front, so this
 * is an invariant violation in practice). */
void *arena_alloc(arena *a, size_t n);
void arena_reset(arena *a);
void arena_free(arena *a);

/* ---- files ---------------------------------------------------------- */

/* A read-only memory mapping of a whole file. */
typedef struct file_map {
    const unsigned char *data;
    size_t size;
} file_map;

/* Maps path read-only. Error message names the path. An empty file maps to
 * data == NULL, size == 0. */
kiln_status file_map_open(kiln_ctx *ctx, const char *path, file_map *m);
void file_map_close(file_map *m);

/* Reads a whole (small) file into a NUL-terminated malloc'ed buffer. */
kiln_status file_read_all(kiln_ctx *ctx, const char *path, char **out,
                          size_t *len);

/* Atomic write: writes to "<path>.tmp.<pid>", fsyncs, renames over path,
 * fsyncs the directory. A crash leaves either the old or the new file. */
kiln_status file_write_atomic(kiln_ctx *ctx, const char *path,
                              const void *data, size_t len);

/* Streaming atomic writer for large files. */
typedef struct file_writer {
    FILE *f;
    char *tmp_path;
    char *final_path;
    uint32_t crc;
    bool failed;
} file_writer;
kiln_status file_writer_open(kiln_ctx *ctx, file_writer *w, const char *path);
/* Appends; errors are sticky and reported by commit. */
void file_writer_write(file_writer *w, const void *data, size_t len);
/* Flushes, fsyncs, renames into place. On failure removes the temp file. */
kiln_status file_writer_commit(kiln_ctx *ctx, file_writer *w);
/* Abandons the write, removing the temp file. */
void file_writer_abort(file_writer *w);

/* Called by file_walk for each file it selects, with its size in bytes. */
typedef kiln_status (*file_visit_fn)(kiln_ctx *ctx, void *ud, const char *path,
                                     int64_t size);

/* Visits path: a regular file, or a directory walked recursively in sorted
 * name order. Inside directories, hidden entries, symlinks, other
 * non-regular files and binary files (a NUL byte in the first 4 KiB) are
 * skipped. A top-level path that is missing or neither a file nor a
 * directory is an error naming `what`, the option that gave it
 * (e.g. "kiln_tokenize_opts.inputs"). Stops at the first
 * status visit returns that is not KILN_OK and returns it. */
kiln_status file_walk(kiln_ctx *ctx, const char *path, const char *what,
                      file_visit_fn visit, void *ud);

/* mkdir -p. */
kiln_status file_mkdirs(kiln_ctx *ctx, const char *path);
bool file_exists(const char *path);
bool file_is_dir(const char *path);
/* fsync a directory (after renames inside it). */
kiln_status file_fsync_dir(kiln_ctx *ctx, const char *dir);
/* Joins dir and name into a malloc'ed path. */
char *file_join(const char *dir, const char *name);

/* ---- checksums ------------------------------------------------------ */

/* CRC-32C (Castagnoli). Pass crc=0 to start; chain by passing the
 * previous value. */
uint32_t crc32c(uint32_t crc, const void *data, size_t len);

/* ---- json (jansson) ------------------------------------------------- */

/* Parses a JSON file; the error names the path, line and column. Caller
 * json_decref()s the result. */
kiln_status js_load_file(kiln_ctx *ctx, const char *path, json_t **out);
/* Parses a buffer; `what` names the source in error messages. */
kiln_status js_load_buf(kiln_ctx *ctx, const char *buf, size_t len,
                        const char *what, json_t **out);

/* Typed getters. `what` names the source (a file path) for messages.
 * When the key is absent: required -> error; otherwise *out keeps its
 * value (the caller's default) and KILN_OK is returned. Wrong types are
 * always errors. */
kiln_status js_get_int(kiln_ctx *ctx, const json_t *obj, const char *key,
                       const char *what, bool required, int64_t *out);
kiln_status js_get_double(kiln_ctx *ctx, const json_t *obj, const char *key,
                          const char *what, bool required, double *out);
kiln_status js_get_bool(kiln_ctx *ctx, const json_t *obj, const char *key,
                        const char *what, bool required, bool *out);
/* *out points into obj (valid while obj lives). */
kiln_status js_get_str(kiln_ctx *ctx, const json_t *obj, const char *key,
                       const char *what, bool required, const char **out);

/* Writes a JSON value atomically (indented, sorted keys off). */
kiln_status js_save_file(kiln_ctx *ctx, const char *path, const json_t *v);

#endif /* KILN_BASE_H */
