// bpe_train_ref.js — a naive byte-level BPE trainer used to check kiln's
// incremental one: pre-tokens by the GPT-2 pattern (JavaScript's Unicode
// regex), then every merge recounts all adjacent pairs from scratch. Ties
// go to the smallest (left id, right id); ids 0..255 are the bytes; a merge
// whose bytes already name a token reuses its id; stops below min_freq.
//
//   node bpe_train_ref.js FILE N_MERGES MIN_FREQ
// prints one merge per line as "left_id right_id".
'use strict';
const fs = require('fs');
const [file, nMerges, minFreq] = [process.argv[2], +process.argv[3], +process.argv[4]];
const pat = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;
const text = fs.readFileSync(file, 'utf-8');
const counts = new Map();
for (const m of text.matchAll(pat)) counts.set(m[0], (counts.get(m[0]) || 0) + 1);
const enc = new TextEncoder();
const words = [];
for (const [w, c] of counts) words.push({ s: Array.from(enc.encode(w)), c });
const tokBytes = [];
for (let b = 0; b < 256; b++) tokBytes.push(String.fromCharCode(b));
const byBytes = new Map(tokBytes.map((t, i) => [t, i]));
const out = [];
for (let m = 0; m < nMerges; m++) {
  const pc = new Map();
  for (const w of words)
    for (let i = 0; i + 1 < w.s.length; i++) {
      const k = w.s[i] * 16777216 + w.s[i + 1];
      pc.set(k, (pc.get(k) || 0) + w.c);
    }
  let best = -1, bc = 0;
  for (const [k, c] of pc) if (c > bc || (c === bc && k < best)) { best = k; bc = c; }
  if (best < 0 || bc < minFreq) break;
  const a = Math.floor(best / 16777216), b = best % 16777216;
  const bytes = tokBytes[a] + tokBytes[b];
  let id = byBytes.get(bytes);
  if (id === undefined) { id = tokBytes.length; tokBytes.push(bytes); byBytes.set(bytes, id); }
  out.push(a + ' ' + b);
  for (const w of words) {
    const s = [];
    for (let i = 0; i < w.s.length;) {
      if (i + 1 < w.s.length && w.s[i] === a && w.s[i + 1] === b) { s.push(id); i += 2; }
      else { s.push(w.s[i]); i++; }
    }
    w.s = s;
  }
}
process.stdout.write(out.join('\n') + '\n');
