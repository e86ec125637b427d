/*
 * gguf.h — reading and writing GGUF (io layer, private), the file format
 * of llama.cpp / ggml: a header (magic "GGUF", version, tensor and
 * key-value counts), typed key-value metadata, tensor infos (name, shape
 * in ggml order ne[0] = row length, ggml type = kiln_dtype, offset), then
 * the aligned tensor data. All integers little-endian. docs/formats.md
 * describes the layout and the keys kiln writes.
 *
 * The reader maps the file and validates everything before use: magic,
 * version (2 or 3), every count and length against the bytes left
 * (overflow-safe), value types (no nested arrays), unique keys and tensor
 * names, general.alignment (a power of two), dimensions (1..4, each >= 0,
 * products without overflow), tensor types (a kiln_dtype; unknown ones are
 * refused naming the tensor), rows a whole number of blocks, offsets
 * aligned, inside the data section and not overlapping. Every failure is
 * KILN_ERR_FORMAT with a message naming the file and the key or tensor.
 * Nothing is copied: values and tensor data point into the mapping.
 *
 * The writer collects metadata and tensor infos, then streams the file
 * through a temporary name (file_writer: fsync, rename), asking a callback
 * for each tensor's bytes in order; the data are tightly packed with
 * general.alignment (32) padding, as llama.cpp requires.
 */
#ifndef KILN_GGUF_H
#define KILN_GGUF_H

#include "base/base.h"
#include "tensor/tensor.h"

#define GGUF_MAGIC "GGUF"
#define GGUF_VERSION 3
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4
/* llama.cpp's GGML_MAX_NAME: tensor names are shorter than 64 bytes */
#define GGUF_MAX_NAME 64

/* Value types of the metadata (GGUF's gguf_type numbers). */
typedef enum gguf_type {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
    GGUF_TYPE_COUNT
} gguf_type;

/* The name of a value type ("uint32", "string", ...; "?" when unknown). */
const char *gguf_type_name(uint32_t t);
/* Bytes of a scalar of type t; 0 for string, array and unknown types. */
size_t gguf_type_size(uint32_t t);

/* One key-value pair. For a scalar, n = 1 and val points at its bytes; a
 * string's val points at its (u64 length, bytes); an array's val points at
 * its first element (arr_type says which) and n is the element count. */
typedef struct gguf_kv {
    char *key;         /* NUL-terminated copy */
    uint32_t type;     /* gguf_type */
    uint32_t arr_type; /* element type when type == GGUF_TYPE_ARRAY */
    uint64_t n;
    const unsigned char *val;
    size_t val_size; /* bytes of the value (for arrays: of all elements) */
} gguf_kv;

typedef struct gguf_tensor {
    char *name; /* NUL-terminated copy */
    kiln_dtype type;
    int ndim;
    int64_t ne[GGUF_MAX_DIMS]; /* ne[0] = row length; unused dims are 1 */
    uint64_t offset;           /* from the start of the data section */
    size_t bytes;
    const unsigned char *data; /* into the mapping */
} gguf_tensor;

typedef struct gguf_file {
    file_map map; /* when opened from a path */
    uint32_t version;
    size_t alignment;
    gguf_kv *kv;
    int64_t n_kv;
    gguf_tensor *tensors; /* in file order */
    int64_t n_tensors;
    const unsigned char *data; /* the data section */
    size_t data_size;
} gguf_file;

/* Maps and validates path. On failure *f is left closed. */
kiln_status gguf_open(kiln_ctx *ctx, const char *path, gguf_file *f);
/* Validates an in-memory file (buf must outlive f); `what` names it. */
kiln_status gguf_parse(kiln_ctx *ctx, const unsigned char *buf, size_t len,
                       const char *what, gguf_file *f);
void gguf_close(gguf_file *f);
/* True when the first bytes of path are GGUF's magic. */
bool gguf_is_gguf(const char *path);

const gguf_kv *gguf_find(const gguf_file *f, const char *key);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);

/* Typed getters. `what` names the file in messages. When the key is
 * absent: required -> KILN_ERR_FORMAT naming the key; otherwise *out keeps
 * its value and KILN_OK is returned. A value of the wrong type is always
 * an error naming the key and both types. gguf_get_int accepts every
 * integer type (and checks the value fits in int64); gguf_get_float
 * FLOAT32 and FLOAT64; gguf_get_str returns a pointer into the mapping
 * (not NUL-terminated) and its length. */
kiln_status gguf_get_int(kiln_ctx *ctx, const gguf_file *f, const char *what,
                         const char *key, bool required, int64_t *out);
kiln_status gguf_get_float(kiln_ctx *ctx, const gguf_file *f, const char *what,
                           const char *key, bool required, double *out);
kiln_status gguf_get_bool(kiln_ctx *ctx, const gguf_file *f, const char *what,
                          const char *key, bool required, bool *out);
kiln_status gguf_get_str(kiln_ctx *ctx, const gguf_file *f, const char *what,
                         const char *key, bool required, const char **out,
                         size_t *len);
/* The array under key, whose elements must be of elem_type (any integer
 * type when elem_type is GGUF_TYPE_INT64: see gguf_arr_int). *out is NULL
 * when the key is absent and not required. */
kiln_status gguf_get_arr(kiln_ctx *ctx, const gguf_file *f, const char *what,
                         const char *key, bool required, uint32_t elem_type,
                         const gguf_kv **out);
/* Element i of an integer array, widened. */
int64_t gguf_arr_int(const gguf_kv *kv, uint64_t i);
/* The strings of a string array: ptrs[i] (into the mapping, not
 * NUL-terminated) and lens[i], arrays of kv->n malloc'ed here (free both). */
kiln_status gguf_arr_strs(kiln_ctx *ctx, const gguf_kv *kv, const char ***ptrs,
                          size_t **lens);

/* ---- writer (gguf_write.c) -------------------------------------------- */

typedef struct gguf_wtensor {
    char *name;
    kiln_dtype type;
    int ndim;
    int64_t ne[GGUF_MAX_DIMS];
    size_t bytes;
    uint64_t offset;
} gguf_wtensor;

typedef struct gguf_writer {
    unsigned char *kv; /* the serialised key-value section */
    size_t kv_len, kv_cap;
    uint64_t n_kv;
    gguf_wtensor *t;
    int n_t, cap_t;
    bool oom; /* sticky: reported by gguf_write */
    size_t alignment;
} gguf_writer;

void gguf_writer_init(gguf_writer *w);
void gguf_writer_free(gguf_writer *w);
/* Appends a key-value pair (keys must be unique: the caller's contract). */
void gguf_w_u32(gguf_writer *w, const char *key, uint32_t v);
void gguf_w_i32(gguf_writer *w, const char *key, int32_t v);
void gguf_w_u64(gguf_writer *w, const char *key, uint64_t v);
void gguf_w_f32(gguf_writer *w, const char *key, float v);
void gguf_w_f64(gguf_writer *w, const char *key, double v);
void gguf_w_bool(gguf_writer *w, const char *key, bool v);
void gguf_w_str(gguf_writer *w, const char *key, const char *s);
/* Any numeric or bool scalar: v points at its value in memory (e.g. an
 * int16_t for GGUF_TYPE_INT16). */
void gguf_w_scalar(gguf_writer *w, const char *key, uint32_t type, const void *v);
void gguf_w_strn(gguf_writer *w, const char *key, const char *s, size_t len);
/* A numeric (or bool) array: n elements of elem_type, little-endian
 * bytes as laid out in memory on this (little-endian) machine. */
void gguf_w_arr(gguf_writer *w, const char *key, uint32_t elem_type,
                const void *data, uint64_t n);
/* An array of n strings; lens may be NULL (strlen). */
void gguf_w_arr_str(gguf_writer *w, const char *key, const char *const *s,
                    const size_t *lens, uint64_t n);
/* Declares the next tensor: ne[0] (the row length) must be a multiple of
 * the type's block. Errors (bad name, shape, type) name the tensor. */
kiln_status gguf_w_tensor(kiln_ctx *ctx, gguf_writer *w, const char *name,
                          kiln_dtype type, int ndim, const int64_t *ne);

/* Fills dst with the bytes (w->t[i].bytes of them) of tensor i. */
typedef kiln_status (*gguf_fill_fn)(kiln_ctx *ctx, void *ud, int i, void *dst,
                                    size_t bytes);
/* Writes the file atomically; fill is called for tensors 0, 1, ... in
 * order. On failure nothing is left under path. */
kiln_status gguf_write(kiln_ctx *ctx, gguf_writer *w, const char *path,
                       gguf_fill_fn fill, void *ud);

#endif /* KILN_GGUF_H */
