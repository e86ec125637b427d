/*
 * tok_internal.h — the private representation of a tokenizer shared by the
 * files of src/tokenizer/: the vocabulary (exact bytes per id), the merge
 * table, the pre-tokenization pattern (PCRE2) and the special tokens.
 *
 * Every tokenizer, "bytes" included, is a byte-level BPE: ids map to exact
 * byte strings, merges (left id, right id) -> (rank, result id) say how two
 * adjacent tokens combine, and special tokens are whole strings that are
 * never produced by splitting ordinary text. The "bytes" tokenizer is the
 * case with no merges (a fast path skips pre-tokenization there).
 */
#ifndef KILN_TOK_INTERNAL_H
#define KILN_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "base/base.h"

/* Token flags. */
enum {
    TOKF_SPECIAL = 1, /* added/special token (never produced by BPE)        */
    TOKF_WHOLE = 2,   /* BPE of this token's own bytes gives exactly this id:
                         a pre-token equal to it can skip the merge loop   */
    TOKF_HOLE = 4,    /* no token has this id (gaps in a loaded vocab)      */
    TOKF_ADDED = 8,   /* listed in added_tokens but not special (HF)        */
    TOKF_NOTVOCAB = 16 /* added token absent from model.vocab (HF layout)   */
};

/* The pre-tokenization patterns kiln knows by name. */
#define TOK_PATTERN_GPT2                                                   \
    "'(?:[sdmt]|ll|ve|re)| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
#define TOK_PATTERN_HF_GPT2                                                \
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
#define TOK_PATTERN_LLAMA3                                                 \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| " \
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

#define TOK_PATTERN_QWEN2                                                  \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| " \
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

typedef enum tok_pre {
    TOK_PRE_BYTELEVEL = 0, /* HF ByteLevel(use_regex=true): GPT-2 pattern   */
    TOK_PRE_SPLIT = 1,     /* HF Sequence[Split(Regex), ByteLevel(no regex)]*/
    TOK_PRE_NONE = 2       /* bytes tokenizer: no splitting needed          */
} tok_pre;

/* Most ids a post_processor template adds on either side of a sequence. */
#define TOK_POST_MAX 8

struct kiln_tokenizer {
    int32_t n_vocab;  /* ids are 0..n_vocab-1 (holes flagged TOKF_HOLE)   */
    int32_t eot;      /* end-of-text id, -1 when the vocab has none        */
    char *name;       /* "bytes", "gpt2", or the file it came from          */

    /* token bytes: id -> blob[off[id] .. off[id]+len[id]) */
    char *blob;
    size_t blob_len, blob_cap;
    size_t *off;     /* (n_vocab) */
    uint32_t *len;   /* (n_vocab) */
    uint8_t *flags;  /* (n_vocab) TOKF_* */
    int32_t byte_id[256]; /* id of each single byte, -1 when absent */

    /* bytes -> id for non-special tokens (open addressing; slot = id+1) */
    int32_t *vh;
    uint32_t vh_mask;

    /* merges: key (left<<32 | right) -> rank and result (open addressing) */
    int32_t n_merges;
    int32_t *m_left, *m_right, *m_result; /* (n_merges) in rank order */
    uint64_t *mh_key;                     /* (mh_mask+1), ~0 = empty    */
    int32_t *mh_rank;                     /* (mh_mask+1)                */
    uint32_t mh_mask;

    /* specials, longest first for matching in chat rendering */
    int32_t *special_ids;
    int n_special;
    int n_added; /* non-special added tokens (TOKF_ADDED): matched in text */

    /* pre-tokenization */
    tok_pre pre;
    char *pattern;         /* the regex (NULL for TOK_PRE_NONE) */
    pcre2_code *re;
    bool add_prefix_space; /* HF ByteLevel add_prefix_space */
    bool ignore_merges;    /* HF BPE ignore_merges: whole-vocab pieces win */
    bool nfc;              /* HF normalizer {"type": "NFC"} (Qwen2): the text
                              between added tokens is put in Unicode NFC
                              before pre-tokenization (tok_nfc) */

    /* Parts of a loaded tokenizer.json kiln does not interpret, written
     * back unchanged on save (normalizer, post_processor, decoder,
     * truncation, padding, model options). NULL when none. */
    json_t *hf_extra;

    /* The tokenizer.json post_processor's ids around one sequence (its
     * "single" template: what Hugging Face adds with add_special_tokens),
     * e.g. Llama 3's <|begin_of_text|> before; has_post: the file has a
     * template (TemplateProcessing, BertProcessing, RobertaProcessing),
     * which then decides the prompt's BOS (kiln_prompt_ids). */
    bool has_post;
    int n_post_pre, n_post_suf;
    int32_t post_pre[TOK_POST_MAX], post_suf[TOK_POST_MAX];

    /* The model's chat template (tokenizer_config.json "chat_template",
     * or kiln_tokenizer_set_chat_template); NULL: ChatML. */
    struct jinja_tmpl *chat_tmpl;
    char *chat_src, *bos_token, *eos_token;
};

/* ---- chat templates (chat.c) ------------------------------------------ */

/* Reads DIR/tokenizer_config.json when it exists and sets its
 * chat_template, bos_token and eos_token on t. Errors name the file. */
kiln_status tok_load_chat_config(kiln_ctx *ctx, kiln_tokenizer *t, const char *dir);
/* Frees the template fields. */
void tok_chat_free(kiln_tokenizer *t);

/* ---- construction (tokenizer.c) ------------------------------------- */

/* An empty tokenizer with room for n ids, all holes. */
kiln_tokenizer *tok_new(kiln_ctx *ctx, int32_t n_vocab);
/* Sets the bytes of id (must be a hole). Returns KILN_ERR_NOMEM. */
kiln_status tok_set(kiln_ctx *ctx, kiln_tokenizer *t, int32_t id,
                    const void *bytes, size_t len, uint8_t flags);
/* Grows the id space to n (new ids are holes). */
kiln_status tok_grow(kiln_ctx *ctx, kiln_tokenizer *t, int32_t n);
/* Builds the byte map, the bytes->id hash and the special list; checks
 * that no two non-special tokens have the same bytes (error names both)
 * and that all 256 bytes have a token. `what` names the source. */
kiln_status tok_finish_vocab(kiln_ctx *ctx, kiln_tokenizer *t,
                             const char *what);
/* Sets the merge table from (left, right) pairs in rank order; the result
 * id of each is looked up by concatenated bytes (error when missing).
 * Then computes TOKF_WHOLE. Takes ownership of left/right. */
kiln_status tok_set_merges(kiln_ctx *ctx, kiln_tokenizer *t, int32_t n,
                           int32_t *left, int32_t *right, const char *what);
/* Compiles the pattern (NULL = by t->pre). */
kiln_status tok_set_pattern(kiln_ctx *ctx, kiln_tokenizer *t,
                            const char *pattern);
/* kiln_tokenizer_split_point for a pattern string (len when the pattern
 * is not one of the known ones). */
size_t tok_split_point_pattern(const char *pattern, const char *text, size_t len,
                               size_t from);
/* Looks up bytes among non-special tokens; -1 when absent. */
int32_t tok_lookup(const kiln_tokenizer *t, const void *bytes, size_t len);
/* Merge lookup: returns rank (or -1) and sets *result. */
static inline int32_t tok_merge_rank(const kiln_tokenizer *t, int32_t a,
                                     int32_t b, int32_t *result)
{
    if (!t->mh_key) return -1;
    uint64_t k = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint64_t h = k * 0x9E3779B97F4A7C15ull;
    uint32_t i = (uint32_t)(h >> 32) & t->mh_mask;
    for (;;) {
        uint64_t kk = t->mh_key[i];
        if (kk == k) {
            int32_t r = t->mh_rank[i];
            *result = t->m_result[r];
            return r;
        }
        if (kk == ~0ull) return -1;
        i = (i + 1) & t->mh_mask;
    }
}

/* The "bytes" tokenizer. */
kiln_status tok_make_bytes(kiln_ctx *ctx, kiln_tokenizer **out);

/* ---- byte-level unicode mapping (bytelevel.c) ----------------------- */

/* GPT-2's bytes_to_unicode: the code point that stands for byte b. */
uint32_t tok_byte_to_cp(uint8_t b);
/* Inverse: byte for code point cp, or -1 when cp is not one of the 256. */
int tok_cp_to_byte(uint32_t cp);
/* Encodes bytes as the byte-level string (UTF-8), malloc'ed. */
char *tok_bytes_to_bl(const void *bytes, size_t len, size_t *out_len);
/* Decodes a byte-level UTF-8 string into raw bytes (malloc'ed). Returns
 * false when s holds a character outside the byte-level alphabet. */
bool tok_bl_to_bytes(const char *s, size_t len, char **out, size_t *out_len);

/* ---- encoding (bpe.c) ----------------------------------------------- */

/* A growable id buffer. */
typedef struct tok_ids {
    int32_t *v;
    size_t n, cap;
} tok_ids;
bool tok_ids_push(tok_ids *b, int32_t id);

/* Per-thread scratch for encoding (match data, merge workspace). */
typedef struct tok_scratch tok_scratch;
tok_scratch *tok_scratch_new(const kiln_tokenizer *t);
void tok_scratch_free(tok_scratch *s);
/* Encodes ordinary text (no special tokens recognised), appending to out.
 * Returns false when out of memory. */
/* Unicode NFC of text[0..len) (normalize.c). Returns false when out of
 * memory; *out is NULL when the text is already NFC, ASCII, or not valid
 * UTF-8 (left as it is: Hugging Face never sees invalid UTF-8), else a
 * malloc'ed copy of *out_len bytes the caller frees. */
bool tok_nfc(const char *text, size_t len, char **out, size_t *out_len);
/* Whether tok_nfc is available (built with ICU). */
bool tok_nfc_available(void);

bool tok_encode_text(const kiln_tokenizer *t, tok_scratch *s,
                     const char *text, size_t len, tok_ids *out);
/* BPE of one pre-token's bytes, appending ids to out. */
bool tok_bpe_piece(const kiln_tokenizer *t, tok_scratch *s,
                   const unsigned char *p, size_t n, tok_ids *out);

/* ---- formats (tok_json.c) ------------------------------------------- */

kiln_status tok_load_hf(kiln_ctx *ctx, const char *path,
                        kiln_tokenizer **out);
kiln_status tok_load_hf_json(kiln_ctx *ctx, const json_t *root,
                             const char *what, kiln_tokenizer **out);
kiln_status tok_load_gpt2(kiln_ctx *ctx, const char *dir,
                          kiln_tokenizer **out);
/* Builds the tokenizer.json document (caller json_decref()s). */
json_t *tok_to_hf_json(const kiln_tokenizer *t);

#endif /* KILN_TOK_INTERNAL_H */
