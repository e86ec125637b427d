// bench_tiktoken.js — encoding throughput of the npm `tiktoken` package
// (gpt2 encoding, WASM) on a UTF-8 file: best of REPEAT runs of
// encode_ordinary over the whole text, reading and decoding excluded.
//   node bench_tiktoken.js FILE [REPEAT]
// prints: "tiktoken MB/s <x> tokens <n>"
'use strict';
const fs = require('fs');
const { get_encoding } = require('tiktoken');
const file = process.argv[2], repeat = +(process.argv[3] || 3);
const buf = fs.readFileSync(file);
const text = buf.toString('utf-8');
const enc = get_encoding('gpt2');
let best = Infinity, n = 0;
for (let r = 0; r < repeat; r++) {
  const t0 = process.hrtime.bigint();
  n = enc.encode_ordinary(text).length;
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (s < best) best = s;
}
enc.free();
console.log(`tiktoken MB/s ${(buf.length / 1e6 / best).toFixed(3)} tokens ${n}`);
