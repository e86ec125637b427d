/*
 * kiln.h — the one public header of kiln.
 *
 * If it is not declared here, it is not a published API. The CLI (tools/)
 * and examples/ use only this header. Every fallible call returns a
 * kiln_status; the message that goes with a failure (naming the file, field
 * or flag and what to do) is read with kiln_errmsg(ctx).
 *
 * Sections below are owned by layers (base, tensor, model, io, tokenizer,
 * data, train, tune, compress, infer, serve); each layer appends to its own
 * section only.
 */
#ifndef KILN_H
#define KILN_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KILN_VERSION "0.1.0"

/* ======================================================================
 * base: status codes, context, logging, rng
 * ====================================================================== */

/* One table generates the enum, kiln_status_str() and kiln_status_name().
 * Values are only ever appended. */
#define KILN_STATUS_MAP(XX)                                              \
    XX(OK, "success")                                                    \
    XX(ERR_INVALID_ARG, "invalid argument")                              \
    XX(ERR_IO, "input/output error")                                     \
    XX(ERR_FORMAT, "malformed or unsupported file format")               \
    XX(ERR_NOMEM, "out of memory")                                       \
    XX(ERR_UNSUPPORTED, "unsupported feature or configuration")          \
    XX(ERR_RANGE, "value out of range")                                  \
    XX(ERR_NUMERIC, "numerical failure (NaN or infinity)")               \
    XX(ERR_CHECKSUM, "checksum mismatch")                                \
    XX(ERR_INTERRUPTED, "interrupted")                                   \
    XX(ERR_DIST, "distributed communication failure")                    \
    XX(ERR_INTERNAL, "internal error")

typedef enum kiln_status {
#define KILN_XX_ENUM(name, msg) KILN_##name,
    KILN_STATUS_MAP(KILN_XX_ENUM)
#undef KILN_XX_ENUM
    KILN_STATUS_COUNT
} kiln_status;

/* Returns a static human-readable description ("success", ...). */
const char *kiln_status_str(kiln_status s);
/* Returns the static enum name without prefix ("OK", "ERR_IO", ...). */
const char *kiln_status_name(kiln_status s);

typedef enum kiln_log_level {
    KILN_LOG_ERROR = 0,
    KILN_LOG_WARN = 1,
    KILN_LOG_INFO = 2,
    KILN_LOG_DEBUG = 3
} kiln_log_level;

/* A context carries the last error message, the log level and the thread
 * count. There is no global mutable state: everything hangs off a ctx.
 * A ctx is not thread-safe; use one per thread that calls kiln. */
typedef struct kiln_ctx kiln_ctx;

/* Creates a context. Returns NULL only when out of memory. Free with
 * kiln_ctx_free(). Reads KILN_LOG (error|warn|info|debug) for the level. */
kiln_ctx *kiln_ctx_new(void);
void kiln_ctx_free(kiln_ctx *ctx);

/* The message of the last failure on ctx ("" when none). Valid until the
 * next kiln call on ctx. */
const char *kiln_errmsg(const kiln_ctx *ctx);

/* Records an error message (printf-style) and returns status s, so callers
 * can write `return kiln_fail(ctx, KILN_ERR_IO, "...", ...)`. The message
 * should name what was wrong (file, field, flag) and what to do. */
kiln_status kiln_fail(kiln_ctx *ctx, kiln_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void kiln_clear_error(kiln_ctx *ctx);

void kiln_set_log_level(kiln_ctx *ctx, kiln_log_level level);
kiln_log_level kiln_get_log_level(const kiln_ctx *ctx);
/* Logs to stderr when level <= the ctx's level. */
void kiln_log(const kiln_ctx *ctx, kiln_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Number of threads kiln's parallel kernels use (OpenMP). 0 = all cores. */
void kiln_set_threads(kiln_ctx *ctx, int n);
int kiln_get_threads(const kiln_ctx *ctx);

/* Seeded random numbers: xoshiro256** seeded by splitmix64. The state is
 * plain data so it can be saved in checkpoints and restored exactly. */
typedef struct kiln_rng {
    uint64_t s[4];
} kiln_rng;

void kiln_rng_seed(kiln_rng *r, uint64_t seed);
uint64_t kiln_rng_u64(kiln_rng *r);
/* Uniform in [0, 1) with 24 bits of precision. */
float kiln_rng_uniform(kiln_rng *r);
/* Uniform in [0, n); n > 0. Unbiased (rejection). */
uint64_t kiln_rng_below(kiln_rng *r, uint64_t n);
/* Standard normal (Box-Muller; no cached spare, so the state alone
 * determines the sequence). */
float kiln_rng_normal(kiln_rng *r);

/* Wall-clock seconds from a monotonic clock. */
double kiln_time_now(void);

/* ======================================================================
 * tensor: dtypes
 * ====================================================================== */

/* ======================================================================
 * model: config, parameters, forward, backward
 * ====================================================================== */

/* ======================================================================
 * io: safetensors, gguf, checkpoint directories
 * ====================================================================== */

/* ======================================================================
 * tokenizer
 * ====================================================================== */

/* ======================================================================
 * data: token shards, loaders, jsonl datasets
 * ====================================================================== */

/* ======================================================================
 * train: optimizer, schedules, loss scaler, trainer, distributed
 * ====================================================================== */

/* ======================================================================
 * tune / compress
 * ====================================================================== */

/* ======================================================================
 * infer: sampling, generation
 * ====================================================================== */

/* ======================================================================
 * serve: HTTP server
 * ====================================================================== */

#ifdef __cplusplus
}
#endif

#endif /* KILN_H */
