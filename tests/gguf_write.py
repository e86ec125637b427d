#!/usr/bin/python3
"""gguf_write.py — an independent GGUF writer for kiln's tests, written from
the GGUF specification (ggml's docs/gguf.md) with the standard library only:
no kiln code, no gguf-py. It writes a tiny model whose every weight is a
formula, in several tensor types, and checks what `kiln import` made of it.

  gguf_write.py write ARCH OUT.gguf   ARCH: gpt2 | llama
  gguf_write.py check ARCH DIR        DIR: `kiln import OUT.gguf --out DIR`

The file: version 3, general.alignment 64 (not the default 32, so a reader
that ignores the key fails), metadata of many value types, a byte-level BPE
vocabulary (256 bytes, merges "h e", "l l", "he ll", "hell o", and
<|endoftext|>), tensors in F32, F16, BF16 and Q8_0 (blocks encoded here).
llama's attn_q / attn_k rows are permuted into llama.cpp's order as
convert_hf_to_gguf.py does; `check` expects kiln to have undone it, gpt2's
Conv1D weights to be transposed back, and every value to equal the
dequantization computed here, bit for bit.
"""
import json
import math
import struct
import sys

ALIGN = 64
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
F32, F16, Q8_0, BF16 = 0, 1, 8, 30

L, C, NH, KVH, V, CTX = 2, 32, 4, 2, 261, 16
HS = C // NH


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f16(x):
    return struct.unpack("<e", struct.pack("<e", x))[0]


def bf16_bits(x):
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


def value(name, i):
    """The formula every weight comes from (HF layout, flat index i)."""
    h = sum(ord(c) for c in name) % 97
    return f32(0.05 * math.sin(0.37 * i + h) + 0.001 * (i % 7))


# ---- the byte-level vocabulary ------------------------------------------

def bytes_to_unicode():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


B2U = bytes_to_unicode()


def bl(s):
    return "".join(B2U[b] for b in s.encode("utf-8"))


TOKENS = [B2U[b] for b in range(256)] + ["he", "ll", "hell", "hello", "<|endoftext|>"]
MERGES = ["h e", "l l", "he ll", "hell o"]
EOT = 260


# ---- model tensors: (gguf name, HF name, HF shape, type, op) -------------

def tensors(arch):
    out = []
    if arch == "gpt2":
        out.append(("token_embd.weight", "transformer.wte.weight", (V, C), Q8_0, "copy"))
        out.append(("position_embd.weight", "transformer.wpe.weight", (CTX, C), F16, "copy"))
        for l in range(L):
            p, g = "transformer.h.%d." % l, "blk.%d." % l
            out += [
                (g + "attn_norm.weight", p + "ln_1.weight", (C,), F32, "copy"),
                (g + "attn_norm.bias", p + "ln_1.bias", (C,), F32, "copy"),
                (g + "attn_qkv.weight", p + "attn.c_attn.weight", (C, 3 * C), Q8_0, "t"),
                (g + "attn_qkv.bias", p + "attn.c_attn.bias", (3 * C,), F32, "copy"),
                (g + "attn_output.weight", p + "attn.c_proj.weight", (C, C), BF16, "t"),
                (g + "attn_output.bias", p + "attn.c_proj.bias", (C,), F32, "copy"),
                (g + "ffn_norm.weight", p + "ln_2.weight", (C,), F32, "copy"),
                (g + "ffn_norm.bias", p + "ln_2.bias", (C,), F32, "copy"),
                (g + "ffn_up.weight", p + "mlp.c_fc.weight", (C, 4 * C), F16, "t"),
                (g + "ffn_up.bias", p + "mlp.c_fc.bias", (4 * C,), F32, "copy"),
                (g + "ffn_down.weight", p + "mlp.c_proj.weight", (4 * C, C), F32, "t"),
                (g + "ffn_down.bias", p + "mlp.c_proj.bias", (C,), F32, "copy"),
            ]
        out.append(("output_norm.weight", "transformer.ln_f.weight", (C,), F32, "copy"))
        out.append(("output_norm.bias", "transformer.ln_f.bias", (C,), F32, "copy"))
    else:
        F = 48
        out.append(("token_embd.weight", "model.embed_tokens.weight", (V, C), F16, "copy"))
        for l in range(L):
            p, g = "model.layers.%d." % l, "blk.%d." % l
            out += [
                (g + "attn_norm.weight", p + "input_layernorm.weight", (C,), F32, "copy"),
                (g + "attn_q.weight", p + "self_attn.q_proj.weight", (NH * HS, C), Q8_0, "pq"),
                (g + "attn_k.weight", p + "self_attn.k_proj.weight", (KVH * HS, C), F32, "pk"),
                (g + "attn_v.weight", p + "self_attn.v_proj.weight", (KVH * HS, C), Q8_0, "copy"),
                (g + "attn_output.weight", p + "self_attn.o_proj.weight", (C, C), BF16, "copy"),
                (g + "ffn_norm.weight", p + "post_attention_layernorm.weight", (C,), F32, "copy"),
                (g + "ffn_gate.weight", p + "mlp.gate_proj.weight", (F, C), F16, "copy"),
                (g + "ffn_up.weight", p + "mlp.up_proj.weight", (F, C), Q8_0, "copy"),
                (g + "ffn_down.weight", p + "mlp.down_proj.weight", (C, F), F32, "copy"),
            ]
        out.append(("output_norm.weight", "model.norm.weight", (C,), F32, "copy"))
        out.append(("output.weight", "lm_head.weight", (V, C), Q8_0, "copy"))
    return out


def gguf_layout(hf, shape, op):
    """HF-layout flat values -> (rows of the GGUF tensor, row length)."""
    if len(shape) == 1:
        return [hf[:]], shape[0]
    r, c = shape
    rows = [hf[i * c:(i + 1) * c] for i in range(r)]
    if op == "t":  # Conv1D (in, out) -> (out, in)
        rows = [[hf[k * c + j] for k in range(r)] for j in range(c)]
        return rows, r
    if op in ("pq", "pk"):  # convert_hf_to_gguf.py: reshape(n_head, 2, HS/2, C).swapaxes(1, 2)
        n_head = NH if op == "pq" else KVH
        hs = r // n_head
        perm = []
        for h in range(n_head):
            for i in range(hs // 2):
                for j in range(2):
                    perm.append(h * hs + j * (hs // 2) + i)
        rows = [rows[s] for s in perm]
    return rows, c


def encode(rows, ty):
    """Bytes of the rows in type ty, and their dequantized values."""
    data, deq = bytearray(), []
    for row in rows:
        if ty == F32:
            data += struct.pack("<%df" % len(row), *row)
            deq += row
        elif ty == F16:
            data += struct.pack("<%de" % len(row), *row)
            deq += [f16(x) for x in row]
        elif ty == BF16:
            for x in row:
                b = bf16_bits(x)
                data += struct.pack("<H", b)
                deq.append(struct.unpack("<f", struct.pack("<I", b << 16))[0])
        elif ty == Q8_0:  # blocks of 32: fp16 d = amax / 127, int8 q = round(x / d)
            for k in range(0, len(row), 32):
                blk = row[k:k + 32]
                amax = max(abs(x) for x in blk)
                d = amax / 127.0
                dh = f16(d)
                inv = 1.0 / d if d else 0.0
                q = [int(round(x * inv)) if d else 0 for x in blk]
                q = [max(-128, min(127, v)) for v in q]
                data += struct.pack("<e", d) + struct.pack("<32b", *q)
                deq += [f32(v * dh) for v in q]
    return bytes(data), deq


# ---- writing -------------------------------------------------------------

def s_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv(key, ty, val):
    out = s_str(key) + struct.pack("<I", ty)
    if ty == T_STR:
        return out + s_str(val)
    if ty == T_ARR:
        et, items = val
        out += struct.pack("<IQ", et, len(items))
        if et == T_STR:
            return out + b"".join(s_str(x) for x in items)
        fmt = {T_I32: "i", T_U8: "B", T_F32: "f"}[et]
        return out + struct.pack("<%d%s" % (len(items), fmt), *items)
    fmt = {T_U8: "B", T_I8: "b", T_U16: "H", T_I16: "h", T_U32: "I", T_I32: "i",
           T_F32: "f", T_BOOL: "?", T_U64: "Q", T_I64: "q", T_F64: "d"}[ty]
    return out + struct.pack("<" + fmt, val)


def write(arch, out):
    meta = [
        kv("general.architecture", T_STR, arch),
        kv("general.name", T_STR, "independent writer"),
        kv("general.alignment", T_U32, ALIGN),
        kv("general.some_u8", T_U8, 7),
        kv("general.some_i64", T_I64, -5),
        kv("general.some_f64", T_F64, 2.5),
        kv("general.floats", T_ARR, (T_F32, [1.0, 2.0])),
        kv(arch + ".context_length", T_U64, CTX),  # a u64, not u32: readers must widen
        kv(arch + ".embedding_length", T_U32, C),
        kv(arch + ".block_count", T_U32, L),
        kv(arch + ".feed_forward_length", T_U32, 4 * C if arch == "gpt2" else 48),
        kv(arch + ".attention.head_count", T_U32, NH),
        kv(arch + ".attention.head_count_kv", T_U32, NH if arch == "gpt2" else KVH),
        kv("tokenizer.ggml.model", T_STR, "gpt2"),
        kv("tokenizer.ggml.pre", T_STR, "gpt-2"),
        kv("tokenizer.ggml.tokens", T_ARR, (T_STR, TOKENS)),
        kv("tokenizer.ggml.token_type", T_ARR, (T_I32, [1] * 260 + [3])),
        kv("tokenizer.ggml.merges", T_ARR, (T_STR, MERGES)),
        kv("tokenizer.ggml.bos_token_id", T_U32, EOT),
        kv("tokenizer.ggml.eos_token_id", T_U32, EOT),
    ]
    if arch == "gpt2":
        meta.append(kv("gpt2.attention.layer_norm_epsilon", T_F32, 1e-5))
    else:
        meta += [kv("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-6),
                 kv("llama.rope.freq_base", T_F32, 10000.0),
                 kv("llama.rope.dimension_count", T_U32, HS),
                 kv("tokenizer.ggml.add_bos_token", T_BOOL, True)]
    infos, blobs, off = [], [], 0
    for gname, hname, shape, ty, op in tensors(arch):
        n = 1
        for d in shape:
            n *= d
        hf = [value(hname, i) for i in range(n)]
        rows, rowlen = gguf_layout(hf, shape, op)
        data, _ = encode(rows, ty)
        ne = [rowlen] if len(shape) == 1 else [rowlen, len(rows)]
        infos.append(s_str(gname) + struct.pack("<I", len(ne)) +
                     b"".join(struct.pack("<Q", x) for x in ne) + struct.pack("<IQ", ty, off))
        pad = (-len(data)) % ALIGN
        blobs.append(data + b"\0" * pad)
        off += len(data) + pad
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(meta)) + b"".join(meta) + b"".join(infos)
    head += b"\0" * ((-len(head)) % ALIGN)
    with open(out, "wb") as f:
        f.write(head + b"".join(blobs))


# ---- checking ------------------------------------------------------------

def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    hl = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + hl])
    base = 8 + hl
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", (name, t["dtype"])
        b, e = t["data_offsets"]
        out[name] = (t["shape"], list(struct.unpack("<%df" % ((e - b) // 4), raw[base + b:base + e])))
    return out


def check(arch, d):
    st = read_safetensors(d + "/model.safetensors")
    cfg = json.load(open(d + "/config.json"))
    bad = []
    want_cfg = {"gpt2": {"n_layer": L, "n_embd": C, "n_head": NH, "n_positions": CTX, "vocab_size": V},
                "llama": {"num_hidden_layers": L, "hidden_size": C, "num_attention_heads": NH,
                          "num_key_value_heads": KVH, "intermediate_size": 48, "vocab_size": V,
                          "max_position_embeddings": CTX, "tie_word_embeddings": False}}[arch]
    for k, v in want_cfg.items():
        if cfg.get(k) != v:
            bad.append("config %s = %r, expected %r" % (k, cfg.get(k), v))
    names = set()
    for gname, hname, shape, ty, op in tensors(arch):
        names.add(hname)
        n = 1
        for s in shape:
            n *= s
        hf = [value(hname, i) for i in range(n)]
        rows, rowlen = gguf_layout(hf, shape, op)
        _, deq = encode(rows, ty)
        # undo the layout on the dequantized values: expected HF tensor
        exp = [0.0] * n
        if len(shape) == 1:
            exp = deq
        elif op == "t":
            r, c = shape
            for j in range(c):
                for k in range(r):
                    exp[k * c + j] = deq[j * r + k]
        elif op in ("pq", "pk"):
            r, c = shape
            n_head = NH if op == "pq" else KVH
            hs = r // n_head
            g = 0
            for h in range(n_head):
                for i in range(hs // 2):
                    for j in range(2):
                        src = h * hs + j * (hs // 2) + i
                        exp[src * c:(src + 1) * c] = deq[g * c:(g + 1) * c]
                        g += 1
        else:
            exp = deq
        if hname not in st:
            bad.append("%s missing" % hname)
            continue
        got_shape, got = st[hname]
        if list(got_shape) != list(shape):
            bad.append("%s shape %s, expected %s" % (hname, got_shape, list(shape)))
        elif got != exp:
            k = next(i for i in range(n) if got[i] != exp[i])
            bad.append("%s[%d] = %r, expected %r" % (hname, k, got[k], exp[k]))
    extra = set(st) - names
    if extra:
        bad.append("unexpected tensors %s" % sorted(extra))
    for b in bad:
        print(b)
    print("checked %d tensors: %s" % (len(names), "OK" if not bad else "%d problems" % len(bad)))
    return 0 if not bad else 1


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("write", "check") or sys.argv[2] not in ("gpt2", "llama"):
        sys.exit("usage: gguf_write.py write|check gpt2|llama PATH")
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    else:
        sys.exit(check(sys.argv[2], sys.argv[3]))
