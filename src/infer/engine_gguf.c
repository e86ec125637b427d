/*
 * engine_gguf.c — an engine's matrices taken from the GGUF file its model
 * was loaded from, in the file's own types (kiln_engine_opts.weights_gguf):
 * a Q4_K_M file keeps its Q4_K and Q6_K blocks byte for byte instead of
 * being dequantized to fp32 and quantized again (which Q8_0 and Q4_0
 * survive exactly, Q4_K nearly, Q6_K not: its scale search does not
 * reproduce its own output).
 *
 * An engine matrix is one or more kiln tensors stacked by rows (llama's
 * q|k|v and gate|up); each is one GGUF tensor (model_gguf_tensors), stored
 * as rows of outputs, which is the layout the typed linear reads: gpt2's
 * transposed Conv1D is already rows there, llama's q and k rows are put
 * back from llama.cpp's interleaved order (a permutation of whole rows, so
 * quantized blocks move unchanged). A matrix whose parts differ in type,
 * or whose type the linear does not run (F16), is not taken: the caller
 * prepares it from the fp32 model as before.
 */
#include "infer/infer.h"
#include "kernels/kernels.h"
#include "model/model.h"

#include <stdlib.h>
#include <string.h>

static bool linear_runs(kiln_dtype t)
{
    return t == KILN_DTYPE_Q8_0 || t == KILN_DTYPE_Q4_0 || t == KILN_DTYPE_Q4_K ||
           t == KILN_DTYPE_Q6_K || t == KILN_DTYPE_BF16 || t == KILN_DTYPE_F32;
}

/* Bits per weight of a type the linear runs (to pick the widest part). */
static double bpw(kiln_dtype t)
{
    const dtype_traits *tr = dtype_traits_of(t);
    return 8.0 * (double)tr->block_bytes / (double)tr->block;
}

int engine_gguf_matrix(const kiln_model *m, const kiln_gguf *g, const model_gguf_tensor *list,
                       int n_list, const kern_wt *w32, kern_wt *out, kiln_dtype *hint)
{
    const float *lo = w32->data, *hi = lo + (size_t)w32->rows * w32->cols;
    const model_gguf_tensor *parts[8];
    kiln_gguf_tensor gt[8];
    int np = 0;
    for (int i = 0; i < n_list; i++) {
        const kiln_tensor_info *ti = kiln_model_tensor(m, list[i].src);
        const float *p = m->params + ti->offset;
        if (list[i].ndim != 2 || p < lo || p >= hi) continue;
        if (np == 8) return 0;
        parts[np++] = &list[i];
    }
    if (np == 0) return 0;
    /* in memory order: q, k, v / gate, up */
    for (int i = 1; i < np; i++)
        for (int j = i; j > 0 && kiln_model_tensor(m, parts[j]->src)->offset <
                                     kiln_model_tensor(m, parts[j - 1]->src)->offset; j--) {
            const model_gguf_tensor *t = parts[j];
            parts[j] = parts[j - 1], parts[j - 1] = t;
        }
    int64_t rows = 0;
    bool same = true;
    kiln_dtype wide = KILN_DTYPE_F32;
    for (int i = 0; i < np; i++) {
        int64_t k = kiln_gguf_find_tensor(g, parts[i]->name);
        if (k < 0 || !kiln_gguf_tensor_at(g, k, &gt[i]) || !linear_runs(gt[i].dtype) ||
            gt[i].ne[0] != w32->cols)
            return 0;
        if (gt[i].dtype != gt[0].dtype) same = false;
        if (i == 0 || bpw(gt[i].dtype) > bpw(wide)) wide = gt[i].dtype;
        rows += gt[i].ne[1];
    }
    if (rows != w32->rows) return 0;
    if (!same) {
        *hint = wide;
        return 2;
    }
    const kiln_dtype dt = gt[0].dtype;
    const size_t rb = dtype_row_bytes(dt, w32->cols);
    uint8_t *d = kiln_aligned_alloc(NULL, rb * (size_t)rows + 64);
    if (!d) return -1;
    int64_t r0 = 0;
    for (int i = 0; i < np; i++) {
        const uint8_t *src = gt[i].data;
        int64_t R = gt[i].ne[1];
        bool perm = parts[i]->op == MODEL_GGUF_PERMUTE_Q || parts[i]->op == MODEL_GGUF_PERMUTE_K;
        int64_t HS = perm ? R / parts[i]->n_head : 0;
        for (int64_t r = 0; r < R; r++) {
            int64_t dr = r0 + (perm ? model_gguf_perm_src(r, HS) : r);
            memcpy(d + rb * (size_t)dr, src + rb * (size_t)r, rb);
        }
        r0 += R;
    }
    *out = (kern_wt){dt, KERN_W_OUT_IN, w32->rows, w32->cols, d};
    return 1;
}
