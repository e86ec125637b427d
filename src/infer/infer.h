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

/* engine_gguf.c: the engine matrix whose fp32 form (in the model m,
 * loaded from the GGUF file g) is w32, taken from g's tensors in their own
 * type into *out (owned: kern_weight_free). Returns 1 when taken; 2 when
 * its stacked parts are of different types the linear runs (a q|k|v of
 * Q4_K and Q6_K): prepare it from w32 as *hint, the widest of them; 0
 * when it cannot be taken (a type the linear does not run, such as F16, or
 * a shape that does not match): prepare it as the caller's type; -1 when
 * out of memory. list: model_gguf_tensors(m). */
struct kiln_model;
struct model_gguf_tensor;
struct kern_wt;
int engine_gguf_matrix(const struct kiln_model *m, const kiln_gguf *g,
                       const struct model_gguf_tensor *list, int n_list,
                       const struct kern_wt *w32, struct kern_wt *out, kiln_dtype *hint);

#endif /* KILN_INFER_H */
