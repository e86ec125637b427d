# tests/embed_ref.py MODEL_DIR IDS_JSON POOLING — the embedding kiln serve's
# /v1/embeddings should give, computed independently in numpy from the
# model's safetensors (a GPT-2 in Hugging Face's layout, as `kiln init`
# writes it): the final layer norm's outputs over the token ids, pooled
# (mean | last), unit-normalized. Prints the vector as JSON.
import json, struct, sys
import numpy as np

d, ids, pooling = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
cfg = json.load(open(d + "/config.json"))
b = open(d + "/model.safetensors", "rb").read()
n = struct.unpack("<Q", b[:8])[0]
hdr = json.loads(b[8:8 + n])
W = {k: np.frombuffer(b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]],
                      dtype=np.float32).reshape(v["shape"]).astype(np.float64)
     for k, v in hdr.items() if k != "__metadata__"}
eps, H = cfg["layer_norm_epsilon"], cfg["n_head"]

def ln(x, w, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b

def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

T = len(ids)
x = W["transformer.wte.weight"][ids] + W["transformer.wpe.weight"][:T]
C = x.shape[1]
hs = C // H
mask = np.triu(np.full((T, T), -np.inf), 1)
for l in range(cfg["n_layer"]):
    p = "transformer.h.%d." % l
    h = ln(x, W[p + "ln_1.weight"], W[p + "ln_1.bias"])
    qkv = h @ W[p + "attn.c_attn.weight"] + W[p + "attn.c_attn.bias"]
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(T, H, hs).transpose(1, 0, 2) for i in range(3))
    a = q @ k.transpose(0, 2, 1) / np.sqrt(hs) + mask
    a = np.exp(a - a.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = (a @ v).transpose(1, 0, 2).reshape(T, C)
    x = x + y @ W[p + "attn.c_proj.weight"] + W[p + "attn.c_proj.bias"]
    h = ln(x, W[p + "ln_2.weight"], W[p + "ln_2.bias"])
    x = x + gelu(h @ W[p + "mlp.c_fc.weight"] + W[p + "mlp.c_fc.bias"]) @ W[p + "mlp.c_proj.weight"] + W[p + "mlp.c_proj.bias"]
x = ln(x, W["transformer.ln_f.weight"], W["transformer.ln_f.bias"])
e = x.mean(0) if pooling == "mean" else x[-1]
print(json.dumps((e / np.linalg.norm(e)).tolist()))
