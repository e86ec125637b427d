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
 * section only. Why it is over ~800 lines: it is the whole published API in
 * one place (SQLite's sqlite.h is the model), one section per layer.
 */
#ifndef KILN_H
#define KILN_H

#include <stdbool.h>
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
 * should name what was wrong (file, field, option) and what to do. A
 * message about an option names its field as STRUCT.FIELD, e.g.
 * "kiln_train_opts.batch = 0 must be positive" (nested: kiln_train_opts.
 * dist.timeout_s), never a command-line flag: the kiln command maps these
 * names to its flags when it prints them (tools/cli.c). */
kiln_status kiln_fail(kiln_ctx *ctx, kiln_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void kiln_clear_error(kiln_ctx *ctx);

void kiln_set_log_level(kiln_ctx *ctx, kiln_log_level level);
kiln_log_level kiln_get_log_level(const kiln_ctx *ctx);
/* Logs when level <= the ctx's level: to the ctx's log function, else to
 * stderr as "kiln: LEVEL: message". Log lines name options as errors do. */
void kiln_log(const kiln_ctx *ctx, kiln_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Receives each log line (msg without prefix or newline) instead of stderr.
 * It may be called from the threads kiln starts. NULL restores stderr. */
typedef void (*kiln_log_fn)(void *user, kiln_log_level level, const char *msg);
void kiln_set_log_fn(kiln_ctx *ctx, kiln_log_fn fn, void *user);

/* Number of threads kiln's parallel kernels use (OpenMP). 0 = auto: one
 * per physical core of the CPUs this process may run on (hyperthread
 * siblings share a core's FMA units), or OpenMP's own choice when
 * OMP_NUM_THREADS is set. kiln_get_threads returns the resolved count, or
 * 0 when OpenMP decides. */
void kiln_set_threads(kiln_ctx *ctx, int n);
int kiln_get_threads(const kiln_ctx *ctx);

/* The folder where kiln keeps what outlives a process: today the result of
 * precision AUTO's probe per CPU (docs/precision.md). NULL or "" (the
 * default): no cache, the probe runs in every process. The kiln command
 * sets $XDG_CACHE_HOME/kiln, else ~/.cache/kiln (the library reads no
 * environment variable for it). Created when first written; a folder that
 * cannot be written only means probing again. The string is copied.
 * Errors: KILN_ERR_NOMEM. */
kiln_status kiln_set_cache_dir(kiln_ctx *ctx, const char *dir);
/* NULL when none is set. */
const char *kiln_get_cache_dir(const kiln_ctx *ctx);
/* Whether precision AUTO measures bf16 against fp32 products on this CPU
 * (true, the default: a probe of a few milliseconds, cached per CPU) or
 * trusts the capability table without measuring (false: bf16 whenever the
 * CPU has bf16 hardware; for tests, and where the probe's timing is not
 * trusted, e.g. a machine busy with other work). */
void kiln_set_precision_probe(kiln_ctx *ctx, bool on);
bool kiln_get_precision_probe(const kiln_ctx *ctx);

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

/* The element type of a tensor: one enum for files, storage and compute.
 * Values 0..999 ARE GGUF's tensor type numbers (ggml's enum ggml_type), so
 * a GGUF header's type field is a kiln_dtype as it stands; numbers GGUF
 * defines that kiln has no entry for yet (the IQ formats, 16..23 and 29)
 * are left out, never reused. Types that safetensors has and GGUF does not
 * are numbered from 1000 up, where GGUF never goes. Block-quantized types
 * (Q*) store blocks of 32 or 256 elements; the rest store one element per
 * "block". Sizes, names and conversions: kiln_dtype_name and, inside the
 * library, the traits table of src/tensor/tensor.h (docs/architecture.md,
 * "dtypes"). Values are only ever appended. */
typedef enum kiln_dtype {
    KILN_DTYPE_F32 = 0,
    KILN_DTYPE_F16 = 1,
    KILN_DTYPE_Q4_0 = 2,
    KILN_DTYPE_Q4_1 = 3,
    KILN_DTYPE_Q5_0 = 6,
    KILN_DTYPE_Q5_1 = 7,
    KILN_DTYPE_Q8_0 = 8,
    KILN_DTYPE_Q8_1 = 9,
    KILN_DTYPE_Q2_K = 10,
    KILN_DTYPE_Q3_K = 11,
    KILN_DTYPE_Q4_K = 12,
    KILN_DTYPE_Q5_K = 13,
    KILN_DTYPE_Q6_K = 14,
    KILN_DTYPE_Q8_K = 15,
    KILN_DTYPE_I8 = 24,
    KILN_DTYPE_I16 = 25,
    KILN_DTYPE_I32 = 26,
    KILN_DTYPE_I64 = 27,
    KILN_DTYPE_F64 = 28,
    KILN_DTYPE_BF16 = 30,
    /* not in GGUF (safetensors only): a private range */
    KILN_DTYPE_U8 = 1000,
    KILN_DTYPE_BOOL = 1001,
    KILN_DTYPE_U16 = 1002,
    KILN_DTYPE_U32 = 1003,
    KILN_DTYPE_U64 = 1004,
    KILN_DTYPE_END /* one past the largest value; not a type */
} kiln_dtype;

/* GGUF's (ggml's) name of t ("f32", "bf16", "q4_0", "q6_K", ...; for the
 * private range, the safetensors spelling in lower case: "u8", "bool");
 * "?" for a value that is not a kiln_dtype. Static storage. */
const char *kiln_dtype_name(kiln_dtype t);
/* Whether t is one of the values above. */
bool kiln_dtype_valid(int t);

/* ======================================================================
 * model: config, parameters, forward, backward
 * ====================================================================== */

typedef enum kiln_arch {
    KILN_ARCH_GPT2 = 0,  /* learned positions, LayerNorm, GELU MLP, biases */
    KILN_ARCH_LLAMA = 1  /* RoPE, RMSNorm, SwiGLU MLP, GQA, no biases      */
} kiln_arch;

/* The config.json spelling of an arch llama model: which HF model_type it
 * reads from and writes back. Qwen2 and Mistral (without a sliding window)
 * are Llama's math with other biases; the type only names them. */
typedef enum kiln_hf_type {
    KILN_HF_TYPE_NATIVE = 0,  /* the arch's own: gpt2 or llama             */
    KILN_HF_TYPE_QWEN2 = 1,   /* qwen2: q/k/v biases, no o_proj bias        */
    KILN_HF_TYPE_MISTRAL = 2  /* mistral: sliding_window >= the context     */
} kiln_hf_type;

/* The transformer family's hyper-parameters, read from / written to an
 * HF-style config.json (model_type gpt2 | llama | qwen2 | mistral; the
 * last two are arch llama). Shapes elsewhere use
 * B (batch), T (time), C (n_embd), V (vocab_size), L (n_layer),
 * NH (n_head), KVH (n_kv_head), HS = C / NH (head size), F (n_inner). */
typedef struct kiln_config {
    kiln_arch arch;
    int n_layer;         /* L */
    int n_embd;          /* C */
    int n_head;          /* NH */
    int n_kv_head;       /* KVH; == NH without GQA */
    int n_inner;         /* F: MLP hidden size (gpt2 default 4C) */
    int vocab_size;      /* V */
    int n_ctx;           /* maximum sequence length */
    float norm_eps;      /* LayerNorm / RMSNorm epsilon */
    float rope_theta;    /* llama only */
    bool tie_embeddings; /* LM head shares the token embedding */
    bool bias;           /* biases on linear layers (gpt2: true) */
    int bos_token_id;    /* -1 when unset */
    int eos_token_id;    /* -1 when unset */
    bool qkv_bias;       /* llama: q/k/v biases without an o_proj bias
                            (qwen2); bias (all four) excludes it [false] */
    kiln_hf_type hf_type; /* model_type written to config.json [NATIVE] */
    /* LoRA adapters (PEFT's y = W x + (alpha/r) B (A x)) on the linear
     * layers whose slots lora_targets has (bit s: kiln_lora_slot_name(arch,
     * s)); lora_rank 0: none. A model with adapters has its base tensors
     * frozen and the adapters' tensors after each layer's own, named as
     * PEFT names them without its "base_model.model." prefix. Written to
     * config.json as "kiln_lora" (a checkpoint of a LoRA run resumes). */
    int lora_rank;
    float lora_alpha;
    float lora_dropout;   /* on the adapter's input, in training only */
    unsigned lora_targets;
} kiln_config;

typedef struct kiln_model kiln_model;

/* ---- LoRA (src/model/lora.c, src/model/adapter.c) ----------------------
 * The adapter slots of an architecture: llama q_proj k_proj v_proj o_proj
 * gate_proj up_proj down_proj (7), gpt2 attn.c_attn attn.c_proj mlp.c_fc
 * mlp.c_proj (4). */
#define KILN_LORA_MAX_SLOTS 7
int kiln_lora_num_slots(kiln_arch arch);
/* The module path of slot s inside a layer, e.g. "self_attn.q_proj",
 * "mlp.c_fc" (NULL when out of range). */
const char *kiln_lora_slot_name(kiln_arch arch, int s);
/* PEFT's target_modules as a slot mask: a comma-separated list of module
 * names (q_proj, ..., c_attn, c_proj (both of gpt2), c_fc) or "all-linear"
 * (every slot: PEFT's all-linear, which leaves out the LM head). An
 * unknown name fails naming it and the names arch has (what: the option
 * named in the message). */
kiln_status kiln_lora_parse_targets(kiln_ctx *ctx, kiln_arch arch, const char *list,
                                    const char *what, unsigned *mask);
typedef struct kiln_lora_opts {
    int rank;          /* r >= 1 */
    float alpha;       /* scale = alpha / r */
    float dropout;     /* [0, 1) */
    unsigned targets;  /* slot mask (kiln_lora_parse_targets) */
    uint64_t seed;     /* A's Kaiming-uniform init and the dropout masks */
} kiln_lora_opts;
/* Replaces *m by a model with adapters (opts) over its weights: base
 * tensors copied and frozen, A Kaiming-uniform (PEFT: kaiming_uniform_(a =
 * sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))), B zero. Before
 * kiln_model_prepare. Errors name kiln_lora_opts.FIELD. */
kiln_status kiln_model_add_lora(kiln_ctx *ctx, kiln_model **m, const kiln_lora_opts *opts);
/* Replaces *m (with adapters) by the base model with W += (alpha/r) B A
 * merged in (PEFT's merge_and_unload; fan_in_fan_out for gpt2's Conv1D). */
kiln_status kiln_model_merge_lora(kiln_ctx *ctx, kiln_model **m);
/* Dropout on the adapters' inputs (lora_dropout) applies in the forward
 * and backward while on (training; the trainer turns it on for each
 * micro-batch and off for evaluation). Each forward while on draws new
 * masks, a function of seed and the forwards since this call (the
 * trainer passes one of its seed, step and micro-batch: a resumed run
 * draws the same masks). Off by default. */
void kiln_model_lora_train(kiln_model *m, bool on, uint64_t seed);
/* Writes the adapters of m as a PEFT directory: adapter_config.json
 * (base_model: base_model_name_or_path, may be NULL) and
 * adapter_model.safetensors with PEFT's names (written atomically). */
kiln_status kiln_lora_save(kiln_ctx *ctx, const kiln_model *m, const char *dir,
                           const char *base_model);
/* Reads PEFT adapter directory dir over base *m (replaced by the model
 * with adapters): r, lora_alpha, lora_dropout from adapter_config.json,
 * the targets from the tensors present; every tensor's name and shape
 * checked against the base (a mismatch names the tensor and both
 * shapes). */
kiln_status kiln_model_load_adapter(kiln_ctx *ctx, kiln_model **m, const char *dir);

/* A small gpt2 config (L=4, C=256, NH=4, V=257 bytes+eot, n_ctx=256). */
kiln_config kiln_config_default(void);
/* Reads config.json. Unknown keys that change the math are rejected with a
 * message naming the key; informational keys are accepted. */
kiln_status kiln_config_load(kiln_ctx *ctx, const char *path, kiln_config *out);
/* Writes config.json atomically with HF key names. */
kiln_status kiln_config_save(kiln_ctx *ctx, const char *path,
                             const kiln_config *cfg);
/* Checks consistency (divisibility, ranges); message names the key. */
kiln_status kiln_config_validate(kiln_ctx *ctx, const kiln_config *cfg);
/* Number of fp32 parameters the config implies. */
size_t kiln_config_num_params(const kiln_config *cfg);

typedef struct kiln_model kiln_model;

/* The parameter registry: one entry per named parameter tensor, a view
 * into the contiguous parameter block. Names and shapes are those of HF
 * GPT2LMHeadModel / LlamaForCausalLM. Entries are read-only to callers;
 * trainable changes through kiln_model_set_trainable, group through
 * kiln_model_set_group. */
typedef struct kiln_tensor_info {
    const char *name;  /* e.g. "transformer.h.0.attn.c_attn.weight" */
    int ndim;
    int64_t shape[4];
    size_t offset;     /* in elements from kiln_model_params() */
    size_t numel;
    bool decay;        /* group is "decay" (kept for older callers) */
    kiln_dtype dtype;  /* storage dtype of the parameter: KILN_DTYPE_F32 */
    bool trainable;    /* false: frozen (no gradient, no optimizer state)
                          [true] */
    const char *group; /* parameter group for the optimizer: "decay"
                          (matrices) or "no_decay" (norms, biases,
                          embeddings) by default; kiln_model_set_group */
} kiln_tensor_info;

/* Creates a model with zeroed parameters. Free with kiln_model_free. */
kiln_status kiln_model_new(kiln_ctx *ctx, const kiln_config *cfg,
                           kiln_model **out);
/* GPT-2 initialisation: N(0, 0.02), residual projections scaled by
 * 1/sqrt(2L), norms 1, biases 0. Same seed, same weights. */
void kiln_model_init_random(kiln_model *m, uint64_t seed);
/* Loads DIR/config.json + DIR/model.safetensors (validated) or the shards
 * DIR/model.safetensors.index.json names, or a GGUF
 * file (gpt2 or llama; its tensors dequantized to fp32, llama's q/k rows
 * put back in HF order; docs/formats.md). */
kiln_status kiln_model_load(kiln_ctx *ctx, const char *dir, kiln_model **out);
/* Writes DIR/config.json + DIR/model.safetensors atomically (creates DIR). */
kiln_status kiln_model_save(kiln_ctx *ctx, const kiln_model *m,
                            const char *dir);
void kiln_model_free(kiln_model *m);

const kiln_config *kiln_model_config(const kiln_model *m);
size_t kiln_model_num_params(const kiln_model *m);

/* Access to the parameters. The model may keep derived copies of its
 * weights (the packed bf16/fp16 operands of mixed precision); the contract
 * below means a caller can never make a product use a stale copy:
 *  - kiln_model_params: read-only view of the fp32 parameter block
 *    (kiln_tensor_info.offset indexes it). No side effect.
 *  - kiln_model_set_tensor: copies values into one named tensor; the
 *    model knows, and the next forward re-derives what depends on it.
 *  - kiln_model_params_mut: the block for writing at any time. From this
 *    call on, the model assumes its weights may change between any two
 *    calls: every forward re-derives its packed copies (no cost in fp32;
 *    in bf16/fp16 one conversion of the weights per forward) and the
 *    optimizer step no longer refreshes them in place. Prefer
 *    kiln_model_set_tensor or kiln_model_adamw_step where they do.
 *  - a load, kiln_model_init_random and kiln_model_adamw_step tell the
 *    model themselves.
 * Between the micro-steps of a gradient accumulation (no write between
 * two forwards) the model keeps its packed copies by itself. */
const float *kiln_model_params(const kiln_model *m);
float *kiln_model_params_mut(kiln_model *m);
/* Copies numel floats into the tensor named name. Errors name the tensor:
 * KILN_ERR_INVALID_ARG for an unknown name or numel != its numel. */
kiln_status kiln_model_set_tensor(kiln_ctx *ctx, kiln_model *m, const char *name,
                                  const float *data, size_t numel);
/* The gradient block mirroring the parameters (same offsets), NULL before
 * kiln_model_prepare: the gradients accumulated by the backward passes
 * since the last kiln_model_zero_grad. Read-only; frozen tensors' ranges
 * read as zeros. The pointer stays valid; its values are those of the
 * last backward (read them after it, not between kiln_model_zero_grad and
 * the next backward). */
const float *kiln_model_grads(const kiln_model *m);
int kiln_model_num_tensors(const kiln_model *m);
const kiln_tensor_info *kiln_model_tensor(const kiln_model *m, int i);
/* Index of the tensor with this HF name, or -1. */
int kiln_model_find_tensor(const kiln_model *m, const char *name);

/* Freezes (trainable = false) or unfreezes every tensor whose name
 * matches pattern: an exact name, or a shell glob (fnmatch(3) without
 * flags: '*' matches any run of characters including '.', '?' one
 * character, [abc] a set), e.g. "*.attn.*", "transformer.h.0.*",
 * "model.layers.[0-3].*", "*" (everything). A frozen tensor gets no
 * gradient (the backward skips its weight gradient; its range of
 * kiln_model_grads reads as zeros), no optimizer state
 * (kiln_adamw_new_for_model, which must come after this call), and its
 * values never change in kiln_model_adamw_step. Returns the number of
 * tensors matched (>= 1) in *matched (may be NULL). Errors:
 * KILN_ERR_INVALID_ARG naming the pattern when no tensor matches (m
 * unchanged). Tied embeddings are one tensor (the token embedding). An
 * optimizer made before the call keeps the state it has (make it again:
 * kiln_adamw_new_for_model). */
kiln_status kiln_model_set_trainable(kiln_ctx *ctx, kiln_model *m, const char *pattern,
                                     bool trainable, int *matched);
/* Moves every tensor matching pattern (as above) into parameter group
 * group (copied; 1..63 characters of [A-Za-z0-9_.-]), e.g. "embed" for
 * a group of its own learning-rate multiplier (kiln_adamw_opts.groups).
 * Returns the count in *matched (may be NULL). Errors:
 * KILN_ERR_INVALID_ARG naming the pattern (no match) or the group. */
kiln_status kiln_model_set_group(kiln_ctx *ctx, kiln_model *m, const char *pattern,
                                 const char *group, int *matched);
/* Number of trainable parameters (elements of trainable tensors). */
size_t kiln_model_num_trainable(const kiln_model *m);

/* Allocates gradients and the activation arena for batches up to (B, T).
 * Call again to grow. T <= n_ctx is checked (the error names B or T). */
kiln_status kiln_model_prepare(kiln_ctx *ctx, kiln_model *m, int B, int T);
/* Forward pass. tokens (B, T) in [0, V) (checked). *logits (B, T, V)
 * points into the model's activations, valid until the next forward;
 * callers may overwrite it with dlogits in place. */
kiln_status kiln_model_forward(kiln_ctx *ctx, kiln_model *m,
                               const int32_t *tokens, int B, int T,
                               float **logits);
/* Forward pass of packed rows: several documents in one row of T, each
 * token attending only to its own document up to itself (a block-diagonal
 * causal mask) and its position (RoPE, or gpt2's learned positions)
 * restarting at 0 in every document -- padding-free / varlen training.
 * pos (B, T): each token's position inside its document; a document starts
 * where pos is 0 and counts up by 1 (checked; the error names the row and
 * position). pos NULL is kiln_model_forward. A row holding one document
 * (pos 0..T-1) gives kiln_model_forward's result. The following backward
 * uses the same documents. Attention runs document by document: in bf16
 * on the AMX attention where the CPU has it (as unpacked rows), else on
 * the fp32 attention kernels. */
kiln_status kiln_model_forward_pos(kiln_ctx *ctx, kiln_model *m, const int32_t *tokens,
                                   const int32_t *pos, int B, int T, float **logits);
/* Backward pass of the last forward: accumulates d(loss)/d(params) into
 * the gradient block given dlogits (B, T, V) (may alias the logits). */
kiln_status kiln_model_backward(kiln_ctx *ctx, kiln_model *m,
                                const float *dlogits);
/* kiln_cross_entropy on the logits of the last forward (N = B*T rows;
 * targets, mask, grad_scale, the sums as there) and then the backward
 * from its gradient: the same as the two calls, with the logits' gradient
 * written in place. In bf16 the gradient goes straight into the packed
 * operands of the LM head's backward and is never stored as fp32 (the
 * loss's last bits may differ from kiln_cross_entropy's: it is summed
 * per 32 rows). */
kiln_status kiln_model_backward_ce(kiln_ctx *ctx, kiln_model *m, const int32_t *targets,
                                   const float *mask, float grad_scale, double *loss_sum,
                                   double *weight_sum);
void kiln_model_zero_grad(kiln_model *m);

/* Called by kiln_model_backward as soon as a contiguous range of the
 * gradient block is final (per layer, in reverse layer order, then the
 * embeddings), so gradient communication can overlap the rest of the
 * backward pass. offset and numel are in floats from kiln_model_grads().
 * Every gradient float is reported exactly once per backward call
 * (frozen tensors' ranges too: zeros). */
typedef void (*kiln_grad_ready_fn)(void *ud, size_t offset, size_t numel);
void kiln_model_set_grad_hook(kiln_model *m, kiln_grad_ready_fn fn, void *ud);

/* Mixed precision (docs/precision.md): the compute dtype of the model's
 * matrix products. Parameters (the master weights), gradients and optimizer
 * state stay fp32; bf16/fp16 products take rounded copies of the weights
 * (refreshed once per forward pass, i.e. once per optimizer step) and of
 * the activations and accumulate in fp32. fp16 needs loss scaling (the
 * trainer's --precision fp16 does it). Values are only ever appended. */
typedef enum kiln_precision {
    KILN_PRECISION_FP32 = 0,
    KILN_PRECISION_BF16 = 1,
    KILN_PRECISION_FP16 = 2,
    KILN_PRECISION_AUTO = 3 /* bf16 where its products are measured faster
                               than fp32 here (kiln_precision_auto) */
} kiln_precision;

/* Parses "fp32" | "bf16" | "fp16" | "auto"; -1 when unknown. */
int kiln_precision_parse(const char *name);
const char *kiln_precision_name(kiln_precision p);
/* AUTO -> BF16 or FP32 by the capability table alone (BF16 when the CPU
 * has AMX-BF16 or AVX512_BF16, without measuring: what AUTO means with
 * kiln_set_precision_probe off); other values unchanged. The model's
 * setters resolve AUTO with kiln_precision_auto. */
kiln_precision kiln_precision_resolve(kiln_precision p);

/* Writes one line naming the CPU's mixed-precision features and the
 * kernel bf16/fp16 products run on (for logs and benchmarks) into buf. */
void kiln_precision_describe(char *buf, size_t cap);
/* Switches the model's matrix products to precision p (AUTO resolved),
 * keeping the kernel choice and activation mode last set with
 * kiln_model_set_precision_opts (default: AUTO kernel, bf16 activations).
 * Errors: KILN_ERR_NOMEM. */
kiln_status kiln_model_set_precision(kiln_ctx *ctx, kiln_model *m,
                                     kiln_precision p);
kiln_precision kiln_model_precision(const kiln_model *m);

/* The kernel behind bf16 and fp16 matrix products. A kernel this CPU
 * lacks falls back to the best one it has (no error). Values are only ever
 * appended. */
typedef enum kiln_bf16_kernel {
    KILN_BF16_KERNEL_AUTO = 0,   /* the fastest here: AMX, AVX512, then REF */
    KILN_BF16_KERNEL_REF = 1,    /* portable C (the oracle) */
    KILN_BF16_KERNEL_AVX512 = 2, /* AVX512_BF16 dot products */
    KILN_BF16_KERNEL_AMX = 3     /* AMX-BF16 tiles */
} kiln_bf16_kernel;

/* Parses "auto" | "ref" | "avx512" | "amx"; -1 when unknown. */
int kiln_bf16_kernel_parse(const char *name);
/* "auto", "ref", "avx512", "amx" ("?" for a value out of range). */
const char *kiln_bf16_kernel_name(kiln_bf16_kernel k);

/* bf16 must be measured this many times faster than fp32 for AUTO. */
#define KILN_PRECISION_AUTO_MARGIN 1.2
/* The decision of AUTO from the probe's speeds (pure): FP32 without bf16
 * hardware, or when a speed is not positive; BF16 when bf16_gflops >=
 * KILN_PRECISION_AUTO_MARGIN * fp32_gflops; else FP32. */
kiln_precision kiln_precision_decide(bool bf16_hw, double fp32_gflops, double bf16_gflops);
/* How AUTO was decided (kiln_precision_auto). */
typedef struct kiln_precision_auto_info {
    kiln_precision choice; /* FP32 or BF16 */
    double fp32_gflops;    /* the probe's speeds (one linear layer forward
                              and backward); 0 when nothing was measured */
    double bf16_gflops;
    bool cached;           /* read from the cache folder, not measured by
                              this process */
    char reason[192];      /* "bf16 products measured 0.4x fp32 on this
                              CPU, avx512_bf16; bf16 needs 1.2x" */
} kiln_precision_auto_info;
/* What AUTO means on this CPU for bf16 kernel k and ctx's thread count:
 * FP32 without bf16 hardware (nothing measured); BF16 when the probe is
 * off (kiln_set_precision_probe); else a probe of a few milliseconds times
 * the bf16 products of kernel k against the fp32 GEMM on the same layer
 * and kiln_precision_decide decides. The result is read from / written to
 * kiln_get_cache_dir (one small file per CPU model, features, kernel,
 * thread count and kiln version; atomic; a corrupt one is rewritten) and
 * kept on ctx: decided, and logged at INFO as "precision: CHOICE
 * (REASON)", once per ctx, kernel and thread count. info (may be NULL)
 * receives the details. Never fails (out of memory: FP32). */
kiln_precision kiln_precision_auto(kiln_ctx *ctx, kiln_bf16_kernel k,
                                   kiln_precision_auto_info *info);

/* How a model computes (docs/precision.md). Plain data; start from
 * kiln_precision_opts_default(). */
typedef struct kiln_precision_opts {
    kiln_precision precision;     /* compute dtype of the products [AUTO] */
    kiln_bf16_kernel bf16_kernel; /* kernel of bf16/fp16 products [AUTO];
                                     tests and benchmarks force one */
    bool bf16_acts;               /* bf16 only: activations kept as bf16
                                     (the fast path) [true]; false = bf16
                                     products on fp32 activations, for
                                     comparison. No effect in fp32/fp16. */
} kiln_precision_opts;

/* precision AUTO, bf16_kernel AUTO, bf16_acts true. */
kiln_precision_opts kiln_precision_opts_default(void);
/* Applies all of *o to m: the precision (AUTO resolved), the kernel (the
 * GEMM is rebuilt when it changes) and the activation mode (takes effect at
 * the next kiln_model_prepare or forward, which re-carves the activations
 * when it changed). Errors: KILN_ERR_INVALID_ARG naming the field
 * (kiln_precision_opts.precision / .bf16_kernel) for a value out of
 * range, with m unchanged; KILN_ERR_NOMEM. */
kiln_status kiln_model_set_precision_opts(kiln_ctx *ctx, kiln_model *m,
                                          const kiln_precision_opts *o);
/* What m runs with: precision resolved; bf16_kernel the kernel its
 * products actually run on (never AUTO in bf16/fp16: a fallback shows
 * here; AUTO in fp32); bf16_acts as last set. */
kiln_precision_opts kiln_model_precision_opts(const kiln_model *m);

/* Fused softmax + cross-entropy over N = B*T rows of V logits.
 * targets < 0 are ignored; mask (N) weights each row (NULL = all 1).
 * Adds sum_i mask_i * -log softmax(logits_i)[target_i] to *loss_sum and
 * sum_i mask_i to *weight_sum. When dlogits is non-NULL writes
 * grad_scale * mask_i * (softmax_i - onehot_i) there (dlogits may alias
 * logits). The caller picks grad_scale (e.g. 1 / total weight). */
kiln_status kiln_cross_entropy(kiln_ctx *ctx, const float *logits,
                               const int32_t *targets, const float *mask,
                               int64_t N, int V, float grad_scale,
                               float *dlogits, double *loss_sum,
                               double *weight_sum);

/* ======================================================================
 * io: safetensors, gguf, checkpoint directories
 * ====================================================================== */

/* A GGUF file, memory-mapped and validated (docs/formats.md, "GGUF"):
 * every count, length and offset checked against the file, tensor types
 * known, rows whole blocks, data aligned and not overlapping. Its tensors
 * are read where they lie, in their own type: the way an engine takes
 * quantized weights without converting them. Errors name the file and the
 * key or tensor. */
typedef struct kiln_gguf kiln_gguf;

/* One tensor as stored: ggml's shape order (ne[0] is the row length; a
 * row is dtype's blocks), its bytes inside the mapping (valid until
 * kiln_gguf_close). */
typedef struct kiln_gguf_tensor {
    const char *name;  /* llama.cpp's name, e.g. "blk.0.attn_q.weight" */
    kiln_dtype dtype;
    int ndim;          /* 1..4 */
    int64_t ne[4];     /* unused dimensions are 1 */
    const void *data;
    size_t bytes;
} kiln_gguf_tensor;

kiln_status kiln_gguf_open(kiln_ctx *ctx, const char *path, kiln_gguf **out);
void kiln_gguf_close(kiln_gguf *g);
int64_t kiln_gguf_num_tensors(const kiln_gguf *g);
/* Tensor i (file order) into *out; false when i is out of range. */
bool kiln_gguf_tensor_at(const kiln_gguf *g, int64_t i, kiln_gguf_tensor *out);
/* Index of the tensor with this name, or -1. */
int64_t kiln_gguf_find_tensor(const kiln_gguf *g, const char *name);

/* ======================================================================
 * tokenizer
 * ====================================================================== */

typedef struct kiln_tokenizer kiln_tokenizer;

/* Loads a tokenizer. spec is a tokenizer.json path, a directory holding
 * tokenizer.json or GPT-2's encoder.json + vocab.bpe, a GGUF file (its
 * tokenizer.ggml.* keys, model "gpt2"), or "bytes" (the byte-level
 * vocabulary: ids 0..255 are bytes, 256 is <|endoftext|>). */
kiln_status kiln_tokenizer_load(kiln_ctx *ctx, const char *spec,
                                kiln_tokenizer **out);
/* Writes Hugging Face tokenizer.json atomically. */
kiln_status kiln_tokenizer_save(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                const char *path);
void kiln_tokenizer_free(kiln_tokenizer *tok);
int kiln_tokenizer_vocab_size(const kiln_tokenizer *tok);
/* The end-of-text token id. */
int kiln_tokenizer_eot(const kiln_tokenizer *tok);
/* True when id is a special token (<|endoftext|>, <|im_start|>, ..., and
 * tokenizer.json added tokens marked "special"): text a decoder usually
 * leaves out (skip_special_tokens). False for other ids and out of range. */
bool kiln_tokenizer_is_special(const kiln_tokenizer *tok, int32_t id);
/* Encodes len bytes of text (special tokens are not recognised in text;
 * non-special added tokens of a tokenizer.json are, as in Hugging Face).
 * *ids is malloc'ed; caller frees. */
kiln_status kiln_tokenizer_encode(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                  const char *text, size_t len,
                                  int32_t **ids, size_t *n);
/* kiln_tokenizer_encode with the ids the tokenizer.json's post_processor
 * adds around one text (its "single" template: Hugging Face's
 * add_special_tokens=True), e.g. Llama 3's <|begin_of_text|> before it;
 * the same as kiln_tokenizer_encode where the file has no template. */
kiln_status kiln_tokenizer_encode_add_special(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                              const char *text, size_t len, int32_t **ids,
                                              size_t *n);
/* Those ids: before the text (after false) or after it (true), count
 * returned; -1 (and *ids NULL) when the tokenizer has no template
 * (TemplateProcessing, BertProcessing, RobertaProcessing; a post_processor
 * of ByteLevel only, or none, adds nothing and is no template). */
int kiln_tokenizer_post_ids(const kiln_tokenizer *tok, bool after, const int32_t **ids);
/* Decodes ids to exact bytes; *text is malloc'ed and NUL-terminated. */
kiln_status kiln_tokenizer_decode(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                  const int32_t *ids, size_t n, char **text,
                                  size_t *len);

/* Encoding state for one thread (pattern match data and caches of
 * frequent pre-tokens), reused across calls: faster than
 * kiln_tokenizer_encode for many small texts. Not thread-safe; the
 * tokenizer must outlive it. */
typedef struct kiln_encoder kiln_encoder;
kiln_status kiln_encoder_new(kiln_ctx *ctx, const kiln_tokenizer *tok,
                             kiln_encoder **out);
void kiln_encoder_free(kiln_encoder *enc);
/* Same result as kiln_tokenizer_encode; *ids is malloc'ed. */
kiln_status kiln_encoder_encode(kiln_ctx *ctx, kiln_encoder *enc,
                                const char *text, size_t len, int32_t **ids,
                                size_t *n);

/* A position p in [from, len] at which text may be cut so that encoding
 * text[0..p) and text[p..len) separately gives exactly the ids of encoding
 * the whole (a pre-token boundary every supported pattern respects, e.g.
 * between a newline and an ASCII letter). Returns len when none is found
 * or the tokenizer's pattern is not one kiln knows to be safe. Lets
 * callers encode one large document on several threads. */
size_t kiln_tokenizer_split_point(const kiln_tokenizer *tok, const char *text,
                                  size_t len, size_t from);

/* Id of the special (or added) token whose text is exactly `text`, or -1. */
int kiln_tokenizer_special_id(const kiln_tokenizer *tok, const char *text);
/* Like kiln_tokenizer_encode, but occurrences of the tokenizer's special
 * tokens in text become their ids (longest match first); the rest is
 * encoded as ordinary text. For trusted templates only: user text should
 * go through kiln_tokenizer_encode so it can never forge a special. */
kiln_status kiln_tokenizer_encode_special(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                          const char *text, size_t len,
                                          int32_t **ids, size_t *n);

/* ---- chat template (ChatML) -----------------------------------------
 * A conversation renders as, for each message,
 *     <|im_start|>{role}\n{content}<|im_end|>\n
 * and, with add_generation_prompt, a final "<|im_start|>assistant\n".
 * <|im_start|> and <|im_end|> are single special-token ids when the
 * tokenizer has them (kiln-trained tokenizers always do); otherwise the
 * markers are encoded as ordinary text (the "bytes" and GPT-2
 * vocabularies). Message contents are encoded as ordinary text, so a user
 * cannot forge a role marker. The loss mask is 1 on the tokens of every
 * assistant message's content and its closing <|im_end|> (what the model
 * must learn to produce, including when to stop), 0 elsewhere. */
typedef struct kiln_chat_msg {
    const char *role;    /* "system", "user", "assistant" or "tool" */
    const char *content; /* UTF-8 text */
    size_t content_len;  /* its bytes, NULs included; 0 = strlen(content) */
} kiln_chat_msg;

/* Renders msgs[0..n). *ids (and *mask when mask != NULL) are malloc'ed,
 * *n_ids long. Fails on an unknown role or a NULL content. */
kiln_status kiln_chat_render(kiln_ctx *ctx, const kiln_tokenizer *tok,
                             const kiln_chat_msg *msgs, int n,
                             bool add_generation_prompt, int32_t **ids,
                             uint8_t **mask, size_t *n_ids);
/* The model's own chat template. kiln_tokenizer_load of a directory (or of
 * a tokenizer.json) also reads tokenizer_config.json beside it when there
 * is one: its "chat_template" (a Jinja2 string, or a list of {"name",
 * "template"}: "default" or else the first), "bos_token" and "eos_token"
 * (strings or {"content": ...}). With a template, kiln_chat_render renders
 * conversations through it as transformers' apply_chat_template does
 * (messages, add_generation_prompt, bos_token, eos_token; trim_blocks and
 * lstrip_blocks), encodes the text with the tokenizer's special tokens
 * recognised, and masks each assistant message's rendered span: from the
 * end of the conversation before it rendered with a generation prompt to
 * the end of the conversation through it (trailing whitespace left out),
 * so the turn's end marker is learned; where a template renders prefixes
 * differently, the message's content as found in the text. The Jinja
 * subset: docs/finetuning.md. A template that calls raise_exception fails
 * the render with its message.
 * Sets (or with src NULL removes) the template; bos and eos may be NULL
 * (""). Errors: a template kiln cannot parse (KILN_ERR_FORMAT, with line
 * and column). */
kiln_status kiln_tokenizer_set_chat_template(kiln_ctx *ctx, kiln_tokenizer *tok,
                                             const char *src, const char *bos,
                                             const char *eos);
/* The template's source, or NULL when conversations render as ChatML. */
const char *kiln_tokenizer_chat_template(const kiln_tokenizer *tok);
/* Writes DIR/tokenizer_config.json ({"chat_template", "bos_token",
 * "eos_token"}: what kiln_tokenizer_load reads back) when tok has a chat
 * template of its own (one from a GGUF file's tokenizer.chat_template, for
 * instance); does nothing otherwise. */
kiln_status kiln_tokenizer_save_chat_config(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                            const char *dir);

/* The id that ends an assistant turn: <|im_end|> when the tokenizer has
 * it, else the end-of-text id. Generation should stop on it (and on the
 * end-of-text id). Text-marker tokenizers (no <|im_end|> special) should
 * also stop when the decoded text ends with "<|im_end|>". With a chat
 * template whose eos_token is a special token: that token's id. */
int kiln_chat_stop_id(const kiln_tokenizer *tok);

/* ---- training a byte-level BPE (`kiln tokenizer train`) -------------
 * Ids 0..255 are the bytes (id = byte value), 256.. the merges in the
 * order they were learned, then the special tokens: <|endoftext|> (the
 * end-of-text id), <|im_start|> and <|im_end|> (the chat template's role
 * markers), then any extra specials. */
typedef struct kiln_tokenizer_train_opts {
    const char *const *inputs;   /* text/JSONL files or directories */
    int n_inputs;
    const char *field;           /* JSONL (.jsonl files) string field ["text"] */
    int vocab_size;              /* total, bytes and specials included [32000] */
    const char *const *specials; /* extra special tokens (may be NULL) */
    int n_specials;
    const char *pattern;         /* "gpt2", "llama3" or a PCRE2 regex ["gpt2"] */
    int min_frequency;           /* stop when the best pair is rarer [2] */
    int threads;                 /* pre-token counting threads; 0: all cores */
    int64_t max_bytes;           /* read at most this much input; 0: all */
    /* progress: phase "count" (done/total in bytes) or "merge" (merges) */
    void (*progress)(void *ud, const char *phase, int64_t done, int64_t total);
    void *progress_ud;
} kiln_tokenizer_train_opts;

typedef struct kiln_tokenizer_train_stats {
    int64_t bytes, pretokens, unique_pretokens;
    int merges;
    double count_seconds, merge_seconds;
} kiln_tokenizer_train_stats;

kiln_tokenizer_train_opts kiln_tokenizer_train_opts_default(void);
/* Learns merges from the inputs: pre-tokens are counted on all threads,
 * then merged by most frequent adjacent pair (ties: smallest ids) with
 * incremental pair counts. Fewer merges are learned when no pair reaches
 * min_frequency (the vocabulary is then smaller than asked). stats may be
 * NULL. */
kiln_status kiln_tokenizer_train(kiln_ctx *ctx, const kiln_tokenizer_train_opts *o,
                                 kiln_tokenizer **out,
                                 kiln_tokenizer_train_stats *stats);

/* ======================================================================
 * data: token shards, loaders, jsonl datasets
 * ====================================================================== */

/* Token shard files (docs/formats.md): a header with magic, version,
 * token dtype, vocab size and count, then raw little-endian tokens. A data
 * directory holds train_NNNN.bin, val_NNNN.bin and meta.json. */
typedef struct kiln_shard_writer kiln_shard_writer;

/* Opens path for writing (atomically committed by close). The token dtype
 * is uint16 when vocab_size <= 65536, else uint32. */
kiln_status kiln_shard_writer_open(kiln_ctx *ctx, const char *path,
                                   int vocab_size, kiln_shard_writer **out);
/* Appends tokens; each must be in [0, vocab_size) (checked). */
kiln_status kiln_shard_writer_append(kiln_ctx *ctx, kiln_shard_writer *w,
                                     const int32_t *ids, size_t n);
/* Writes the final header, fsyncs, renames into place, frees w. */
kiln_status kiln_shard_writer_close(kiln_ctx *ctx, kiln_shard_writer *w);
/* Discards the partial file and frees w. */
void kiln_shard_writer_abort(kiln_shard_writer *w);

/* A token shard opened for reading: memory-mapped, header validated
 * (magic, version, dtype, count against the file size, token checksum).
 * Free with kiln_shard_close. */
typedef struct kiln_shard kiln_shard;

kiln_status kiln_shard_open(kiln_ctx *ctx, const char *path,
                            kiln_shard **out);
void kiln_shard_close(kiln_shard *s);
/* Number of tokens in the shard. */
size_t kiln_shard_count(const kiln_shard *s);
/* The vocabulary size recorded in the header. */
int kiln_shard_vocab_size(const kiln_shard *s);
/* Copies tokens [start, start+n) into out (caller checks bounds). */
void kiln_shard_read(const kiln_shard *s, size_t start, size_t n,
                     int32_t *out);

/* A data directory written by `kiln tokenize`: meta.json (format
 * "kiln-tokens", vocab_size, eot, tokenizer, train_files, val_files) and
 * the shards it lists. Each split reads as one concatenated token
 * stream. Free with kiln_data_close. */
typedef struct kiln_data kiln_data;

typedef enum kiln_split {
    KILN_SPLIT_TRAIN = 0,
    KILN_SPLIT_VAL = 1
} kiln_split;

kiln_status kiln_data_open(kiln_ctx *ctx, const char *dir, kiln_data **out);
void kiln_data_close(kiln_data *d);
int kiln_data_vocab_size(const kiln_data *d);
int kiln_data_eot(const kiln_data *d);
/* The tokenizer spec meta.json records ("bytes", a path, ...). */
const char *kiln_data_tokenizer(const kiln_data *d);
const char *kiln_data_dir(const kiln_data *d);
/* Tokens in a split (0 when the split has no files). */
size_t kiln_data_tokens(const kiln_data *d, kiln_split split);

/* Training windows: a split's stream cut into windows of T+1 tokens with
 * stride T (inputs tokens[0..T), targets tokens[1..T]); window w starts
 * at token w*T. Windows are drawn by a global position p = 0, 1, 2, ...
 * that runs across epochs: epoch = p / num_windows. With shuffle, each
 * epoch visits every window once in an order that depends only on
 * (seed, epoch); without, in file order. The position is the only data
 * state a checkpoint needs. */
typedef struct kiln_loader kiln_loader;

kiln_status kiln_loader_new(kiln_ctx *ctx, const kiln_data *d,
                            kiln_split split, int T, bool shuffle,
                            uint64_t seed, kiln_loader **out);
void kiln_loader_free(kiln_loader *l);
int64_t kiln_loader_num_windows(const kiln_loader *l);
/* Window index (in [0, num_windows)) visited at global position pos. */
int64_t kiln_loader_window_at(kiln_loader *l, int64_t pos);
/* Fills inputs (T) and targets (T) of the window visited at position
 * pos. */
void kiln_loader_get(kiln_loader *l, int64_t pos, int32_t *inputs,
                     int32_t *targets);

/* ---- corpus tokenization (`kiln tokenize`) ---------------------------
 * Turns text files, directories of them and JSONL files into a data
 * directory (kiln_data_open reads it): DIR/train_NNNN.bin,
 * DIR/val_NNNN.bin, DIR/tokenizer.json (a copy of the tokenizer) and
 * DIR/meta.json = {"format":"kiln-tokens","version":1,"vocab_size":V,
 * "eot":id,"tokenizer":spec,"train_files":[...],"val_files":[...],
 * "train_tokens":N,"val_tokens":N}. Every document is preceded by the
 * end-of-text token, so documents are separated by it. Output does not
 * depend on the thread count. */
typedef struct kiln_tokenize_progress {
    int64_t bytes_done, bytes_total; /* input bytes */
    int64_t tokens;                  /* tokens written so far */
    int64_t docs;
    double seconds;                  /* since the start */
} kiln_tokenize_progress;

typedef struct kiln_tokenize_opts {
    const char *tokenizer_spec;  /* recorded in meta.json ["bytes"] */
    const char *const *inputs;   /* files or directories (walked recursively,
                                    sorted; hidden and binary files skipped) */
    int n_inputs;
    const char *out_dir;
    const char *format;          /* "auto" (.jsonl files are JSONL), "text",
                                    "jsonl" ["auto"] */
    const char *field;           /* JSONL string field holding the text ["text"] */
    const char *doc_separator;   /* a line equal to this separates documents in
                                    text files; NULL: one document per file */
    double val_fraction;         /* share of documents (by bytes) held out [0] */
    int64_t shard_tokens;        /* tokens per shard file [100M] */
    int threads;                 /* 0: all cores */
    bool skip_bad;               /* skip malformed JSONL lines (each is still
                                    reported) instead of failing [false] */
    void (*progress)(void *ud, const kiln_tokenize_progress *p);
    void *progress_ud;           /* called about twice a second and at the end */
} kiln_tokenize_opts;

typedef struct kiln_tokenize_stats {
    int64_t files, docs, bytes, bad_lines;
    int64_t train_tokens, val_tokens;
    int train_files, val_files;
    double seconds;
} kiln_tokenize_stats;

kiln_tokenize_opts kiln_tokenize_opts_default(void);
/* Tokenizes the inputs into o->out_dir (created). Malformed JSONL lines are
 * each logged (file:line: what is wrong); unless skip_bad, any of them
 * fails the run after all are reported and no meta.json is written.
 * stats may be NULL. */
kiln_status kiln_tokenize_corpus(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                 const kiln_tokenize_opts *o,
                                 kiln_tokenize_stats *stats);

/* ---- tuning datasets (JSONL) ----------------------------------------
 * One JSON object per line (blank lines are ignored):
 *   SFT         {"messages":[{"role":..,"content":..},...]}  rendered with
 *               the chat template, loss on the assistant turns; or
 *               {"prompt":"..","completion":".."}  raw text: prompt ids,
 *               then completion ids and the end-of-text id (loss on those)
 *   PREFERENCE  {"prompt":P,"chosen":C,"rejected":R}  (DPO)
 *   PROMPTS     {"prompt":P,"answer":A}  (GRPO; A a string or number)
 * A prompt P is a string (raw text) or a messages array (rendered with the
 * chat template and a generation prompt). A completion C/R is a string, or
 * a messages array holding one assistant message; it is followed by the
 * turn's end: <|im_end|> after a chat prompt (kiln_chat_stop_id), the
 * end-of-text id after a raw one.
 * Loading validates every line and logs each malformed one as
 * "PATH:LINE: what is wrong" (invalid JSON, missing field, wrong type,
 * empty content, unknown role, no assistant message), then fails naming
 * the count and the first, unless skip_bad. */
typedef enum kiln_dataset_kind {
    KILN_DATASET_SFT = 0,
    KILN_DATASET_PREFERENCE = 1,
    KILN_DATASET_PROMPTS = 2
} kiln_dataset_kind;

typedef struct kiln_dataset_opts {
    int max_len;   /* SFT: keep the first max_len tokens (examples left with
                      no loss token are dropped); PREFERENCE: prompt +
                      completion <= max_len by cutting the completion's end
                      (dropped when the prompt alone does not fit);
                      PROMPTS: prompts longer are dropped. 0: no limit [0] */
    bool skip_bad; /* skip malformed lines (still logged) [false] */
} kiln_dataset_opts;

kiln_dataset_opts kiln_dataset_opts_default(void);

typedef struct kiln_dataset kiln_dataset;

/* One example; pointers stay valid while the dataset lives. */
typedef struct kiln_example {
    const int32_t *ids;      /* SFT: the whole sequence; else the prompt   */
    const uint8_t *mask;     /* (n) 1 where the token is learned (SFT)     */
    size_t n;
    const int32_t *chosen;   /* PREFERENCE: completion ids after the prompt */
    size_t n_chosen;
    const int32_t *rejected;
    size_t n_rejected;
    const char *answer;      /* PROMPTS: the reference answer (text)       */
    int64_t line;            /* 1-based line in the file                    */
} kiln_example;

typedef struct kiln_dataset_stats {
    int64_t lines;      /* non-blank lines read                   */
    int64_t examples;   /* kept                                   */
    int64_t bad_lines;  /* malformed (skipped with skip_bad)      */
    int64_t truncated;  /* cut to max_len                         */
    int64_t dropped;    /* too long to keep anything useful       */
    int64_t tokens;     /* total tokens of the kept examples      */
    int64_t loss_tokens;/* SFT: tokens with mask 1                */
} kiln_dataset_stats;

kiln_status kiln_dataset_load(kiln_ctx *ctx, const kiln_tokenizer *tok,
                              const char *path, kiln_dataset_kind kind,
                              const kiln_dataset_opts *opts,
                              kiln_dataset **out);
void kiln_dataset_free(kiln_dataset *ds);
size_t kiln_dataset_count(const kiln_dataset *ds);
kiln_dataset_kind kiln_dataset_kind_of(const kiln_dataset *ds);
/* Example i in [0, count). */
void kiln_dataset_get(const kiln_dataset *ds, size_t i, kiln_example *ex);
void kiln_dataset_get_stats(const kiln_dataset *ds, kiln_dataset_stats *st);

/* SFT examples packed into rows of T positions, in dataset order (each
 * example goes to the first of the open rows it fits in). An example of n
 * tokens takes n-1 positions: inputs ids[0..n-1), targets ids[1..n) where
 * the mask is 1, else -1; longer examples are cut to T+1 tokens. Padding
 * has token = end-of-text, target -1, doc -1, and pos 0, 1, ... from its
 * start (a row's padding is one document of its own). pos and doc let a
 * model keep attention inside each document (kiln_model_forward_pos: doc
 * equal, pos restarting at 0); targets never cross a document boundary.
 * Free with kiln_packed_free. */
typedef struct kiln_packed {
    int64_t rows;
    int T;
    int32_t *tokens;  /* (rows, T) */
    int32_t *targets; /* (rows, T) -1: no loss */
    int32_t *pos;     /* (rows, T) position inside the document */
    int32_t *doc;     /* (rows, T) document number inside the row, -1 pad */
    int64_t examples, cut; /* examples packed, of which cut to T+1 */
} kiln_packed;

kiln_status kiln_dataset_pack(kiln_ctx *ctx, const kiln_dataset *ds, int T,
                              kiln_packed **out);

/* Which tokens of an SFT example are learned (kiln_dataset_rows). */
typedef enum kiln_loss_on {
    KILN_LOSS_ON_MASK = 0,       /* the dataset's mask: every assistant turn
                                    (messages) or the completion */
    KILN_LOSS_ON_ALL = 1,        /* every token after the first */
    KILN_LOSS_ON_COMPLETION = 2  /* the last run of the mask only: the final
                                    assistant turn, or the completion */
} kiln_loss_on;

/* kiln_dataset_pack over examples idx[0..n_idx) (idx NULL: all, in order)
 * with kiln_dataset_rows' loss rule (loss_on): the packed counterpart of
 * kiln_dataset_rows, for the same examples and targets. */
kiln_status kiln_dataset_pack_rows(kiln_ctx *ctx, const kiln_dataset *ds, int T,
                                   kiln_loss_on loss_on, const size_t *idx, size_t n_idx,
                                   kiln_packed **out);

/* SFT examples one per row, padded to T positions (no packing): row r is
 * example idx[r] (idx NULL: example r, n_idx ignored and taken as the
 * count). An example of n tokens fills positions 0..n-2 with inputs
 * ids[0..n-1) and targets ids[1..n) where loss_on says so, else -1; the
 * rest of the row is padding (end-of-text, target -1, doc -1). Examples
 * longer than T+1 tokens are cut (counted in cut). T = 0: the longest
 * example's n-1 (at least 1). Every row's doc is 0 or -1, so the rows train
 * with a plain causal mask. Errors: not an SFT dataset, an index out of
 * range, T < 0. Free with kiln_packed_free. */
kiln_status kiln_dataset_rows(kiln_ctx *ctx, const kiln_dataset *ds, int T,
                              kiln_loss_on loss_on, const size_t *idx,
                              size_t n_idx, kiln_packed **out);
void kiln_packed_free(kiln_packed *p);
/* Preference examples two rows each, padded to T positions: rows 2r and
 * 2r+1 are pair idx[r]'s prompt + chosen and prompt + rejected (idx NULL:
 * pair r, n_idx ignored), targets on the completion's tokens only (-1 on
 * the prompt and the padding). Sequences longer than T+1 tokens are cut
 * (counted in cut). T = 0: the longest sequence's n-1. Errors: not a
 * preference dataset, an index out of range, T < 0. Free with
 * kiln_packed_free. */
kiln_status kiln_dataset_pair_rows(kiln_ctx *ctx, const kiln_dataset *ds, int T,
                                   const size_t *idx, size_t n_idx, kiln_packed **out);

/* Reads the string field `field` of one JSONL line (len bytes, no newline
 * needed). *out is malloc'ed, NUL-terminated, *out_len its length. Errors
 * (invalid JSON with column, not an object, missing field, not a string)
 * name the field; the caller adds file and line. */
kiln_status kiln_jsonl_get_string(kiln_ctx *ctx, const char *line, size_t len,
                                  const char *field, char **out,
                                  size_t *out_len);

/* ======================================================================
 * train: optimizer, schedules, loss scaler, trainer, distributed
 * ====================================================================== */

/* Reads tokens [start, start+n) of a split's stream into out (bounds are
 * checked by the caller against kiln_data_tokens). */
void kiln_data_read(const kiln_data *d, kiln_split split, size_t start,
                    size_t n, int32_t *out);

/* ---- AdamW ---------------------------------------------------------- */

/* The loop behind kiln_adamw_step_scaled. Both give the same bits; the
 * choice is for tests and benchmarks. Values are only ever appended. */
typedef enum kiln_optim_kernel {
    KILN_OPTIM_KERNEL_AUTO = 0,    /* AVX-512 when the CPU has it, else portable */
    KILN_OPTIM_KERNEL_PORTABLE = 1 /* the portable C loop */
} kiln_optim_kernel;

/* Parses "auto" | "portable"; -1 when unknown. */
int kiln_optim_kernel_parse(const char *name);

/* A parameter group's settings (kiln_adamw_opts.groups): the tensors
 * whose kiln_tensor_info.group is name get learning rate lr * lr_mul and
 * decoupled weight decay weight_decay. */
typedef struct kiln_adamw_group {
    const char *name;   /* a kiln_tensor_info.group ("decay", "no_decay",
                           or one set with kiln_model_set_group) */
    float lr_mul;       /* >= 0, finite [1] */
    float weight_decay; /* >= 0, finite */
} kiln_adamw_group;

#define KILN_ADAMW_MAX_GROUPS 8

typedef struct kiln_adamw_opts {
    float beta1;        /* 0.9 */
    float beta2;        /* 0.95 */
    float eps;          /* 1e-8 */
    float weight_decay; /* 0.1, decoupled (AdamW), for the group "decay" */
    kiln_optim_kernel kernel; /* [AUTO]; kiln_adamw_new rejects other values
                                 naming kiln_adamw_opts.kernel */
    /* Per-group settings [none]. A group not listed here gets lr_mul 1 and
     * weight decay weight_decay when it is "decay", else 0 (so the
     * default is the usual AdamW split: matrices decayed; norms, biases,
     * embeddings not). kiln_adamw_new_for_model rejects a listed name no
     * trainable tensor has, a name listed twice, and lr_mul or
     * weight_decay out of range, naming kiln_adamw_opts.groups[i]. Names
     * are borrowed for the call. */
    int n_groups;
    kiln_adamw_group groups[KILN_ADAMW_MAX_GROUPS];
} kiln_adamw_opts;

kiln_adamw_opts kiln_adamw_opts_default(void);

/* AdamW over n fp32 parameters with first/second moments m, v. Made with
 * kiln_adamw_new, every parameter is trainable and in group "no_decay"
 * until kiln_adamw_set_decay moves a range to "decay". Made with
 * kiln_adamw_new_for_model, it follows the model's registry: moments only
 * for trainable tensors (frozen ones have no state and are never
 * written), each tensor's group as kiln_tensor_info.group. Free with
 * kiln_adamw_free. */
typedef struct kiln_adamw kiln_adamw;

kiln_status kiln_adamw_new(kiln_ctx *ctx, size_t n,
                           const kiln_adamw_opts *opts, kiln_adamw **out);
/* An optimizer for a model's parameter block, as it is now: frozen
 * tensors (kiln_model_set_trainable) get no state, groups as above. Make
 * it after freezing. Errors: KILN_ERR_INVALID_ARG when no tensor is
 * trainable or opts->groups is invalid (named). */
kiln_status kiln_adamw_new_for_model(kiln_ctx *ctx, const kiln_model *m,
                                     const kiln_adamw_opts *opts,
                                     kiln_adamw **out);
void kiln_adamw_free(kiln_adamw *o);
/* Marks floats [offset, offset+numel) as group "decay" or "no_decay"
 * (trainable ranges only; an optimizer made for a model with frozen
 * tensors rejects a range that touches one). */
kiln_status kiln_adamw_set_decay(kiln_ctx *ctx, kiln_adamw *o, size_t offset,
                                 size_t numel, bool decay);
/* One update with learning rate lr: t += 1, then for each trainable i
 * (group g: lr_g = lr * lr_mul_g, wd_g its weight decay)
 * m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 * p -= lr_g (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd_g p).
 * Frozen parameters are not read or written. */
void kiln_adamw_step(kiln_adamw *o, float *params, const float *grads,
                     float lr);
/* kiln_adamw_step with every gradient read as grads[i] * grad_mul, in the
 * same pass (grads is not written). grad_mul folds the loss-scaler unscale
 * (1/scale) and the clip coefficient (kiln_clip_grad_coef) into the
 * update, so neither rewrites the gradient block:
 *   norm = kiln_l2_norm(g, n);               (one read of g)
 *   kiln_adamw_step_scaled(o, p, g, lr, kiln_clip_grad_coef(norm, max));
 * equals kiln_clip_grad_norm + kiln_adamw_step up to float rounding
 * (bit-equal when grad_mul is a power of two). Vectorized (AVX-512 when
 * the CPU has it; kiln_adamw_opts.kernel = KILN_OPTIM_KERNEL_PORTABLE
 * forces the portable loop, which gives the same bits) and split over the
 * OpenMP threads; per element the result does not depend on the thread
 * count. */
void kiln_adamw_step_scaled(kiln_adamw *o, float *params, const float *grads,
                            float lr, float grad_mul);
/* The optimizer step on a model: kiln_adamw_step_scaled on m's parameter
 * block for an o made for m (kiln_adamw_new_for_model), and for a bf16
 * model on a CPU with AVX512_BF16, in the same pass the packed bf16
 * copies of its weight matrices that the next forward and backward read:
 * each strip of updated rows is packed while it is still in cache, so the
 * next forward does not read every fp32 weight back to convert it; frozen
 * matrices keep their copies. The same parameter values and products as
 * the plain step. This is the way to update a model's weights in a
 * training loop (the model stays consistent; see kiln_model_params). */
void kiln_model_adamw_step(kiln_model *m, kiln_adamw *o, const float *grads, float lr,
                           float grad_mul);
/* The kernel o's steps run on: "avx512" or "portable" (opts.kernel
 * resolved for this CPU). Static string. */
const char *kiln_adamw_kernel_name(const kiln_adamw *o);
/* n: the parameters o was made for (the whole block, frozen included). */
size_t kiln_adamw_size(const kiln_adamw *o);
/* Floats in each moment: the trainable parameters (n without frozen). */
size_t kiln_adamw_state_size(const kiln_adamw *o);
int64_t kiln_adamw_t(const kiln_adamw *o);
void kiln_adamw_set_t(kiln_adamw *o, int64_t t);
/* The moments (kiln_adamw_state_size floats each): the trainable ranges
 * of the parameter block, in order, back to back. */
float *kiln_adamw_m(kiln_adamw *o);
float *kiln_adamw_v(kiln_adamw *o);
/* Writes m, v and t to a safetensors file ("exp_avg", "exp_avg_sq", F32,
 * shape (state size); metadata "step", and for an optimizer made for a
 * model "tensors": the trainable tensors' names, comma-separated, in
 * order) atomically / reads it back. Load checks the sizes and, when both
 * sides know their tensors, that the file's tensors are exactly o's
 * trainable ones: the error names the first tensor that is frozen on one
 * side and trainable on the other (resume with the same freezing). */
kiln_status kiln_adamw_save(kiln_ctx *ctx, const kiln_adamw *o,
                            const char *path);
kiln_status kiln_adamw_load(kiln_ctx *ctx, kiln_adamw *o, const char *path);

/* L2 norm of x (n), accumulated in double in a fixed order (the result
 * does not depend on the thread count). It is inf or NaN exactly when some
 * x[i] is (squares of finite floats cannot overflow a double sum), so the
 * norm doubles as the inf/NaN check of a loss scaler: no separate pass. */
double kiln_l2_norm(const float *x, size_t n);
/* The clip coefficient for an L2 norm: max_norm / (norm + 1e-6) when
 * norm > max_norm, else 1 (also for max_norm <= 0 or a NaN norm). */
float kiln_clip_grad_coef(double norm, double max_norm);
/* Scales x so that its L2 norm (given) is at most max_norm; returns the
 * factor applied (kiln_clip_grad_coef; 1 when no clipping). max_norm <= 0
 * disables. To clip without rewriting x, pass the coefficient to
 * kiln_adamw_step_scaled instead. */
float kiln_clip_grad_norm(float *x, size_t n, double norm, double max_norm);

/* ---- learning-rate schedules ---------------------------------------- */

typedef enum kiln_schedule {
    KILN_SCHEDULE_COSINE = 0,
    KILN_SCHEDULE_LINEAR = 1,
    KILN_SCHEDULE_CONSTANT = 2
} kiln_schedule;

/* Parses "cosine" | "linear" | "constant"; -1 when unknown. */
int kiln_schedule_parse(const char *name);
const char *kiln_schedule_name(kiln_schedule s);
/* Learning rate of 0-based step `step` of `total`: linear warmup from
 * lr/warmup to lr over `warmup` steps, then decay to min_lr at the last
 * step (cosine or linear) or stay at lr (constant). */
double kiln_lr_at(kiln_schedule s, double lr, double min_lr, int64_t warmup,
                  int64_t total, int64_t step);

/* ---- trainer -------------------------------------------------------- */

typedef enum kiln_progress {
    KILN_PROGRESS_AUTO = 0,  /* bar on a terminal, lines otherwise */
    KILN_PROGRESS_BAR = 1,
    KILN_PROGRESS_LINES = 2,
    KILN_PROGRESS_NONE = 3
} kiln_progress;

/* What the trainer reports after each optimizer step (kiln_train_opts.
 * on_step). */
typedef struct kiln_step_info {
    int64_t step;        /* the step just completed (1-based) */
    int64_t total;       /* the run's last step */
    double loss;         /* its training loss (mean over the global batch) */
    double lr;           /* the learning rate it ran with */
    double grad_norm;    /* global L2 norm of the true (unscaled) gradient;
                            NAN for a skipped fp16 step */
    double loss_scale;   /* fp16: the loss scale it ran with; else 1 */
    bool skipped;        /* fp16: skipped for an inf/NaN gradient */
    double tokens_per_s; /* this step's throughput on this rank */
} kiln_step_info;

/* ---- objectives (docs/training.md, "Objectives") -------------------- */

/* One micro-batch as an objective sees it: N = B*T rows, row i = b*T + t
 * predicting targets[i] from tokens[b*T .. i]. Plain data owned by the
 * trainer (or by the caller of an objective's functions). */
typedef struct kiln_objective_batch {
    int B, T, V;
    const int32_t *tokens;  /* (B, T) the model's inputs */
    const int32_t *targets; /* (B, T) next-token ids in [0, V); < 0: no loss
                               at that row (PyTorch's ignore_index=-100) */
    float *weights;         /* (B, T) per-row loss weight >= 0, or NULL (all
                               1); written only by weigh (below) */
    int64_t step;           /* 0-based optimizer step */
    int micro;              /* micro-step in [0, grad_accum) */
    /* (B) with kiln_train_opts.rows: each row's index in rows (in val_rows
     * when eval), so an objective can find what it holds per example (DPO:
     * the reference log-probabilities); NULL for token windows. */
    const int64_t *rows;
    bool eval;              /* a validation batch: grad_scale is 0 and the
                               dlogits are thrown away */
} kiln_objective_batch;

/* A training objective: the model's logits for a micro-batch in; the loss,
 * what it is averaged over, and its gradient with respect to the logits
 * out. The trainer (kiln_train_opts.objective) calls it and does not know
 * which one it runs. Per optimizer step the trainer
 *   1. (weigh != NULL) calls weigh for every micro-batch of the step and
 *      sums the weights over the micro-steps and the MPI processes: W;
 *      (weigh == NULL) W = B*T per micro-batch, every row counts once;
 *   2. for each micro-batch: forward; then, fused_ce: the model's fused
 *      cross-entropy + backward (kiln_model_backward_ce), else
 *      loss(..., grad_scale, dlogits = logits in place) and
 *      kiln_model_backward(dlogits); grad_scale = (fp16 loss scale) / W
 *      (times the process count, whose gradients are then averaged), so
 *      the step's gradient is that of (sum of loss terms) / W;
 *   3. logs the loss sum / weight sum (over micro-steps and processes).
 * The validation loss is plain next-token cross-entropy, except with
 * kiln_train_opts.rows and an objective that is not fused_ce: then it is
 * that objective's loss over val_rows (loss called with b->eval, and
 * grad_scale 0).
 *
 * How the coming objectives map onto it (B rows of a micro-batch are
 * sequences, their targets < 0 outside the part that is learned):
 * - masked CE (SFT): kiln_objective_masked_ce(); the mask is targets -1
 *   (prompt, padding) and/or b->weights, written by a weigh of one's own.
 * - DPO: rows in pairs (chosen, rejected; B even); loss: kiln_token_logprobs
 *   of the policy's logits summed per row (pc, pr); the frozen reference
 *   model's sums (rc, rr) from user data (precomputed, or a
 *   kiln_model_forward of a reference model held in user on b->tokens);
 *   l = -log sigmoid(beta * ((pc - rc) - (pr - rr))) per pair; dl/dpc and
 *   dl/dpr spread over the row's tokens as dlogp, back through
 *   kiln_token_logprobs_backward; weigh: +1 per pair.
 * - GRPO: rows = sampled completions; user holds per-token old log-probs
 *   and per-row advantages (by step, micro); ratio = exp(logp - old),
 *   clipped surrogate per token, dl/dlogp through
 *   kiln_token_logprobs_backward; weigh: completion tokens (or rows).
 * - distillation KL: user holds the teacher; loss runs the teacher's
 *   forward on b->tokens and writes, per row, grad_scale * tau *
 *   (softmax(logits/tau) - softmax(teacher/tau)) as dlogits (KL * tau^2);
 *   weigh: tokens. */
typedef struct kiln_objective {
    const char *name; /* short, for messages and trainer_state.json */
    /* true: the loss is exactly the weighted cross-entropy of
     * kiln_cross_entropy (mask = b->weights, grad_scale as given), so the
     * trainer runs the model's fused path (kiln_model_backward_ce: in bf16
     * the gradient goes straight into the LM head's packed operands) and
     * does not call loss. false: loss is called. */
    bool fused_ce;
    /* Optional (NULL: W = B*T per micro-batch, b->weights NULL). Adds to
     * *weight what this micro-batch contributes to the loss's denominator
     * (tokens, summed weights, pairs), > 0 over the step's global batch.
     * May write b->weights (B*T floats, set to 1 before the call), e.g. an
     * SFT mask; loss then sees them. Called for all of a step's
     * micro-batches before its first backward. */
    kiln_status (*weigh)(void *user, kiln_ctx *ctx, kiln_objective_batch *b,
                         double *weight);
    /* Required (also for fused_ce: tests and evaluations call it). From
     * logits (B*T, V) of b: adds the sum of the loss terms to *loss_sum and
     * the micro-batch's weight (as weigh counts it) to *weight_sum, and
     * writes grad_scale * d(sum of loss terms)/d(logits) to dlogits
     * (B*T, V; may alias logits: the trainer passes the logits, the
     * gradient is written in place). Rows without a loss get 0. An error
     * (with kiln_fail's message) stops the run. */
    kiln_status (*loss)(void *user, kiln_ctx *ctx, const kiln_objective_batch *b,
                        const float *logits, float grad_scale, float *dlogits,
                        double *loss_sum, double *weight_sum);
    void *user; /* passed to weigh, loss, stats_take and metrics */
    /* Optional metrics of its own (DPO: rewards/chosen, ...), logged by the
     * trainer next to the loss in metrics.jsonl and the progress line, and
     * after each validation with the prefix "val_". loss adds n_stats sums
     * (in user) over the batches it sees; after a step's last micro-batch
     * (eval false) and after an evaluation (eval true) the trainer calls
     * stats_take, which copies those sums out and resets them, adds them
     * over the MPI processes and calls metrics to turn them into
     * n_metrics values named metric_names. n_stats 0: none. */
    int n_stats, n_metrics;
    const char *const *metric_names;
    void (*stats_take)(void *user, bool eval, double *sums);
    void (*metrics)(void *user, const double *sums, double *values);
} kiln_objective;

/* Next-token cross-entropy, the mean over all B*T rows (pretraining: the
 * data has no ignored rows); fused_ce, no weigh. The default. */
const kiln_objective *kiln_objective_ce(void);
/* Masked cross-entropy (SFT): sum_i w_i * -log p_i[targets_i] over the rows
 * with targets_i >= 0, divided by sum_i w_i over the same rows (w =
 * b->weights, 1 when NULL): PyTorch's F.cross_entropy(logits, targets,
 * ignore_index=-100, reduction='sum') / (targets != -100).sum() for a 0/1
 * mask. fused_ce, with weigh. With every row learned and weight 1 it is
 * kiln_objective_ce(), bit for bit. */
const kiln_objective *kiln_objective_masked_ce(void);
/* The built-in objective named name ("ce", "masked_ce"), or NULL. */
const kiln_objective *kiln_objective_builtin(const char *name);

/* Log-probabilities of given ids, for objectives on sequence likelihoods
 * (DPO, GRPO): logp[i] = log softmax(logits_i)[targets_i] for N rows of V
 * logits, 0 where targets_i < 0. Errors: KILN_ERR_RANGE for a target >= V
 * (naming the row). */
kiln_status kiln_token_logprobs(kiln_ctx *ctx, const float *logits,
                                const int32_t *targets, int64_t N, int V,
                                float *logp);
/* Back through kiln_token_logprobs: given dlogp (N) = d(loss)/d(logp_i),
 * writes dlogits_i = grad_scale * dlogp_i * (onehot(targets_i) -
 * softmax(logits_i)), 0 in rows with targets_i < 0. dlogits may alias
 * logits. Errors as kiln_token_logprobs. */
kiln_status kiln_token_logprobs_backward(kiln_ctx *ctx, const float *logits,
                                         const int32_t *targets,
                                         const float *dlogp, int64_t N, int V,
                                         float grad_scale, float *dlogits);

/* ---- distributed (MPI data parallel, docs/distributed.md) ------------ */

/* How the ranks of an MPI job talk. Under `mpirun -np N` the trainer joins
 * the job itself (the launcher's environment says so); a plain process is
 * world size 1 and these are unused. Plain data; start from
 * kiln_dist_opts_default(). */
typedef struct kiln_dist_opts {
    double timeout_s; /* seconds any one collective may take before the
                         watchdog aborts the job, in (0, 1e9] [300] */
    double bucket_mb; /* gradient bucket size in MB, in (0, 1e9] [25] */
    bool overlap;     /* start each bucket's allreduce as soon as the
                         backward has finished it [true]; false: all buckets
                         after the backward (to measure what overlap buys) */
    bool progress_table; /* keep a node-shared table of each rank's last
                            collective, so the watchdog can name the ranks
                            that did not arrive [true] */
} kiln_dist_opts;

/* timeout_s 300, bucket_mb 25, overlap true, progress_table true. */
kiln_dist_opts kiln_dist_opts_default(void);

/* A handle on the MPI job for programs that run their own loop (kiln
 * grpo): the same launcher detection, watchdog and error handling as the
 * trainer's. Under `mpirun -np N` it joins the job (once per process);
 * otherwise it is world size 1 and every collective is a no-op. Collectives
 * must be called in the same order on every rank. Errors as the trainer's
 * (KILN_ERR_DIST: N > 1 ranks by a build without MPI, or MPI cannot start;
 * KILN_ERR_INVALID_ARG naming the kiln_dist_opts field). */
typedef struct kiln_dist kiln_dist;
kiln_status kiln_dist_new(kiln_ctx *ctx, const kiln_dist_opts *opts, kiln_dist **out);
/* Frees d and finalizes MPI (every rank must reach it). NULL is a no-op. */
void kiln_dist_free(kiln_dist *d);
/* Frees d after an error on this rank without MPI_Finalize; the process
 * must then exit non-zero (mpirun ends the job). NULL is a no-op. */
void kiln_dist_abandon(kiln_dist *d);
int kiln_dist_rank(const kiln_dist *d);
int kiln_dist_world(const kiln_dist *d);
/* In-place sums / maxima across ranks (every rank gets the result). */
kiln_status kiln_dist_sum_f32(kiln_ctx *ctx, kiln_dist *d, float *buf, size_t n);
kiln_status kiln_dist_sum_f64(kiln_ctx *ctx, kiln_dist *d, double *buf, size_t n);
kiln_status kiln_dist_max_f64(kiln_ctx *ctx, kiln_dist *d, double *buf, size_t n);
/* Blocks until every rank arrives. */
kiln_status kiln_dist_barrier(kiln_ctx *ctx, kiln_dist *d);
/* Sums m's gradient block (kiln_model_grads) across ranks in place: with
 * each rank's loss scaled by 1 / (the global normaliser), the sum is the
 * gradient of the whole batch. Every rank's model must have the same
 * shapes. One blocking allreduce after the backward (no overlap). */
kiln_status kiln_dist_sum_grads(kiln_ctx *ctx, kiln_dist *d, kiln_model *m);

/* Everything a pretraining run is configured by (kiln train's flags).
 * Start from kiln_train_opts_default(). Strings are borrowed. */
typedef struct kiln_train_opts {
    const char *config;    /* model config.json for a fresh model, or NULL */
    const char *init_from; /* model directory to start from, or NULL */
    const char *data;      /* data directory (kiln tokenize --out) */
    const char *out;       /* run directory: checkpoints, metrics.jsonl */
    const char *resume;    /* checkpoint dir to resume from, or NULL */
    int batch;             /* B: sequences per micro-batch per process */
    int seq;               /* T */
    int grad_accum;        /* micro-batches per optimizer step */
    double lr, min_lr;
    int64_t warmup;
    kiln_schedule schedule;
    int64_t steps;         /* optimizer steps; 0 = from epochs */
    double epochs;         /* used when steps == 0 */
    double weight_decay, beta1, beta2, eps;
    double grad_clip;      /* max global grad norm; <= 0 disables */
    bool shuffle;          /* per-epoch seeded shuffle (else sequential) */
    int64_t eval_every;    /* steps between validation evals; 0 = never */
    int64_t eval_steps;    /* validation batches (of B windows) per eval */
    int64_t save_every;    /* steps between checkpoints; 0 = only at end */
    int keep_last;         /* checkpoints kept (0 = all) */
    uint64_t seed;         /* init, data order */
    int threads;           /* 0 = all cores */
    int64_t log_every;     /* steps between plain progress lines */
    kiln_progress progress;
    double max_time;       /* seconds; stop, save and exit when reached */
    int64_t stop_at;       /* stop (save, exit) after this step; 0 = off */
    /* Set asynchronously (e.g. by a SIGINT handler): the trainer finishes
     * the current step, saves a checkpoint and returns KILN_OK with
     * *interrupted set in the result. */
    volatile int *stop_flag;
    /* ZeRO stage under MPI data parallelism: 0 = every rank holds the whole
     * AdamW state; 1 = moments sharded across ranks (docs/distributed.md). */
    int zero;
    /* Compute dtype of the matrix products (docs/precision.md): master
     * weights and AdamW state stay fp32; fp16 runs the dynamic loss scaler.
     * AUTO = bf16 where the CPU has AMX-BF16 or AVX512_BF16. [AUTO] */
    kiln_precision precision;
    /* Called on every rank after each optimizer step, on the calling
     * thread, before the step's evaluation, metrics line and checkpoint.
     * Returning false stops the run as stop_flag does (checkpoint saved,
     * result interrupted); under MPI the ranks agree, any one stopping
     * stops all. NULL = none. [NULL] */
    bool (*on_step)(void *user, const kiln_step_info *info);
    void *on_step_user; /* passed to on_step */
    /* The rest of the model's kiln_precision_opts: the kernel of bf16/fp16
     * products [AUTO] and bf16 activations [true] (see there). */
    kiln_bf16_kernel bf16_kernel;
    bool bf16_acts;
    /* fp16 only: the loss scaler's initial scale, > 0 and finite; 0 = the
     * default 65536 [0]. A resumed checkpoint's scale wins. Ignored in
     * fp32/bf16. kiln_train_result.loss_scale reports the final one. */
    double loss_scale;
    /* The AdamW loop (kiln_adamw_opts.kernel) [AUTO]. */
    kiln_optim_kernel optim_kernel;
    /* Communication of an MPI job [kiln_dist_opts_default()]. */
    kiln_dist_opts dist;
    /* What the run minimizes (see kiln_objective; borrowed, with its user
     * data, for the run). NULL = kiln_objective_ce(). The checkpoint
     * records its name; kiln_train_opts_load restores a built-in one
     * (kiln_objective_builtin), one's own is given again on resume.
     * [kiln_objective_ce()] */
    const kiln_objective *objective;
    /* Tensors to freeze (kiln_model_set_trainable patterns: exact names or
     * globs), n_freeze of them, applied to the model before the optimizer
     * is made: frozen tensors get no gradient and no optimizer state and
     * keep their values. A pattern that matches nothing is an error naming
     * kiln_train_opts.freeze[i]. The checkpoint records the patterns;
     * a resume must give the same ones (the error names the difference).
     * Not with zero = 1 yet. [NULL, 0] */
    const char *const *freeze;
    int n_freeze;
    /* A second data source (SFT): training rows instead of token shards
     * (borrowed for the run; e.g. kiln_dataset_rows). rows->T must equal
     * seq, and every row must hold one document (doc 0 or -1: packed rows
     * need attention kept inside each document, which the kernels do not
     * do yet). Rows are drawn like windows: a seeded shuffle per epoch
     * (shuffle) over rows->rows, the position saved in checkpoints. data
     * is then only the name recorded in trainer_state.json (may be NULL).
     * Use with kiln_objective_masked_ce(): targets -1 carry no loss. [NULL] */
    const kiln_packed *rows;
    /* With rows: held-out rows; val_loss is then the masked cross-entropy
     * over their targets (eval_steps batches of B rows at most), at step 0,
     * every eval_every steps and at the end (none when eval_every or
     * eval_steps is 0); NULL: no validation. [NULL] */
    const kiln_packed *val_rows;
    /* With rows: the tokenizer.json copied into every checkpoint (NULL:
     * none). [NULL] */
    const char *tokenizer_json;
    /* LoRA (rank > 0): adapters added to the model the run starts from
     * (kiln_model_add_lora; seed 0: the run's seed), its base frozen; a
     * resumed run's checkpoint has them already. [rank 0: full training] */
    kiln_lora_opts lora;
    /* With rows: rows are drawn in groups of this many consecutive rows
     * that stay together and in order in a micro-batch (DPO: 2, a chosen
     * and a rejected row); the per-epoch shuffle permutes the groups.
     * batch and the row counts of rows and val_rows must be multiples of
     * it. Not saved in checkpoints: give it again on resume. [1] */
    int row_group;
} kiln_train_opts;

kiln_train_opts kiln_train_opts_default(void);

typedef struct kiln_train_result {
    int64_t step;            /* last completed step */
    double loss;             /* its training loss */
    double val_loss;         /* last validation loss (NAN when none) */
    int rank;                /* this process's MPI rank (0 when alone) */
    int world_size;          /* number of ranks (1 when alone) */
    bool interrupted;        /* stopped early (signal, max_time, stop_at) */
    char checkpoint[1024];   /* last checkpoint written ("" when none) */
    int64_t skipped_steps;   /* fp16: steps skipped for inf/NaN gradients */
    double loss_scale;       /* fp16: the loss scale at the end (else 1) */
} kiln_train_result;

/* Runs (or, with opts->resume, continues) a pretraining run. Returns an
 * error for bad options/data/model and for a NaN loss. */
kiln_status kiln_train(kiln_ctx *ctx, const kiln_train_opts *opts,
                       kiln_train_result *res);

/* Fills *opts with the options a checkpoint's run was started with
 * (trainer_state.json), so `--resume` continues the same run. The data
 * directory path is copied to data_buf (cap bytes) and opts->data points
 * there; other strings are left as they were. */
kiln_status kiln_train_opts_load(kiln_ctx *ctx, const char *ckpt_dir,
                                 kiln_train_opts *opts, char *data_buf,
                                 size_t cap);

/* Resolves what --resume names: a checkpoint directory itself, or a run
 * directory (its newest checkpoint, from the file "latest"). Writes the
 * checkpoint path to out. */
kiln_status kiln_checkpoint_resolve(kiln_ctx *ctx, const char *path,
                                    char *out, size_t cap);
/* Verifies every file of a checkpoint directory against checksums.json
 * (sizes and CRC-32C); the error names the file. KILN_OK when the
 * directory has no checksums.json (a plain model directory). */
kiln_status kiln_checkpoint_verify(kiln_ctx *ctx, const char *dir);

/* Mean next-token loss over a token stream: every token after the first
 * is predicted once, in windows of up to T+1 tokens (stride T) run B at
 * a time. Adds to *loss_sum and *count (tokens predicted). */
kiln_status kiln_eval_tokens(kiln_ctx *ctx, kiln_model *m,
                             const int32_t *tokens, size_t n, int B, int T,
                             double *loss_sum, double *count);

/* Renders a run directory's metrics.jsonl (train loss and validation
 * loss vs step) as an SVG file at svg_path. */
kiln_status kiln_plot_metrics(kiln_ctx *ctx, const char *run_dir,
                              const char *svg_path);
/* The same for any number a metrics.jsonl line holds: key (a line per
 * step, with its moving average, e.g. GRPO's "reward_mean") and val_key
 * (may be NULL; points, e.g. "eval_exact") vs step. kiln_plot_metrics is
 * key "loss", val_key "val_loss". */
kiln_status kiln_plot_metric(kiln_ctx *ctx, const char *run_dir, const char *key,
                             const char *val_key, const char *svg_path);

/* ======================================================================
 * tune / compress
 * ====================================================================== */

/* ---- DPO: direct preference optimisation (`kiln dpo`, docs/alignment.md)
 * The policy is trained on pairs of rows (kiln_dataset_pair_rows: chosen,
 * rejected) with kiln_train_opts.row_group = 2. The reference model's
 * summed log-probabilities of every row are computed once before training
 * (kiln_rows_logprobs, the reference then freed), so no second model is
 * held while training; with a LoRA policy the reference is its base. */

typedef enum kiln_dpo_loss {
    KILN_DPO_SIGMOID = 0, /* -log sigmoid(beta h) (the DPO paper)           */
    KILN_DPO_IPO = 1,     /* (h - 1/(2 beta))^2 on per-token mean log-probs  */
    KILN_DPO_HINGE = 2    /* max(0, 1 - beta h) (SLiC)                        */
} kiln_dpo_loss;
/* h = (pc - rc) - (pr - rr): the policy's (p) and reference's (r) summed
 * log-probabilities of the chosen (c) and rejected (r) completion, as TRL's
 * DPOTrainer defines them (loss_type sigmoid / ipo / hinge, no label
 * smoothing). */

/* "sigmoid" | "ipo" | "hinge"; -1 when unknown. */
int kiln_dpo_loss_parse(const char *name);
const char *kiln_dpo_loss_name(kiln_dpo_loss l);

/* Summed log-probabilities of each row's targets (the tokens with a
 * target >= 0) under m: out[r] = sum_t log softmax(logits_{r,t})[target],
 * the rows run B at a time through kiln_model_forward. out has
 * rows->rows doubles. */
kiln_status kiln_rows_logprobs(kiln_ctx *ctx, kiln_model *m, const kiln_packed *rows, int B,
                               double *out);

/* The reference's log-probabilities of the training rows (ref_train,
 * rows->rows) and held-out rows (ref_val, val_rows->rows; val_rows may be
 * NULL), computed by loading model_dir with precision po and running
 * kiln_rows_logprobs B rows at a time on `threads` threads (0: as set),
 * then freeing the model. With cache_path (may be NULL) they are read
 * from there when it holds the same rows (a checksum of their tokens and
 * targets and the reference's identity `ref_id`), else computed and
 * written there atomically. *from_cache says which. require_cache: a
 * missing or different cache is an error (a resumed run must use the
 * same numbers). */
typedef struct kiln_dpo_ref_opts {
    const char *model_dir;  /* the reference model directory */
    const char *ref_id;     /* what identifies it in the cache (a path) */
    kiln_precision_opts po; /* its compute precision */
    int batch;              /* rows per forward, >= 1 */
    int threads;            /* 0: unchanged */
    const char *cache_path; /* NULL: no cache */
    bool require_cache;
} kiln_dpo_ref_opts;
kiln_status kiln_dpo_reference(kiln_ctx *ctx, const kiln_dpo_ref_opts *o,
                               const kiln_packed *rows, const kiln_packed *val_rows,
                               double *ref_train, double *ref_val, bool *from_cache);

typedef struct kiln_dpo_opts {
    double beta;        /* > 0 [0.1] */
    kiln_dpo_loss loss; /* [KILN_DPO_SIGMOID] */
} kiln_dpo_opts;
kiln_dpo_opts kiln_dpo_opts_default(void);

/* The DPO objective (a kiln_objective for kiln_train_opts.objective, or
 * for direct calls): batches of B = 2k rows in pairs whose b->rows index
 * the reference arrays (ref_train, or ref_val when b->eval; borrowed,
 * n_train / n_val doubles). Its loss adds the summed pair losses and the
 * pair count; weigh counts pairs. Metrics (TRL's names): rewards/chosen,
 * rewards/rejected (beta times the policy-minus-reference log-probability,
 * means over pairs), rewards/accuracies (share of pairs with chosen >
 * rejected reward), rewards/margins, logps/chosen, logps/rejected (the
 * policy's summed log-probabilities; per-token means for ipo). */
typedef struct kiln_dpo kiln_dpo;
kiln_status kiln_dpo_new(kiln_ctx *ctx, const kiln_dpo_opts *o, const double *ref_train,
                         int64_t n_train, const double *ref_val, int64_t n_val, kiln_dpo **out);
const kiln_objective *kiln_dpo_objective(kiln_dpo *d);
void kiln_dpo_free(kiln_dpo *d);

/* ---- knowledge distillation (`kiln distill`; docs/distill.md) --------- */

/* The divergence between the teacher's and the student's next-token
 * distributions at temperature tau, p = softmax(teacher / tau),
 * q = softmax(student / tau), over the full vocabulary, per row:
 *   FORWARD  KL(p || q) = sum_v p_v log(p_v / q_v)   (Hinton; mode covering)
 *   REVERSE  KL(q || p) = sum_v q_v log(q_v / p_v)   (MiniLLM; mode seeking)
 *   JSD      generalized Jensen-Shannon of GKD (TRL's generalized_jsd_loss):
 *            m = beta p + (1 - beta) q,
 *            beta KL(p || m) + (1 - beta) KL(q || m);
 *            beta 0 is FORWARD and beta 1 REVERSE (as TRL).
 * Values are only ever appended. */
typedef enum kiln_kd_loss {
    KILN_KD_FORWARD = 0,
    KILN_KD_REVERSE = 1,
    KILN_KD_JSD = 2
} kiln_kd_loss;

/* "forward" | "reverse" | "jsd"; -1 when unknown. */
int kiln_kd_loss_parse(const char *name);
const char *kiln_kd_loss_name(kiln_kd_loss k);

/* The distillation loss of one row with a target y (plain data; start
 * from kiln_kd_opts_default()):
 *   loss = alpha * CE(student, y) + (1 - alpha) * tau^2 * D(p, q)
 * where CE is the cross-entropy of the student's logits at temperature 1
 * on the data's next token and D the divergence above. tau^2 keeps the
 * gradient's size independent of tau (Hinton et al. 2015). alpha = 0 is
 * pure distillation, 1 plain training on the data. */
typedef struct kiln_kd_opts {
    kiln_kd_loss loss;  /* [FORWARD] */
    double temperature; /* tau, in (0, 1e3] [1] */
    double alpha;       /* weight of the data's cross-entropy, in [0, 1] [0.5] */
    double beta;        /* JSD only: the teacher's share of the mixture m, in
                           [0, 1] [0.5] */
} kiln_kd_opts;

kiln_kd_opts kiln_kd_opts_default(void);
/* Checks ranges (NaN refused); the message names kiln_kd_opts.FIELD. */
kiln_status kiln_kd_opts_validate(kiln_ctx *ctx, const kiln_kd_opts *o);

/* The loss above over N rows of V logits: student and teacher (N, V);
 * rows with targets_i < 0 take no loss (0 gradient, no weight); weights
 * (N, NULL = all 1) scale each row. Adds sum_i w_i loss_i to *loss_sum
 * and sum_i w_i (rows with a target) to *weight_sum, and, when dlogits is
 * non-NULL, writes grad_scale * w_i * d(loss_i)/d(student_i) there (may
 * alias student). Sums per row in double. Errors: a target >= V
 * (KILN_ERR_RANGE naming the row), bad options (kiln_kd_opts_validate). */
kiln_status kiln_kd_loss_rows(kiln_ctx *ctx, const kiln_kd_opts *o, const float *student,
                              const float *teacher, const int32_t *targets,
                              const float *weights, int64_t N, int V, float grad_scale,
                              float *dlogits, double *loss_sum, double *weight_sum);

/* The teacher's logits (B, T, V) for tokens (B, T) (inference only). */
typedef kiln_status (*kiln_teacher_fn)(void *user, kiln_ctx *ctx, const int32_t *tokens,
                                       int B, int T, float *logits);

/* A distillation objective for the trainer (kiln_train_opts.objective):
 * per micro-batch it asks the teacher for the logits of b->tokens and
 * applies kiln_kd_loss_rows; weigh counts the rows with a target (the
 * loss is the mean over tokens). Its name is "distill". vocab is the
 * student's vocabulary size; the teacher's must equal it (checked here:
 * the error names both sizes). */
typedef struct kiln_distill kiln_distill;
kiln_status kiln_distill_new(kiln_ctx *ctx, const kiln_kd_opts *o, int student_vocab,
                             int teacher_vocab, kiln_teacher_fn teacher, void *teacher_user,
                             kiln_distill **out);
/* The objective (valid until kiln_distill_free). */
const kiln_objective *kiln_distill_objective(kiln_distill *d);
void kiln_distill_free(kiln_distill *d);

/* A teacher held for inference only: a model directory or a .gguf file
 * loaded into an inference engine (kiln_engine) with weight storage
 * wtype (F32, BF16, Q8_0, Q4_0, Q4_K, Q6_K; a .gguf keeps its own
 * quantized blocks), one slot of context T. No gradient, no optimizer
 * state, no activations kept for a backward. */
typedef struct kiln_teacher kiln_teacher;
kiln_status kiln_teacher_new(kiln_ctx *ctx, const char *path, kiln_dtype wtype, int T,
                             kiln_teacher **out);
const kiln_config *kiln_teacher_config(const kiln_teacher *t);
/* A kiln_teacher_fn (user = the kiln_teacher): each of the B rows is
 * prefilled from position 0 in one engine step; T <= the T given at
 * kiln_teacher_new. */
kiln_status kiln_teacher_logits(void *teacher, kiln_ctx *ctx, const int32_t *tokens, int B,
                                int T, float *logits);
/* Bytes of the teacher's prepared weights (kiln_engine_weight_bytes). */
size_t kiln_teacher_weight_bytes(const kiln_teacher *t);
void kiln_teacher_free(kiln_teacher *t);

/* ---- GRPO (`kiln grpo`; docs/alignment.md) ---------------------------- */

/* The GRPO loss (TRL GRPOTrainer's): per learned token of a sampled
 * completion (row i), r = exp(logp - old_logp),
 *   l = -min(r A_i, clip(r, 1 - clip_low, 1 + clip_high) A_i)
 *       + beta (exp(ref - logp) - (ref - logp) - 1)      (k3 estimator).
 * GRPO: each token weighs 1 / (learned tokens of its row), the step's sum
 * is divided by the rows (mean per sequence, then over sequences).
 * Dr. GRPO (dr_grpo): each token weighs 1, the sum is divided by rows *
 * max_new_tokens, and the advantages are not divided by the group's std
 * (kiln_grpo_advantages' scale_std false). Start from
 * kiln_grpo_opts_default(). */
typedef struct kiln_grpo_opts {
    double clip_low;    /* eps: ratio clipped below at 1 - clip_low [0.2] */
    double clip_high;   /* above at 1 + clip_high (DAPO's clip-higher) [0.2] */
    double beta;        /* KL coefficient; 0 = no reference [0] */
    bool dr_grpo;       /* Dr. GRPO normalisation [false] */
    int max_new_tokens; /* dr_grpo's normaliser, > 0 with dr_grpo [0] */
} kiln_grpo_opts;

kiln_grpo_opts kiln_grpo_opts_default(void);
/* Checks ranges; the message names the kiln_grpo_opts field. */
kiln_status kiln_grpo_opts_validate(kiln_ctx *ctx, const kiln_grpo_opts *o);

/* What the GRPO objective reads and writes for the micro-batch it is
 * called on (B rows of T; the caller points the arrays at that batch's
 * rows before each call). Statistics accumulate until the caller resets
 * them. */
typedef struct kiln_grpo_state {
    kiln_grpo_opts opts;
    const float *adv;      /* (B) advantage of each row */
    const float *old_logp; /* (B*T) log-probs of the rollout policy; NULL:
                              the current ones (ratio 1: the first update
                              on a rollout batch, then keep .logp as old) */
    const float *ref_logp; /* (B*T) the reference model's; beta > 0 only */
    float *logp;           /* (B*T) out: the current log-probs (0 where
                              targets < 0) */
    float *dlogp;          /* (B*T) scratch */
    double kl_sum;         /* += k3 KL over learned tokens (beta > 0) */
    double clipped;        /* += tokens whose clipped branch was taken */
    double tokens;         /* += learned tokens */
} kiln_grpo_state;

/* The objective over st (borrowed): weigh counts the rows with a learned
 * token (times max_new_tokens with dr_grpo); loss as above, its gradient
 * through kiln_token_logprobs_backward. Name "grpo" or "dr_grpo". */
kiln_objective kiln_objective_grpo(kiln_grpo_state *st);
/* Group-relative advantages of n_groups groups of G >= 2 rewards (group
 * g is rewards[g*G .. g*G+G)): A = r - mean(group), divided by
 * (std + 1e-4) when scale_std (std unbiased, as torch.std). Errors: bad
 * sizes, a non-finite reward (KILN_ERR_NUMERIC). */
kiln_status kiln_grpo_advantages(kiln_ctx *ctx, const float *rewards, int n_groups, int G,
                                 bool scale_std, float *adv);

/* ---- verifiable rewards (`kiln grpo --reward`) ------------------------ */

/* The final answer of a completion: the text after the last "####" (to
 * the end of that line), else the content of the last \boxed{...} (braces
 * balanced), trimmed of spaces; NULL when it has neither. *len receives
 * its length. Points into text. */
const char *kiln_answer_extract(const char *text, size_t *len);

/* A reward: a weighted sum of terms, spec "NAME[:WEIGHT],..." with NAME
 *   exact    1 when the extracted answer equals the answer (both trimmed;
 *            for numbers also when they parse to the same value), else 0
 *   numeric  1 when the extracted answer and the answer parse as numbers
 *            (commas, a leading '$' ignored) with |x - y| <= tolerance *
 *            max(1, |y|), else 0
 *   regex    1 when the whole completion matches regex (PCRE2, searched
 *            anywhere; anchor it to require the whole), else 0
 *   cmd      the number the program cmd prints for it (below)
 * e.g. "exact:1,regex:0.2". Start from kiln_reward_opts_default(). */
typedef struct kiln_reward_opts {
    const char *spec;   /* ["exact"] */
    double tolerance;   /* numeric's relative tolerance, >= 0 [1e-6] */
    const char *regex;  /* regex's pattern [####\s*-?[0-9][0-9,.]*\s*$] */
    /* cmd: run as /bin/sh -c CMD once per scoring call; it reads one JSON
     * object per completion on stdin, {"prompt","completion","answer"},
     * and writes one number per line on stdout, in order. The rule for a
     * failure: when it exits non-zero, is killed, runs past cmd_timeout
     * seconds (it is killed) or prints another count of lines, every
     * completion of the call gets 0 for the term (report: cmd_failures);
     * a line that is not a finite number gives its completion 0
     * (report: cmd_bad_lines). Both are logged as warnings. */
    const char *cmd;
    double cmd_timeout; /* seconds, > 0 [60] */
} kiln_reward_opts;

kiln_reward_opts kiln_reward_opts_default(void);

typedef struct kiln_reward kiln_reward;

/* Parses spec and compiles the regex. Errors name kiln_reward_opts.spec
 * (unknown term, bad weight, cmd without .cmd), .regex (with PCRE2's
 * message and offset), .tolerance or .cmd_timeout. */
kiln_status kiln_reward_new(kiln_ctx *ctx, const kiln_reward_opts *o, kiln_reward **out);
void kiln_reward_free(kiln_reward *r);
int kiln_reward_n_terms(const kiln_reward *r);
/* "exact", "numeric", "regex" or "cmd" (static). */
const char *kiln_reward_term_name(const kiln_reward *r, int i);

/* What went wrong with the reward command in one scoring call. */
typedef struct kiln_reward_report {
    int cmd_failures;  /* calls whose whole output was refused (0 or 1) */
    int cmd_bad_lines; /* lines that were not a finite number */
    char why[256];     /* the first problem ("" when none) */
} kiln_reward_report;

/* Scores n completions: out[i] = sum over terms of weight * term score.
 * terms (may be NULL) receives each term's unweighted score, (n_terms, n).
 * prompts and answers may hold NULLs (exact and numeric then score 0).
 * Only out-of-memory and a reward command that cannot be started fail
 * (KILN_ERR_IO); its other failures follow the rule above. */
kiln_status kiln_reward_score(kiln_ctx *ctx, kiln_reward *r, int n, const char *const *prompts,
                              const char *const *completions, const char *const *answers,
                              float *out, float *terms, kiln_reward_report *rep);

/* ---- GGUF export and quantization (`kiln export --format gguf`,
 * `kiln quantize`; docs/quantize.md) ---------------------------------- */

typedef struct kiln_gguf_export_opts {
    /* preset: "f32", "f16", "bf16", "q8_0", "q4_0", "q6_k" or "q4_k_m"
     * (llama.cpp's mix: Q6_K for the output and some attn_v / ffn_down
     * matrices, Q4_K elsewhere); 1-D tensors stay F32 [f32] */
    const char *type;
    const char *name; /* general.name [NULL: "kiln model"] */
    /* Called before tensor i of n is converted, and once with i == n at
     * the end (NULL: none). */
    void (*progress)(void *ud, int i, int n, const char *tensor);
    void *progress_ud;
} kiln_gguf_export_opts;

kiln_gguf_export_opts kiln_gguf_export_opts_default(void);

/* What went where. */
typedef struct kiln_gguf_tensor_summary {
    char name[64];
    kiln_dtype dtype;  /* the type written */
    kiln_dtype wanted; /* the recipe's type before a row-length fallback */
    int64_t ne[2];
    uint64_t numel;
    size_t bytes;
} kiln_gguf_tensor_summary;

typedef struct kiln_gguf_export_stats {
    int n_tensors;
    kiln_gguf_tensor_summary *tensors; /* (n_tensors), GGUF order */
    uint64_t params;         /* the model's fp32 parameters */
    uint64_t weights;        /* elements written (tied: once) */
    uint64_t bytes_before;   /* params x 4 */
    uint64_t bytes_after;    /* tensor data written */
    uint64_t file_bytes;     /* the whole file */
    double bits_per_weight;  /* 8 x bytes_after / weights */
} kiln_gguf_export_stats;

/* Writes m and tok as one GGUF file at path (atomically) that llama.cpp
 * loads: general.*, the {arch}.* hyper-parameters, the tokenizer
 * (tokenizer.ggml.model "gpt2"), tensors under llama.cpp's names (llama's
 * q/k rows permuted to its RoPE order; tied embeddings: no output.weight).
 * stats (may be NULL) is filled on success; free it with
 * kiln_gguf_export_stats_free. A model vocabulary larger than the
 * tokenizer's (padded embeddings) gets placeholder tokens of type unused,
 * one per row, as llama.cpp needs. Errors: an unknown preset (names the
 * field), a tokenizer llama.cpp could not reproduce or larger than the
 * model's vocabulary, I/O. */
kiln_status kiln_gguf_export(kiln_ctx *ctx, const kiln_model *m, const kiln_tokenizer *tok,
                             const char *path, const kiln_gguf_export_opts *o,
                             kiln_gguf_export_stats *stats);
void kiln_gguf_export_stats_free(kiln_gguf_export_stats *st);

/* ---- pruning (`kiln prune`; docs/prune.md) ---------------------------
 * Which weights: the four linear matrices of every layer (qkv, attention
 * output, MLP in, MLP out); embeddings, norms, biases and the LM head stay
 * dense, as in Wanda (Sun et al. 2023) and SparseGPT. Scores compare
 * weights of one output row (the Wanda paper's per-output group) unless
 * group says per matrix. Values are only ever appended. */
typedef enum kiln_prune_method {
    KILN_PRUNE_MAGNITUDE = 0, /* unstructured, score |W_ij| */
    KILN_PRUNE_WANDA = 1,     /* unstructured, score |W_ij| * ||X_j||_2 */
    KILN_PRUNE_2_4 = 2,       /* 2 of every 4 consecutive inputs of a row
                                 zeroed (score: kiln_prune_opts.score) */
    KILN_PRUNE_MLP = 3        /* structured: whole MLP channels removed, a
                                 smaller n_inner (kiln_prune_opts.score) */
} kiln_prune_method;

typedef enum kiln_prune_score {
    KILN_PRUNE_SCORE_WANDA = 0,    /* activation-weighted (needs calib) */
    KILN_PRUNE_SCORE_MAGNITUDE = 1 /* weights alone */
} kiln_prune_score;

typedef enum kiln_prune_group {
    KILN_PRUNE_GROUP_ROW = 0,   /* each output row loses the same share */
    KILN_PRUNE_GROUP_MATRIX = 1 /* one threshold over the whole matrix */
} kiln_prune_group;

/* "magnitude" | "wanda" | "2:4" | "mlp" -> the method; -1 when unknown. */
int kiln_prune_method_parse(const char *name);
const char *kiln_prune_method_name(kiln_prune_method m);

typedef struct kiln_prune_opts {
    kiln_prune_method method;  /* [MAGNITUDE] */
    /* The share removed, in [0, 1): of each comparison group's weights
     * (unstructured), of each layer's MLP channels (mlp). 2:4 removes
     * exactly half: sparsity must be 0.5 there. [0.5] */
    double sparsity;
    kiln_prune_score score;    /* 2:4 and mlp [WANDA] */
    kiln_prune_group group;    /* magnitude and wanda [ROW] */
    /* Calibration tokens (borrowed): windows of seq tokens (a remainder
     * shorter than seq is left out), batch at a time, through the fp32
     * forward. Wanda runs layer by layer, as the
     * paper's code: layer l's activations come from the model whose
     * layers before l are already pruned. Needed by every
     * activation-weighted score; ignored otherwise. */
    const int32_t *calib;
    size_t n_calib;
    int batch;                 /* [4] */
    int seq;                   /* [the model's n_ctx] when 0 */
} kiln_prune_opts;

kiln_prune_opts kiln_prune_opts_default(void);

/* Prunes m by o. Unstructured methods (magnitude, wanda, 2:4) zero
 * weights of m in place (switching it to fp32 products) and set
 * *smaller = NULL; mlp leaves m's weights unchanged and returns a new
 * model with the smaller config in *smaller (free it). Errors name the
 * field: sparsity outside [0, 1), 2:4 with sparsity != 0.5 or on a
 * matrix whose input width is not a multiple of 4, a calibration set
 * shorter than one window, mlp removing every channel. */
kiln_status kiln_prune(kiln_ctx *ctx, kiln_model *m, const kiln_prune_opts *o,
                       kiln_model **smaller);
/* The checks kiln_prune makes before it starts (the same errors), for a
 * caller with work to do before it (a perplexity to measure). */
kiln_status kiln_prune_validate(kiln_ctx *ctx, const kiln_model *m, const kiln_prune_opts *o);

/* Writes DIR/sparsity.json, the mark of a sparse model: kiln_train with
 * init_from (or resume) at a directory that has it keeps every weight of
 * the pruned matrices that is zero at the start at zero (its gradient is
 * masked before the optimizer step, so AdamW's moments and update stay
 * zero there), and copies the mark into its checkpoints. */
kiln_status kiln_prune_mark_save(kiln_ctx *ctx, const char *dir, const kiln_prune_opts *o);
/* Whether DIR has the mark (a readable kiln sparsity.json); errors name
 * the file when it is there but malformed. */
kiln_status kiln_prune_mark_load(kiln_ctx *ctx, const char *dir, bool *marked);
/* Whether tensor i of m is one of the matrices pruning works on. */
bool kiln_prune_target(const kiln_model *m, int i);

/* ======================================================================
 * infer: sampling, generation
 * ====================================================================== */

/* Deprecated: the engine's weight storage had an enum of its own; it is
 * the one kiln_dtype now. These aliases keep old sources compiling (the
 * numbers changed: KILN_WTYPE_BF16 is KILN_DTYPE_BF16, 30). */
typedef kiln_dtype kiln_wtype;
#define KILN_WTYPE_F32 KILN_DTYPE_F32
#define KILN_WTYPE_BF16 KILN_DTYPE_BF16

typedef struct kiln_engine_opts {
    int n_slots;      /* sequences held at once (each with a KV cache) */
    int n_ctx;        /* KV cache length per slot; 0 = the model's n_ctx */
    int chunk;        /* most tokens in one forward step (prefill chunk) */
    /* Weight storage of the matrices [F32]: KILN_DTYPE_F32, BF16, or a
     * block-quantized type quantized at load (Q8_0, Q4_0, Q4_K, Q6_K;
     * ggml's layouts; a matrix whose rows the type's block does not divide
     * is stored Q8_0, or BF16 if 32 does not divide them either, as
     * llama.cpp falls back). Activations and the KV cache are fp32;
     * bf16 halves the bytes streamed per decoded token, Q8_0 takes 8.5
     * bits per weight, Q4_0 4.5, Q4_K 4.5, Q6_K 6.56. Embedding tables
     * and norms stay fp32. */
    kiln_dtype wtype;
    /* The GGUF file the model was loaded from (kiln_model_load of a
     * .gguf), or NULL. When set, each matrix is taken from the file in
     * its own type (Q8_0, Q4_0, Q4_K, Q6_K, BF16, F32: a Q4_K_M file keeps
     * its blocks byte for byte); a matrix the file stores otherwise (F16,
     * or stacked parts of different types) is prepared as wtype. [NULL] */
    const char *weights_gguf;
} kiln_engine_opts;

/* n_slots 1, n_ctx 0, chunk 64, fp32. */
kiln_engine_opts kiln_engine_opts_default(void);

/* An inference engine: the model's weights packed for matrix-vector
 * decoding (rows = outputs), a KV cache per slot, and scratch sized up
 * front. A slot is one sequence; each has its own position. */
typedef struct kiln_engine kiln_engine;

/* Builds an engine from a model's weights. The weights are copied (and
 * converted for bf16), so the model may be freed afterwards. */
kiln_status kiln_engine_new(kiln_ctx *ctx, const kiln_model *m,
                            const kiln_engine_opts *opts, kiln_engine **out);
void kiln_engine_free(kiln_engine *e);
const kiln_config *kiln_engine_config(const kiln_engine *e);
int kiln_engine_n_slots(const kiln_engine *e);
int kiln_engine_n_ctx(const kiln_engine *e);
/* Bytes of weights streamed by one decode step (all matrices + head). */
size_t kiln_engine_weight_bytes(const kiln_engine *e);
/* Most entries one step takes (kiln_engine_opts.chunk as resolved). */
int kiln_engine_chunk(const kiln_engine *e);
/* Mean next-token loss of the engine's weights (as served: fp32, bf16 or
 * quantized) over a token stream, in the windows of kiln_eval_tokens
 * (up to T+1 tokens, stride T; T <= the engine's context). Uses slot 0
 * and leaves it empty. Adds to *loss_sum and *count. */
kiln_status kiln_engine_eval_tokens(kiln_ctx *ctx, kiln_engine *e, const int32_t *tokens,
                                    size_t n, int T, double *loss_sum, double *count);
/* Empties a slot's cache (position 0). */
void kiln_engine_reset(kiln_engine *e, int slot);
/* Number of tokens in a slot's cache (the next token's position). */
int kiln_engine_pos(const kiln_engine *e, int slot);
/* Prefix caching: the first n positions of slot src's cache (n <= its
 * position) become slot dst's cache, dst's position n; dst == src keeps
 * the first n and drops the rest. Feeding dst the tokens that follow then
 * gives the logits a full prefill would. KILN_ERR_RANGE on bad slots or n. */
kiln_status kiln_engine_copy_prefix(kiln_ctx *ctx, kiln_engine *e, int dst, int src, int n);

/* Served LoRA adapters (vLLM-style multi-LoRA): the base weights exist
 * once; each adapter holds only its fp32 A and B. kiln_engine_add_adapter
 * reads PEFT directory dir (names and shapes checked against the base:
 * an adapter for another base is refused naming the tensor) and returns
 * its id (1, 2, ...) in *id; 0 is the base (no adapter). A slot's
 * adapter (kiln_engine_set_slot_adapter; 0 at start) applies to every
 * entry of that slot in a step: the base product W x runs for all rows of
 * a step and each adapter's (alpha/r) B (A x) is added to its own slots'
 * rows only, so requests of different adapters share one batched step.
 * A slot's cache holds the keys and values of the adapter it was filled
 * with: reset (or copy a prefix of the same adapter) on a change. */
kiln_status kiln_engine_add_adapter(kiln_ctx *ctx, kiln_engine *e, const char *dir, int *id);
kiln_status kiln_engine_set_slot_adapter(kiln_ctx *ctx, kiln_engine *e, int slot, int id);
int kiln_engine_slot_adapter(const kiln_engine *e, int slot);
int kiln_engine_n_adapters(const kiln_engine *e);
/* Bytes of adapter id's A and B (fp32); 0 for a bad id. */
size_t kiln_engine_adapter_bytes(const kiln_engine *e, int id);

/* One entry of a forward step: append `token` to `slot` at the slot's
 * next position; when want_logits, its next-token logits are returned. */
typedef struct kiln_engine_tok {
    int slot;
    int32_t token;
    bool want_logits;
} kiln_engine_tok;

/* Runs one forward step over T entries (1 <= T <= opts.chunk) in a single
 * pass over the weights: a batch of decodes, a prefill chunk, or both
 * mixed. Entries of the same slot must be in order. Writes the logits of
 * the entries with want_logits, in entry order, to logits (n_want, V).
 * Errors: token out of range, slot out of range, cache full (KILN_ERR_RANGE;
 * the step is not applied). */
kiln_status kiln_engine_step(kiln_ctx *ctx, kiln_engine *e,
                             const kiln_engine_tok *toks, int T,
                             float *logits);
/* Appends n tokens to a slot in chunks; writes the last token's logits
 * (V) when logits is non-NULL. */
kiln_status kiln_engine_prefill(kiln_ctx *ctx, kiln_engine *e, int slot,
                                const int32_t *tokens, int n, float *logits);

/* How kiln_engine_embed pools a sequence's hidden states. */
typedef enum kiln_pooling {
    KILN_POOLING_MEAN = 0, /* the mean over all positions [default] */
    KILN_POOLING_LAST = 1  /* the last position's (it has seen every token) */
} kiln_pooling;

/* An embedding of n tokens (1 <= n <= the engine's context): prefills them
 * into slot (from position 0; its cache is overwritten) and writes the
 * final norm's output (the hidden state the LM head reads), pooled, to
 * out (C floats; not normalized). Leaves the slot empty. */
kiln_status kiln_engine_embed(kiln_ctx *ctx, kiln_engine *e, int slot, const int32_t *tokens,
                              int n, kiln_pooling pooling, float *out);

/* Sampling parameters (OpenAI / HF semantics). Order of application:
 * repetition penalty (HF: over prompt and generated tokens), frequency and
 * presence penalties (OpenAI: over generated tokens), temperature (0 =
 * greedy), top-k, top-p, min-p, then a draw from the rng seeded by seed. */
typedef struct kiln_sampling {
    float temperature;        /* >= 0; 0 = greedy            [1]   */
    int top_k;                /* >= 0; 0 = off               [0]   */
    float top_p;              /* (0, 1]; 1 = off             [1]   */
    float min_p;              /* [0, 1]; 0 = off             [0]   */
    float repetition_penalty; /* > 0; 1 = off                [1]   */
    float frequency_penalty;  /* [-2, 2]                     [0]   */
    float presence_penalty;   /* [-2, 2]                     [0]   */
    uint64_t seed;            /*                             [0]   */
    int top_logprobs;         /* alternatives reported, 0..20 [0]  */
} kiln_sampling;

kiln_sampling kiln_sampling_default(void);
/* Checks ranges (NaN rejected); the message names the field. */
kiln_status kiln_sampling_validate(kiln_ctx *ctx, const kiln_sampling *p);

typedef struct kiln_sampler kiln_sampler;

typedef struct kiln_token_logprob {
    int32_t token;
    float logprob; /* log-softmax of the model's raw logits */
} kiln_token_logprob;

/* A sampler for vocabulary size V (validates p). Free with
 * kiln_sampler_free. */
kiln_status kiln_sampler_new(kiln_ctx *ctx, const kiln_sampling *p, int V,
                             kiln_sampler **out);
void kiln_sampler_free(kiln_sampler *s);
/* Records prompt tokens (context of the repetition penalty). */
void kiln_sampler_add_prompt(kiln_sampler *s, const int32_t *ids, size_t n);
/* Picks the next token from logits (V floats, overwritten as scratch) and
 * records it as generated. When chosen is non-NULL it receives the chosen
 * token's log-probability; when top is non-NULL it receives the
 * top_logprobs most likely tokens (by raw log-probability). */
int32_t kiln_sampler_sample(kiln_sampler *s, float *logits,
                            kiln_token_logprob *chosen,
                            kiln_token_logprob *top);

/* Text assembly for streaming: turns generated tokens into text that is
 * safe to show — whole UTF-8 characters only, with any text that could be
 * the start of a stop string held back until it is decided. */
typedef struct kiln_textstream kiln_textstream;

/* stops: n_stops non-empty strings (copied). */
kiln_status kiln_textstream_new(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                const char *const *stops, int n_stops,
                                kiln_textstream **out);
void kiln_textstream_free(kiln_textstream *ts);
/* Appends a token's bytes. *out and *len receive the newly emittable text
 * (valid until the next call). *stopped becomes true when a stop string
 * appeared: the text is cut before it and nothing more is emitted. */
kiln_status kiln_textstream_push(kiln_ctx *ctx, kiln_textstream *ts,
                                 int32_t token, const char **out,
                                 size_t *len, bool *stopped);
/* Flushes held-back text at the end (invalid UTF-8 becomes U+FFFD). */
void kiln_textstream_finish(kiln_textstream *ts, const char **out,
                            size_t *len);
/* All text emitted so far (NUL-terminated, valid UTF-8). */
const char *kiln_textstream_text(const kiln_textstream *ts, size_t *len);

/* ---- the generation loop ---------------------------------------------
 * One loop for every caller (kiln generate, kiln chat, the server, the
 * examples): the BOS rule, then per token: sample, end-of-text and stop
 * tokens, the text stream with its stop strings, max_tokens. */

/* The ids a model is prompted with, from encoded text or a rendered chat:
 * what the tokenizer's post_processor template puts before a text where it
 * has one (kiln_tokenizer_post_ids: Llama 3's <|begin_of_text|>); else
 * BOS first for Llama-family models with a bos_token_id (their tokenizers
 * add it), nothing for GPT-2; an empty prompt becomes one token to start
 * from, bos_token_id or else the tokenizer's end-of-text. *out is
 * malloc'ed (free it); *n_out >= 1. */
kiln_status kiln_prompt_ids(kiln_ctx *ctx, const kiln_config *cfg, const kiln_tokenizer *tok,
                            const int32_t *ids, size_t n, int32_t **out, size_t *n_out);

/* Why a generation ended. */
typedef enum kiln_finish {
    KILN_FINISH_NONE = 0,        /* still going */
    KILN_FINISH_LENGTH = 1,      /* max_tokens, or the context is full */
    KILN_FINISH_EOS = 2,         /* end-of-text or the model's eos_token_id */
    KILN_FINISH_STOP_TOKEN = 3,  /* one of stop_ids */
    KILN_FINISH_STOP_STRING = 4, /* a stop string (the text is cut before it) */
    KILN_FINISH_CANCELLED = 5    /* the caller stopped it */
} kiln_finish;

/* "length", "end-of-text", "stop token", "stop string", "cancelled". */
const char *kiln_finish_name(kiln_finish f);

/* Start from kiln_gen_opts_default(). Arrays are copied by kiln_gen_new. */
typedef struct kiln_gen_opts {
    kiln_sampling sampling;     /* (validated by kiln_gen_new)              */
    int max_tokens;             /* > 0; tokens generated, the ending one
                                   included                         [256] */
    bool ignore_eos;            /* end-of-text/eos_token_id do not end [false] */
    const char *const *stops;   /* n_stops non-empty stop strings          */
    int n_stops;
    const int32_t *stop_ids;    /* n_stop_ids tokens that end the reply    */
    int n_stop_ids;
    bool logprobs;              /* report each token's log-probability and
                                   sampling.top_logprobs alternatives      */
    bool skip_special;          /* special tokens (kiln_tokenizer_is_special)
                                   add no text, as Hugging Face's
                                   skip_special_tokens               [true] */
} kiln_gen_opts;

kiln_gen_opts kiln_gen_opts_default(void);

/* The state of one generated sequence. */
typedef struct kiln_gen kiln_gen;

/* For a model with config cfg and tokenizer tok; prompt (the ids from
 * kiln_prompt_ids) is the repetition penalty's context. Errors name the
 * kiln_gen_opts field (or the kiln_sampling field). */
kiln_status kiln_gen_new(kiln_ctx *ctx, const kiln_tokenizer *tok, const kiln_config *cfg,
                         const kiln_gen_opts *opts, const int32_t *prompt, size_t n_prompt,
                         kiln_gen **out);
void kiln_gen_free(kiln_gen *g);

/* One generated token. */
typedef struct kiln_gen_token {
    int32_t id;                     /* -1 when none was sampled */
    const char *text;               /* the text this token releases (with
                                       the held-back tail when it is the
                                       last); valid until the next call */
    size_t len;
    kiln_finish finish;             /* NONE while the sequence goes on */
    kiln_token_logprob chosen;      /* opts.logprobs: this token's      */
    const kiln_token_logprob *top;  /* and the n_top most likely ones   */
    int n_top;
} kiln_gen_token;

/* Samples the next token from logits (V floats; overwritten as scratch),
 * decides whether it ends the sequence and releases its text. A token
 * that ends it by end-of-text or a stop token adds no text (the held-back
 * tail is released); one that reaches max_tokens or completes a stop
 * string does. After the end every call returns finish with id -1. */
kiln_status kiln_gen_next(kiln_ctx *ctx, kiln_gen *g, float *logits, kiln_gen_token *out);
/* Ends the sequence from outside (the context is full, the client left):
 * text and len receive the held-back tail. No-op once ended. */
void kiln_gen_end(kiln_gen *g, kiln_finish why, const char **text, size_t *len);
int kiln_gen_count(const kiln_gen *g);           /* tokens generated */
kiln_finish kiln_gen_finished(const kiln_gen *g); /* NONE while going */
/* All text released so far (valid UTF-8, cut before a stop string). */
const char *kiln_gen_text(const kiln_gen *g, size_t *len);

/* Called for every token; return false to stop (KILN_FINISH_CANCELLED,
 * after one more call carrying the held-back tail when there is one). */
typedef bool (*kiln_gen_cb)(void *user, const kiln_gen_token *t);

/* The whole loop for one sequence: prefills prompt (n >= 1 ids) into the
 * engine's slot after what the slot holds, then samples, calls cb and
 * feeds each token back until g ends; the context filling up ends it with
 * KILN_FINISH_LENGTH. logits: V floats of scratch. */
kiln_status kiln_generate(kiln_ctx *ctx, kiln_engine *e, int slot, kiln_gen *g,
                          const int32_t *prompt, size_t n, float *logits, kiln_gen_cb cb,
                          void *user);

/* Samples n sequences at once (GRPO's rollouts, a batch of prompts):
 * sequence i continues prompts[i] (n_prompt[i] ids, 1 to the context - 1)
 * in slot i (reset first; n <= the engine's slots and chunk), drawing from
 * gens[i] (made by the caller with its sampling, seed, max_tokens and
 * stops). A prompt equal to the one before is prefilled once and the cache
 * copied. Each decode step feeds one token of every live sequence in one
 * kiln_engine_step. The ids each sequence generated (the ending token
 * included, as kiln_gen_next returns them) go to ids (n, cap), their
 * count to n_ids (n); a sequence whose context or cap fills ends with
 * KILN_FINISH_LENGTH. logprobs (may be NULL; (n, cap)) receives each id's
 * log-probability under the engine's raw logits (log-softmax, before any
 * temperature). steps (may be NULL) receives the decode steps run. */
kiln_status kiln_generate_batch(kiln_ctx *ctx, kiln_engine *e, int n,
                                const int32_t *const *prompts, const size_t *n_prompt,
                                kiln_gen **gens, int32_t *ids, int cap, int *n_ids,
                                float *logprobs, int64_t *steps);

/* ---- speculative decoding ---------------------------------------------
 * A small draft model proposes n_draft tokens on its own engine; the
 * target verifies them all in one batched forward step and keeps the
 * longest acceptable prefix (the standard accept/reject rule: draft token
 * x drawn from q is kept with probability min(1, p(x)/q(x)), the first
 * rejected one is replaced by a draw from max(0, p - q) renormalised, and
 * a bonus token is drawn from p when all are kept), so the output has
 * exactly the target's distribution under the sampling settings, and at
 * temperature 0 the target's greedy tokens. p and q are both processed by
 * the same kiln_sampling (penalties, temperature, top-k, top-p, min-p). */

#define KILN_SPEC_MAX_DRAFT 16

typedef struct kiln_spec_opts {
    int n_draft; /* tokens drafted per round, 1..KILN_SPEC_MAX_DRAFT [4] */
} kiln_spec_opts;

kiln_spec_opts kiln_spec_opts_default(void);

/* What a speculative generation did. A round is one target forward over
 * the last token and the drafted ones; plain steps are single-token
 * target steps (the first few of every generation, which time the target
 * alone for the speed-up estimate, and those after the draft ran out of
 * room). */
typedef struct kiln_spec_stats {
    uint64_t rounds;    /* verify steps of the target */
    uint64_t drafted;   /* tokens the draft proposed */
    uint64_t accepted;  /* of them, kept */
    uint64_t emitted;   /* tokens the rounds produced (kept + one per round) */
    uint64_t plain;     /* single-token target steps */
    double draft_s;     /* seconds in the draft's forward steps */
    double verify_s;    /* seconds in the target's verify steps */
    double plain_s;     /* seconds in the plain steps */
    double plain_min_s; /* the fastest plain step */
} kiln_spec_stats;

/* The estimated speed-up of the rounds over the target alone: tokens per
 * second of the rounds (draft + verify time) times the mean plain target
 * step's time (a few steps: an estimate; bench/bench_spec measures it).
 * 0 when there is no round or no plain step. */
double kiln_spec_speedup(const kiln_spec_stats *s);

/* Checks that a draft can serve a target: the same vocabulary size, and
 * (when both tokenizers are given) the same tokens, byte for byte, with
 * the same special tokens. KILN_ERR_INVALID_ARG saying where they differ. */
kiln_status kiln_spec_check(kiln_ctx *ctx, const kiln_config *target, const kiln_tokenizer *ttok,
                            const kiln_config *draft, const kiln_tokenizer *dtok);

/* kiln_generate with a draft engine: prefills prompt into slot of both
 * engines (which must hold the same number of tokens; a draft whose
 * context cannot hold the prompt is left out), then runs rounds of
 * o->n_draft drafted tokens (fewer near max_tokens and the end of either
 * context) until g ends, calling cb for every token as kiln_generate
 * does. The target's slot ends holding all tokens but the last generated,
 * as kiln_generate leaves it, and the draft's the same. n_draft + 1 must
 * not exceed the target engine's chunk. stats (may be NULL) is filled. */
kiln_status kiln_generate_spec(kiln_ctx *ctx, kiln_engine *e, kiln_engine *draft,
                               const kiln_spec_opts *o, int slot, kiln_gen *g,
                               const int32_t *prompt, size_t n, kiln_gen_cb cb, void *user,
                               kiln_spec_stats *stats);

/* ======================================================================
 * serve: HTTP server
 * ====================================================================== */

typedef struct kiln_serve_opts {
    const char *model_dir;  /* config.json, model.safetensors, tokenizer.json */
    const char *model_name; /* id in /v1/models; NULL = basename of dir */
    const char *tokenizer;  /* NULL = model_dir (tokenizer.json) */
    const char *host;       /* [127.0.0.1] */
    int port;               /* [8080]; 0 = any free port (printed) */
    const char *api_key;    /* NULL = no authentication; "" is refused */
    int parallel;           /* slots decoded together [4] */
    int n_ctx;              /* context per slot; 0 = model's */
    int max_queue;          /* waiting requests before 429 [64] */
    size_t max_body;        /* request body limit in bytes [1 MiB] */
    int max_connections;    /* [256] */
    kiln_dtype wtype;       /* engine weights (kiln_engine_opts.wtype) [F32] */
    const char *weights_gguf; /* kiln_engine_opts.weights_gguf: model_dir when it is
                                 the .gguf whose stored types to keep [NULL] */
    const char *cors;       /* CORS: "*" or comma-separated origins; NULL = off */
    const char *log_format; /* access log on stderr: ["text"], "json" or "off" */
    /* /v1/embeddings: how a text's final-norm hidden states are pooled
     * [KILN_POOLING_MEAN]; the vectors returned are unit length */
    kiln_pooling embedding_pooling;
    /* A training run directory (RUN/latest names its newest checkpoint):
     * serve that checkpoint (model_dir NULL: resolved from here) and
     * follow the run: a newer checkpoint is verified and loaded in the
     * background and swapped in between requests (those running finish on
     * the old weights); one that fails to load is logged and the old
     * weights stay [NULL] */
    const char *run_dir;
    int watch_ms;           /* how often run_dir/latest is read; 0 = never [1000] */
    /* Speculative decoding: a draft model directory (or .gguf) sharing the
     * target's tokenizer (kiln_spec_check; a draft without a tokenizer is
     * checked with `tokenizer`). Each decoding slot drafts up to
     * draft_tokens tokens a step on the draft's engine and the target
     * verifies them in its batched step. Requests with a grammar
     * (response_format, tools) or echo logprobs decode without the draft,
     * one token a step [NULL] */
    const char *draft_dir;
    int draft_tokens;       /* kiln_spec_opts.n_draft, 1..KILN_SPEC_MAX_DRAFT [4] */
    /* LoRA adapters served over the one base (kiln_engine_add_adapter):
     * each "NAME=DIR" (a PEFT directory) is model id NAME in /v1/models,
     * chosen per request by its "model" field; the base's id uses none.
     * Requests of different adapters share batched steps [none] */
    const char *const *adapters;
    int n_adapters;
} kiln_serve_opts;

kiln_serve_opts kiln_serve_opts_default(void);
/* Loads the model and serves the OpenAI-compatible API until SIGINT or
 * SIGTERM. Prints "kiln serve: listening on http://HOST:PORT" to stdout
 * once accepting. */
kiln_status kiln_serve_run(kiln_ctx *ctx, const kiln_serve_opts *opts);

#ifdef __cplusplus
}
#endif

#endif /* KILN_H */
