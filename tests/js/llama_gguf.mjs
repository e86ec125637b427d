// llama_gguf.mjs — runs a GGUF file through llama.cpp (node-llama-cpp's
// prebuilt CPU binaries) for tests/t_gguf_llamacpp.sh: loads the model,
// tokenizes each prompt (no special tokens, no BOS) and decodes greedily
// from it (BOS first when the file says tokenizer.ggml.add_bos_token, as
// llama.cpp's own tokenize with add_special does: node-llama-cpp's
// tokens.bos is null for a BOS that is not a control token, e.g. an
// ordinary byte, so the id comes from the file's metadata then),
// with 1 thread and an F32 KV cache. Prints one JSON object:
//   {"ok": true, "prompts": [{"ids": [...], "gen": [...]}, ...]}
// or {"ok": false, "error": "..."} (and exit 1). A malformed file can abort
// llama.cpp itself, which is why the test runs this as a subprocess.
//
//   node llama_gguf.mjs MODEL.gguf N_GEN PROMPT_FILE
// PROMPT_FILE: one JSON array of prompt strings.
import { getLlama, LlamaLogLevel } from "node-llama-cpp";
import { readFileSync } from "node:fs";

const [modelPath, nGenArg, promptFile] = process.argv.slice(2);
const nGen = Number(nGenArg);
const prompts = JSON.parse(readFileSync(promptFile, "utf8"));

async function main() {
  const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
  const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
  const g = model.fileInfo.metadata.tokenizer?.ggml ?? {};
  const bos = model.tokens.shouldPrependBosToken ? model.tokens.bos
    : (g.add_bos_token === true && Number.isInteger(g.bos_token_id) ? g.bos_token_id : null);
  const out = [];
  for (const text of prompts) {
    const ids = Array.from(model.tokenize(text, false));
    const context = await model.createContext({
      contextSize: 128,
      batchSize: 128,
      threads: 1,
      sequences: 1,
      experimentalKvCacheKeyType: "F32",
      experimentalKvCacheValueType: "F32",
    });
    const seq = context.getSequence();
    const input = bos != null ? [bos, ...ids] : ids.slice();
    if (input.length === 0) input.push(model.tokens.eos);
    const gen = [];
    if (nGen > 0) {
      for await (const t of seq.evaluate(input, { temperature: 0 })) {
        gen.push(Number(t));
        if (gen.length >= nGen) break;
      }
    }
    out.push({ ids: ids.map(Number), input: input.map(Number), gen });
    await context.dispose();
  }
  await model.dispose();
  process.stdout.write(JSON.stringify({ ok: true, prompts: out }) + "\n");
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.message || e) }) + "\n");
  process.exit(1);
});
