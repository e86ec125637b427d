/*
 * infer.h — private interface of the inference layer. The engine runs the
 * model's own layer (model/block.c) on the backend's ops (kernels.h);
 * this header holds what the layer's other files share.
 */
#ifndef KILN_INFER_H
#define KILN_INFER_H

#include "base/base.h"
#include "tensor/tensor.h"

/* Copies n bytes into a malloc'ed NUL-terminated string of valid UTF-8,
 * each invalid byte replaced by U+FFFD; *out_len gets its length. */
char *infer_utf8_sanitize(const char *p, size_t n, size_t *out_len);

#endif /* KILN_INFER_H */
