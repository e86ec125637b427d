// gpt2_ref.js — independent reference encoders for kiln's tokenizer tests.
//
//   node gpt2_ref.js tiktoken FILE
//       GPT-2 ids of FILE's bytes from the npm `tiktoken` package (OpenAI's
//       tokenizer compiled to WASM). Valid UTF-8 stretches are encoded with
//       encode_ordinary; each run of bytes that is not valid UTF-8 is one
//       piece, byte-pair encoded here with GPT-2's merge ranks (the
//       classic algorithm of OpenAI's encoder.py) — kiln's documented rule.
//   node gpt2_ref.js tiktoken-json TOKENIZER_JSON FILE
//       ids from tiktoken's core with its ranks taken from a tokenizer.json
//       (rank = id, as in GPT-2's vocabulary) and the ByteLevel pattern.
//   node gpt2_ref.js bpe-json TOKENIZER_JSON FILE
//       ids from this file's own merge-rank BPE (encoder.py's algorithm)
//       with the tokenizer.json's pre-tokenization pattern run by
//       JavaScript's Unicode regex engine (ByteLevel: GPT-2's pattern;
//       Split: its Regex, with the (?i:...) group spelled out, which
//       JavaScript lacks; normalizer NFC: String.prototype.normalize).
//       FILE must be valid UTF-8.
//   node gpt2_ref.js gpt3enc TOKENIZER_JSON FILE
//       ids from gpt-3-encoder's Encoder.js (OpenAI's encoder.py ported,
//       merge-rank BPE) run on the vocabulary and merges of a tokenizer.json,
//       converted to encoder.json + vocab.bpe. FILE must be valid UTF-8.
//
// Prints the ids space-separated on one line.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');

const mode = process.argv[2];
const here = __dirname;
const G3 = path.join(here, 'node_modules', 'gpt-3-encoder');

function out(ids) {
  const chunk = 65536;
  let parts = [];
  for (let i = 0; i < ids.length; i += chunk)
    parts.push(Array.prototype.slice.call(ids, i, i + chunk).join(' '));
  process.stdout.write(parts.join(' ') + '\n');
}

// Byte-level alphabet (GPT-2 bytes_to_unicode).
function bytesToUnicode() {
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) if (!bs.includes(b)) { bs.push(b); cs.push(256 + n); n++; }
  const m = {};
  bs.forEach((b, i) => { m[b] = String.fromCharCode(cs[i]); });
  return m;
}
const B2U = bytesToUnicode();
const U2B = {};
for (const k in B2U) U2B[B2U[k]] = Number(k);

// Length of the valid UTF-8 sequence at i (strict: no overlongs,
// surrogates or code points above U+10FFFF), or 0 when invalid.
function utf8Len(b, i) {
  const c = b[i];
  if (c < 0x80) return 1;
  let n, min;
  if (c >= 0xC2 && c <= 0xDF) { n = 2; min = 0x80; }
  else if (c >= 0xE0 && c <= 0xEF) { n = 3; min = 0x800; }
  else if (c >= 0xF0 && c <= 0xF4) { n = 4; min = 0x10000; }
  else return 0;
  if (i + n > b.length) return 0;
  let cp = c & (n === 2 ? 0x1F : n === 3 ? 0x0F : 0x07);
  for (let k = 1; k < n; k++) {
    if ((b[i + k] & 0xC0) !== 0x80) return 0;
    cp = (cp << 6) | (b[i + k] & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

// Splits bytes into [{valid: bool, bytes}] runs.
function segments(buf) {
  const segs = [];
  let i = 0, start = 0, valid = true;
  while (i < buf.length) {
    const n = utf8Len(buf, i);
    const v = n > 0;
    if (v !== valid && i > start) { segs.push({ valid, bytes: buf.subarray(start, i) }); start = i; }
    valid = v;
    i += v ? n : 1;
  }
  if (i > start) segs.push({ valid, bytes: buf.subarray(start, i) });
  return segs;
}

// Classic GPT-2 BPE (encoder.py) over byte-level symbols.
function bpeRanks(merges) {
  const r = new Map();
  merges.forEach((m, i) => { if (!r.has(m[0] + ' ' + m[1])) r.set(m[0] + ' ' + m[1], i); });
  return r;
}
function bpe(word, ranks) {
  while (word.length > 1) {
    let best = Infinity, bi = -1;
    for (let i = 0; i + 1 < word.length; i++) {
      const r = ranks.get(word[i] + ' ' + word[i + 1]);
      if (r !== undefined && r < best) { best = r; bi = i; }
    }
    if (bi < 0) break;
    const a = word[bi], b = word[bi + 1], nw = [];
    for (let i = 0; i < word.length;) {
      if (i + 1 < word.length && word[i] === a && word[i + 1] === b) { nw.push(a + b); i += 2; }
      else { nw.push(word[i]); i++; }
    }
    word = nw;
  }
  return word;
}

function readGpt2Merges() {
  const lines = fs.readFileSync(path.join(G3, 'vocab.bpe'), 'utf-8').split('\n');
  return lines.slice(1).filter(l => l.length).map(l => l.split(' '));
}

function hfMerges(tj) {
  return tj.model.merges.map(m => Array.isArray(m) ? m : m.split(' '));
}

if (mode === 'tiktoken') {
  const { get_encoding } = require('tiktoken');
  const enc = get_encoding('gpt2');
  const encoder = JSON.parse(fs.readFileSync(path.join(G3, 'encoder.json'), 'utf-8'));
  const ranks = bpeRanks(readGpt2Merges());
  const buf = fs.readFileSync(process.argv[3]);
  const ids = [];
  const dec = new TextDecoder('utf-8', { fatal: true });
  for (const s of segments(buf)) {
    if (s.valid) {
      const r = enc.encode_ordinary(dec.decode(s.bytes));
      for (let i = 0; i < r.length; i++) ids.push(r[i]);
    } else {
      const word = Array.from(s.bytes, b => B2U[b]);
      for (const t of bpe(word, ranks)) ids.push(encoder[t]);
    }
  }
  enc.free();
  out(ids);
} else if (mode === 'tiktoken-json') {
  const { Tiktoken } = require('tiktoken/lite');
  const tj = JSON.parse(fs.readFileSync(process.argv[3], 'utf-8'));
  const special = {};
  for (const a of tj.added_tokens || []) special[a.content] = a.id;
  const lines = [];
  for (const [tok, id] of Object.entries(tj.model.vocab)) {
    if (tok in special) continue;
    const bytes = Buffer.from(Array.from(tok, ch => U2B[ch]));
    lines.push(bytes.toString('base64') + ' ' + id);
  }
  const pat = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
  const enc = new Tiktoken(lines.join('\n'), special, pat);
  const text = fs.readFileSync(process.argv[4], 'utf-8');
  out(enc.encode_ordinary(text));
  enc.free();
} else if (mode === 'bpe-json') {
  const tj = JSON.parse(fs.readFileSync(process.argv[3], 'utf-8'));
  let src = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
  const pre = tj.pre_tokenizer;
  if (pre.type === 'Sequence') src = pre.pretokenizers[0].pattern.Regex;
  src = src.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                    "'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]");
  const re = new RegExp(src, 'gu');
  const ranks = bpeRanks(hfMerges(tj));
  const vocab = tj.model.vocab;
  let text = fs.readFileSync(process.argv[4], 'utf-8');
  // Qwen2's normalizer: JavaScript's own Unicode NFC
  if (tj.normalizer && tj.normalizer.type === 'NFC') text = text.normalize('NFC');
  const enc = new TextEncoder();
  const cache = new Map();
  const ids = [];
  let last = 0;
  for (const m of text.matchAll(re)) {
    if (m.index !== last) throw new Error('pattern left a gap at ' + last);
    last = m.index + m[0].length;
    let r = cache.get(m[0]);
    if (!r) {
      r = bpe(Array.from(enc.encode(m[0]), b => B2U[b]), ranks).map(t => vocab[t]);
      cache.set(m[0], r);
    }
    for (const id of r) ids.push(id);
  }
  out(ids);
} else if (mode === 'gpt3enc') {
  const tj = JSON.parse(fs.readFileSync(process.argv[3], 'utf-8'));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kiln-g3-'));
  try {
    fs.copyFileSync(path.join(G3, 'Encoder.js'), path.join(dir, 'Encoder.js'));
    fs.writeFileSync(path.join(dir, 'encoder.json'), JSON.stringify(tj.model.vocab));
    const merges = hfMerges(tj).map(m => m[0] + ' ' + m[1]);
    fs.writeFileSync(path.join(dir, 'vocab.bpe'), '#version: 0.2\n' + merges.join('\n') + '\n');
    const { encode } = require(path.join(dir, 'Encoder.js'));
    const text = fs.readFileSync(process.argv[4], 'utf-8');
    out(encode(text));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
} else {
  process.stderr.write('usage: node gpt2_ref.js tiktoken FILE | tiktoken-json TOKENIZER_JSON FILE | gpt3enc TOKENIZER_JSON FILE\n');
  process.exit(2);
}
