/*
 * safetensors.h — reading and writing the safetensors format (io layer,
 * private): an 8-byte little-endian header length N, N bytes of JSON
 * ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
 * "__metadata__": {str: str}}), then the data buffer.
 *
 * Parsing validates everything the reference implementation does: header
 * size bounds (<= 100 MB and inside the file), JSON shape, known dtypes
 * (the plain types of the traits table, src/tensor/tensor.h),
 * shapes whose element count times the dtype size equals the byte range,
 * offsets inside the data buffer, no overlaps and no holes (the byte ranges
 * tile the buffer exactly). Any violation is KILN_ERR_FORMAT with a message
 * naming the file and the tensor.
 */
#ifndef KILN_SAFETENSORS_H
#define KILN_SAFETENSORS_H

#include "base/base.h"
#include "tensor/tensor.h"

#define ST_MAX_DIMS 8
#define ST_MAX_HEADER (100u * 1024u * 1024u)

typedef struct st_tensor {
    char *name;
    kiln_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t numel;
    size_t begin, end; /* byte range in the data buffer */
} st_tensor;

typedef struct st_file {
    file_map map;              /* when opened from a path */
    const unsigned char *data; /* the data buffer (after the header) */
    size_t data_size;
    st_tensor *tensors; /* sorted by begin offset */
    int n_tensors;
    json_t *metadata; /* "__metadata__" object or NULL (owned) */
} st_file;

/* Maps and validates path. On failure *f is left closed. */
kiln_status st_open(kiln_ctx *ctx, const char *path, st_file *f);
/* Validates an in-memory file (buf must outlive f). `what` names it. */
kiln_status st_parse(kiln_ctx *ctx, const unsigned char *buf, size_t len,
                     const char *what, st_file *f);
void st_close(st_file *f);
const st_tensor *st_find(const st_file *f, const char *name);

/* Converts tensor t (F32, F16, BF16 or F64) to fp32 into dst (t->numel
 * floats). Other dtypes: KILN_ERR_FORMAT naming the tensor. */
kiln_status st_read_f32(kiln_ctx *ctx, const st_file *f, const st_tensor *t,
                        const char *what, float *dst);

/* One tensor to write. data holds numel elements of dtype. */
typedef struct st_entry {
    const char *name;
    kiln_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
} st_entry;

/* Writes the tensors (in the given order) atomically to path, with
 * __metadata__ {"format": "pt"} plus the optional extra string pairs
 * meta_kv[0..2*n_meta) (key, value, key, value, ...). A dtype without
 * a safetensors spelling (the Q* block types) is KILN_ERR_INVALID_ARG,
 * nothing written. */
kiln_status st_save(kiln_ctx *ctx, const char *path, const st_entry *e,
                    int n, const char *const *meta_kv, int n_meta);

/* A model's weights: DIR/model.safetensors, or the shards that
 * DIR/model.safetensors.index.json's "weight_map" ({tensor: shard file})
 * names (HF's sharded checkpoints). Tensors are found by name in all the
 * files together. */
typedef struct st_ref {
    const char *name;    /* the tensor's (owned by its st_file) */
    int file;            /* index into files/paths */
    const st_tensor *t;
} st_ref;

typedef struct st_set {
    st_file *files;
    char **paths; /* full path of each file, for messages */
    int n_files;
    st_ref *refs; /* every tensor of every file, sorted by name */
    int n_refs;
} st_set;

/* Opens dir's weights: the index and its shards when
 * model.safetensors.index.json exists, else model.safetensors. Errors
 * (KILN_ERR_FORMAT unless the file system failed: KILN_ERR_IO) name the
 * file and the key: neither file present, an index that is not
 * {"weight_map": {name: file}}, a shard name that is not a plain file name
 * in dir, a shard that is missing or not valid safetensors, a tensor the
 * map places in a shard that lacks it, a tensor stored in two files. On
 * failure *out is left closed. */
kiln_status st_set_open_dir(kiln_ctx *ctx, const char *dir, st_set *out);
/* The tensor called name, or NULL; *file (may be NULL) gets its file's
 * index in out->files / out->paths. */
const st_tensor *st_set_find(const st_set *s, const char *name, int *file);
void st_set_close(st_set *s);

#endif /* KILN_SAFETENSORS_H */
