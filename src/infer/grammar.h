/*
 * grammar.h — constrained decoding for JSON output: a grammar compiled
 * from a JSON Schema subset (or "any JSON object"), a parse state fed the
 * output's bytes, and the set of vocabulary tokens whose bytes can extend
 * the output so far (computed over a byte trie of the vocabulary, so
 * tokens sharing a prefix share its work). The server masks the logits of
 * the other tokens before sampling, so the output is always a valid
 * prefix, and a finished output parses and validates against the schema.
 *
 * Schema subset: type (a name or an array of names: object, array,
 * string, number, integer, boolean, null), properties, required,
 * additionalProperties (false; or, for an object without properties,
 * true or a schema for every value), items, enum, const, and the
 * annotations title, description, default, examples, $schema, $id,
 * $comment. Any other keyword (anyOf, $ref, pattern, minItems, format,
 * ...) is refused, the message naming it. Objects with properties accept
 * them in any order, each at most once, nothing else; '}' only once every
 * required one is there. Whitespace runs are at most 16 bytes, none before
 * or after the root value, so a model cannot pad forever; numbers have
 * at most 24 characters; nesting at most 32 levels.
 */
#ifndef KILN_INFER_GRAMMAR_H
#define KILN_INFER_GRAMMAR_H

#include "base/base.h"

typedef struct infer_grammar infer_grammar;
typedef struct infer_gstate infer_gstate;
typedef struct infer_vocab_trie infer_vocab_trie;

/* Compiles a JSON Schema (schema: JSON text, len bytes) into a grammar.
 * schema NULL: any JSON object (response_format json_object).
 * KILN_ERR_INVALID_ARG with the offending keyword named in the message
 * (and copied to bad_keyword when not NULL, up to 63 bytes). */
kiln_status infer_grammar_json(kiln_ctx *ctx, const char *schema, size_t len,
                               infer_grammar **out, char bad_keyword[64]);
/* A grammar for one function call: {"name": N, "arguments": A} with N one
 * of names (as JSON strings) and A valid against schemas[i] (JSON text;
 * NULL = any object) of the name chosen; the keys in this order. */
kiln_status infer_grammar_tool_call(kiln_ctx *ctx, const char *const *names,
                                    const char *const *schemas, int n,
                                    infer_grammar **out, char bad_keyword[64]);
void infer_grammar_free(infer_grammar *g);

/* A parse state at the start of the output (the grammar must outlive it). */
infer_gstate *infer_gstate_new(const infer_grammar *g);
void infer_gstate_free(infer_gstate *s);
/* Feeds n bytes: true when they extend a valid prefix (the state moves
 * on), false when not (the state is unchanged). */
bool infer_gstate_feed(infer_gstate *s, const char *bytes, size_t n);
/* The output so far is a complete value (it may still go on: a number). */
bool infer_gstate_accepting(const infer_gstate *s);
/* Complete, and no byte may follow. */
bool infer_gstate_done(const infer_gstate *s);
/* For a tool-call grammar: the index of the name chosen, or -1. */
int infer_gstate_tool(const infer_gstate *s);

/* The vocabulary's tokens as a byte trie (special tokens and tokens with
 * no bytes left out). Read-only once built: one per tokenizer, shared. */
kiln_status infer_vocab_trie_new(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                 infer_vocab_trie **out);
void infer_vocab_trie_free(infer_vocab_trie *t);
/* Sets allowed[id] = 1 for every token of t whose bytes the state
 * accepts and leaves the other entries alone; returns how many entries
 * of allowed are 1 then (allowed[0..V) as the vocabulary size). */
int infer_gstate_allowed(infer_gstate *s, const infer_vocab_trie *t, uint8_t *allowed);

#endif /* KILN_INFER_GRAMMAR_H */
