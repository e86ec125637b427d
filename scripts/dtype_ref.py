#!/usr/bin/env python3
"""dtype_ref.py DIR — an independent reference for tests/test_dtype.c.

Reads what the test wrote into DIR and checks it with numpy (and PyTorch's
bfloat16 when torch is installed), printing one "ok ..." line per passed
comparison and a line naming the first difference otherwise; exits 1 on
any difference.

The GGUF block layouts are transcribed here from the format's description
(ggml's block structs: field order, sizes, the nibble and scale packing),
vectorised over blocks with numpy, independently of kiln's C code:

  Q8_0  34 bytes / 32: f16 d, int8 q[32];            x = d * q
  Q4_0  18 bytes / 32: f16 d, u8 qs[16];             x[j] = d * (lo(qs[j]) - 8),
                                                     x[j+16] = d * (hi(qs[j]) - 8)
  Q4_K 144 bytes / 256: f16 d, f16 dmin, u8 scales[12], u8 qs[128];
        eight 6-bit (sc, m) pairs; sub-block 2c = low nibbles of qs[32c:32c+32],
        2c+1 = their high nibbles;                   x = (d*sc) * q - dmin*m
  Q6_K 210 bytes / 256: u8 ql[128], u8 qh[64], i8 scales[16], f16 d;
        per 128-element half: 6-bit q of element 32k + l from ql (k = 0, 2: low /
        high nibble of ql[l]; k = 1, 3: of ql[32 + l]) and bits 2k..2k+1 of qh[l];
                                                     x = (d*sc) * (q - 32)

Products are evaluated in float32 in the order written above (the order of
ggml's dequantize_row_* functions), so the values must agree bit for bit.
"""
import os
import sys

import numpy as np

D = sys.argv[1]
fails = 0


def load(name, dtype):
    return np.fromfile(os.path.join(D, name), dtype=dtype)


def same(name, got, want):
    global fails
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape == want.shape and np.array_equal(got.view(np.uint8), want.view(np.uint8)):
        print(f"ok {name} ({got.size} values)")
        return
    fails += 1
    if got.shape != want.shape:
        print(f"FAIL {name}: shape {got.shape} vs {want.shape}")
        return
    diff = (got.view(np.uint8).reshape(got.size, -1) !=
            want.view(np.uint8).reshape(want.size, -1)).any(axis=1)
    i = int(np.flatnonzero(diff)[0])
    print(f"FAIL {name}: {int(diff.sum())} differ; first at {i}: kiln {got.flat[i]!r} "
          f"reference {want.flat[i]!r}")


def f16(b, off):
    """The f16 at byte offset off of each block row, as float32."""
    return np.ascontiguousarray(b[:, off:off + 2]).view("<f2").astype(np.float32)[:, 0]


# ---- float types ----------------------------------------------------------
x = load("f32.bin", "<u4")
xf = x.view("<f4")
nan = np.isnan(xf)
with np.errstate(over="ignore"):
    h = xf.astype(np.float16).view("<u2")
kh = load("f16.bin", "<u2")
same("f16 rounding vs numpy (non-NaN)", kh[~nan], h[~nan])
kn = kh[nan]
if not (((kn & 0x7c00) == 0x7c00) & ((kn & 0x3ff) != 0)).all():
    fails += 1
    print("FAIL f16: a NaN became a number")
else:
    print(f"ok f16 NaN stays NaN ({kn.size} values)")
kb = load("bf16.bin", "<u2")
# bf16 widened is the top half of an f32: compare as numbers with numpy
wide = (kb.astype(np.uint32) << 16).view("<f4")
bn = np.isnan(wide)
if not (bn == nan).all():
    fails += 1
    print("FAIL bf16: NaN-ness differs from the input's")
else:
    print(f"ok bf16 NaN stays NaN, numbers stay numbers ({x.size} values)")
try:
    import torch
    t = torch.from_numpy(xf.copy()).to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
    same("bf16 rounding vs torch (non-NaN)", kb[~nan], t[~nan])
except ImportError:
    # numpy has no bfloat16: round to nearest even on the integer bits in
    # 64-bit arithmetic, as the IEEE rule reads
    u = x.astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    same("bf16 rounding vs numpy integer rule (non-NaN)", kb[~nan], r[~nan])

# ---- quantized types: dequantization -------------------------------------


def deq_q8_0(b):
    d = f16(b, 0)
    q = b[:, 2:34].view(np.int8).astype(np.float32)
    return (d[:, None] * q).reshape(-1)


def deq_q4_0(b):
    d = f16(b, 0)
    qs = b[:, 2:18]
    lo = (qs & 0x0F).astype(np.float32) - np.float32(8)
    hi = (qs >> 4).astype(np.float32) - np.float32(8)
    q = np.concatenate([lo, hi], axis=1)
    return (q * d[:, None]).reshape(-1)


def k4_scales(s):
    """(sc, m) for sub-blocks 0..7 from the 12 scale bytes of each block."""
    s = s.astype(np.int32)
    sc = np.empty((s.shape[0], 8), np.int32)
    m = np.empty((s.shape[0], 8), np.int32)
    sc[:, 0:4] = s[:, 0:4] & 63
    m[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, m


def deq_q4_k(b):
    d = f16(b, 0)
    dmin = f16(b, 2)
    sc, m = k4_scales(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 32)
    q = np.empty((b.shape[0], 8, 32), np.float32)
    q[:, 0::2, :] = qs & 0x0F
    q[:, 1::2, :] = qs >> 4
    dl = d[:, None] * sc.astype(np.float32)
    ml = dmin[:, None] * m.astype(np.float32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(-1)


def deq_q6_k(b):
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 64).astype(np.int32)
    qh = b[:, 128:192].reshape(n, 2, 32).astype(np.int32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = f16(b, 208)
    q = np.empty((n, 2, 4, 32), np.int32)
    q[:, :, 0] = (ql[:, :, 0:32] & 0x0F) | (((qh >> 0) & 3) << 4)
    q[:, :, 1] = (ql[:, :, 32:64] & 0x0F) | (((qh >> 2) & 3) << 4)
    q[:, :, 2] = (ql[:, :, 0:32] >> 4) | (((qh >> 4) & 3) << 4)
    q[:, :, 3] = (ql[:, :, 32:64] >> 4) | (((qh >> 6) & 3) << 4)
    q = (q - 32).reshape(n, 256).astype(np.float32)
    s = np.repeat(sc, 16, axis=1)  # element e has scale e // 16
    return ((d[:, None] * s) * q).reshape(-1)


for name, size, fn in [("q8_0", 34, deq_q8_0), ("q4_0", 18, deq_q4_0),
                       ("q4_K", 144, deq_q4_k), ("q6_K", 210, deq_q6_k)]:
    blocks = load(f"{name}.blocks", np.uint8).reshape(-1, size)
    same(f"{name} dequantization vs numpy transcription", load(f"{name}.values", "<f4"),
         fn(blocks).astype(np.float32))

# ---- Q8_0 and Q4_0 quantizers (ggml's reference rule) --------------------
row = load("row.f32", "<f4").reshape(-1, 32)
amax = np.abs(row).max(axis=1)
d = (amax / np.float32(127)).astype(np.float32)
with np.errstate(divide="ignore"):
    idv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
v = (row * idv[:, None]).astype(np.float64)
q = np.trunc(v + np.copysign(0.5, v)).astype(np.int8)  # roundf: half away from zero
want = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), q.view(np.uint8)],
                      axis=1).reshape(-1)
same("q8_0 quantizer vs numpy", load("row.q8_0", np.uint8), want)

# Q4_0: d = (the element of largest magnitude, first one on ties) / -8;
# q = min(15, trunc(x / d + 8.5)) with float32 arithmetic
idx = np.abs(row).argmax(axis=1)
mx = row[np.arange(row.shape[0]), idx]
d = (mx / np.float32(-8)).astype(np.float32)
with np.errstate(divide="ignore"):
    idv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
v = (row * idv[:, None]).astype(np.float32) + np.float32(8.5)
q = np.minimum(15, np.trunc(v).astype(np.int32)).astype(np.uint8)
qs = q[:, 0:16] | (q[:, 16:32] << 4)
want = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), qs], axis=1).reshape(-1)
same("q4_0 quantizer vs numpy", load("row.q4_0", np.uint8), want)

sys.exit(1 if fails else 0)
