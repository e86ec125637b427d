// serve_openai.js — the official `openai` npm client against kiln serve:
// model list, a completion, a chat completion, a streamed chat completion
// reassembled to the same text as the non-streamed one at temperature 0,
// a streamed completion, usage counts, n = 3 (non-streamed and streamed),
// echo with prompt logprobs, tool calls (tool_choice required, non-streamed
// and streamed; auto answering text), json_schema output parsed and
// checked, batched prompts, embeddings (base64 as the client asks by default, and float),
// and error cases (unknown model -> NotFoundError 404, bad
// parameter -> BadRequestError 400, wrong key -> AuthenticationError 401).
// Usage: node serve_openai.js BASE_URL KEY MODEL
// Prints PASS/FAIL lines.
const OpenAI = require("openai");

const [base, key, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: base, apiKey: key, maxRetries: 0, timeout: 20000 });
let failed = 0;
function check(name, cond, detail) {
  if (cond) console.log(`PASS ${name}`);
  else { failed++; console.log(`FAIL ${name}${detail ? ": " + detail : ""}`); }
}

async function main() {
  const list = await client.models.list();
  const ids = list.data.map((m) => m.id);
  check("openai_models_list", ids.length === 1 && ids[0] === model, JSON.stringify(ids));

  const c = await client.completions.create({ model, prompt: "Once upon", max_tokens: 8, temperature: 0 });
  check("openai_completion", c.object === "text_completion" && typeof c.choices[0].text === "string" &&
        c.usage.prompt_tokens === 9 && c.usage.completion_tokens >= 1 && c.usage.completion_tokens <= 8,
        JSON.stringify(c));

  const msgs = [{ role: "system", content: "You are terse." }, { role: "user", content: "Say something." }];
  const full = await client.chat.completions.create({ model, messages: msgs, max_tokens: 24, temperature: 0 });
  const fullText = full.choices[0].message.content;
  check("openai_chat", full.object === "chat.completion" && full.choices[0].message.role === "assistant" &&
        typeof fullText === "string" && ["stop", "length"].includes(full.choices[0].finish_reason),
        JSON.stringify(full));

  const stream = await client.chat.completions.create({ model, messages: msgs, max_tokens: 24, temperature: 0,
                                                         stream: true, stream_options: { include_usage: true } });
  let text = "", chunks = 0, finish = null, usage = null;
  for await (const ch of stream) {
    chunks++;
    if (ch.choices.length) {
      text += ch.choices[0].delta.content || "";
      if (ch.choices[0].finish_reason) finish = ch.choices[0].finish_reason;
    }
    if (ch.usage) usage = ch.usage;
  }
  check("openai_chat_stream_equals_nonstream", text === fullText, JSON.stringify([text, fullText]));
  check("openai_chat_stream_finish", finish === full.choices[0].finish_reason && chunks >= 2);
  check("openai_chat_stream_usage", usage && usage.completion_tokens === full.usage.completion_tokens &&
        usage.prompt_tokens === full.usage.prompt_tokens, JSON.stringify(usage));

  const cs = await client.completions.create({ model, prompt: "Once upon", max_tokens: 8, temperature: 0, stream: true });
  let ctext = "";
  for await (const ch of cs) ctext += ch.choices.length ? ch.choices[0].text : "";
  check("openai_completion_stream_equals", ctext === c.choices[0].text, JSON.stringify([ctext, c.choices[0].text]));

  // n = 3 with a fixed seed: three distinct choices, usage over all three
  const n3 = await client.completions.create({ model, prompt: "Once upon", max_tokens: 10, temperature: 1,
                                               seed: 11, n: 3, ignore_eos: true });
  const texts = n3.choices.map((x) => x.text);
  check("openai_n3", n3.choices.length === 3 && n3.choices.every((x, i) => x.index === i) &&
        new Set(texts).size === 3 && n3.usage.completion_tokens === 30, JSON.stringify(n3));
  const n3c = await client.chat.completions.create({ model, messages: msgs, max_tokens: 6, temperature: 1,
                                                     seed: 11, n: 3, stream: true });
  const parts = ["", "", ""];
  for await (const ch of n3c) for (const c of ch.choices) parts[c.index] += c.delta.content || "";
  const n3full = await client.chat.completions.create({ model, messages: msgs, max_tokens: 6, temperature: 1,
                                                        seed: 11, n: 3 });
  check("openai_n3_chat_stream", JSON.stringify(parts) === JSON.stringify(n3full.choices.map((x) => x.message.content)),
        JSON.stringify([parts, n3full.choices]));
  // echo: the prompt before the text, prompt tokens scored
  const ec = await client.completions.create({ model, prompt: "Once upon", max_tokens: 4, temperature: 0,
                                               echo: true, logprobs: 1 });
  check("openai_echo", ec.choices[0].text.startsWith("Once upon") &&
        ec.choices[0].logprobs.tokens.length === ec.usage.prompt_tokens + ec.usage.completion_tokens,
        JSON.stringify(ec));

  // tool calls (tool_choice required) and json_schema output; logit_bias
  // favours closing quotes and brackets so the random model ends in time
  const logit_bias = { 34: 6, 44: 2, 93: 6, 125: 6 };
  const tools = [{ type: "function", function: { name: "get_weather", description: "Weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" }, days: { type: "integer" } },
                  required: ["city", "days"] } } }];
  const ask = { model, messages: [{ role: "user", content: "Weather in Oslo?" }], tools, tool_choice: "required",
                max_tokens: 200, seed: 4, logit_bias };
  const tc = await client.chat.completions.create(ask);
  const call = tc.choices[0].message.tool_calls && tc.choices[0].message.tool_calls[0];
  let args = null;
  try { args = JSON.parse(call.function.arguments); } catch (e) { /* checked below */ }
  check("openai_tool_call", tc.choices[0].finish_reason === "tool_calls" && call && call.type === "function" &&
        call.function.name === "get_weather" && args && typeof args.city === "string" &&
        Number.isInteger(args.days) && tc.choices[0].message.content === null, JSON.stringify(tc));
  const tcs = await client.chat.completions.create({ ...ask, stream: true });
  let sname = "", sargs = "", sid = null, sfin = null;
  for await (const ch of tcs) {
    for (const c of ch.choices) {
      for (const d of c.delta.tool_calls || []) {
        if (d.id) sid = d.id;
        if (d.function && d.function.name) sname += d.function.name;
        if (d.function && d.function.arguments) sargs += d.function.arguments;
      }
      if (c.finish_reason) sfin = c.finish_reason;
    }
  }
  check("openai_tool_call_stream", sfin === "tool_calls" && sid && sname === "get_weather" &&
        call && sargs === call.function.arguments, JSON.stringify([sid, sname, sargs, sfin]));
  // tool_choice auto (the default): the random model answers in text
  const auto = await client.chat.completions.create({ model, messages: [{ role: "user", content: "hi" }], tools,
                                                      max_tokens: 8, seed: 1 });
  check("openai_tool_auto_text", typeof auto.choices[0].message.content === "string" &&
        !auto.choices[0].message.tool_calls && ["stop", "length"].includes(auto.choices[0].finish_reason),
        JSON.stringify(auto));
  const schema = { type: "object", properties: { name: { type: "string" }, n: { type: "integer" },
                   ok: { type: "boolean" } }, required: ["name", "n", "ok"], additionalProperties: false };
  const js = await client.chat.completions.create({ model, messages: [{ role: "user", content: "json" }],
    response_format: { type: "json_schema", json_schema: { name: "thing", strict: true, schema } },
    max_tokens: 200, seed: 2, n: 3, logit_bias });
  let valid = 0;
  for (const c of js.choices) {
    if (c.finish_reason !== "stop") continue;
    const v = JSON.parse(c.message.content);
    if (typeof v.name === "string" && Number.isInteger(v.n) && typeof v.ok === "boolean" &&
        Object.keys(v).length === 3) valid++;
  }
  check("openai_json_schema", valid === 3, JSON.stringify(js.choices));

  // batched prompts: one choice per prompt, prompt-major, each the text
  // the prompt gives alone; usage summed
  const bp = await client.completions.create({ model, prompt: ["Once upon", "The end"], max_tokens: 5,
                                               temperature: 0, ignore_eos: true });
  const b2 = await client.completions.create({ model, prompt: "The end", max_tokens: 5, temperature: 0,
                                               ignore_eos: true });
  const b1 = await client.completions.create({ model, prompt: "Once upon", max_tokens: 5, temperature: 0,
                                               ignore_eos: true });
  check("openai_batched_prompts", bp.choices.length === 2 && bp.choices[0].index === 0 &&
        bp.choices[1].index === 1 && bp.choices[0].text === b1.choices[0].text &&
        bp.choices[1].text === b2.choices[0].text && bp.usage.prompt_tokens === 16 &&
        bp.usage.completion_tokens === 10, JSON.stringify([bp, b1.choices, b2.choices]));

  // embeddings: the client asks for base64 by default and decodes it; the
  // same vectors as encoding_format float, unit length, one per input
  const emb = await client.embeddings.create({ model, input: ["Once upon a time", "The end."] });
  const embf = await client.embeddings.create({ model, input: ["Once upon a time", "The end."],
                                                encoding_format: "float" });
  const norm = (v) => Math.sqrt(v.reduce((a, x) => a + x * x, 0));
  const same = emb.data.every((d, i) => d.embedding.length === 64 &&
    d.embedding.every((x, j) => Math.abs(x - embf.data[i].embedding[j]) < 1e-6));
  check("openai_embeddings", emb.data.length === 2 && emb.data.every((d, i) => d.index === i &&
        d.object === "embedding" && Math.abs(norm(d.embedding) - 1) < 1e-5) && same &&
        emb.usage.prompt_tokens === 24 && emb.usage.total_tokens === 24 &&
        norm(emb.data[0].embedding.map((x, j) => x - emb.data[1].embedding[j])) > 1e-3,
        JSON.stringify([emb.usage, emb.data[0].embedding.slice(0, 4), embf.data[0].embedding.slice(0, 4)]));
  try {
    await client.embeddings.create({ model, input: "x", dimensions: 8 });
    check("openai_embeddings_dimensions_400", false, "no error");
  } catch (e) {
    check("openai_embeddings_dimensions_400", e instanceof OpenAI.BadRequestError && e.status === 400 &&
          e.error && e.error.param === "dimensions", `${e.constructor.name} ${e.status}`);
  }

  try {
    await client.chat.completions.create({ model: "no-such-model", messages: msgs });
    check("openai_error_unknown_model", false, "no error");
  } catch (e) {
    check("openai_error_unknown_model", e instanceof OpenAI.NotFoundError && e.status === 404 &&
          e.error && e.error.code === "model_not_found", `${e.constructor.name} ${e.status}`);
  }
  try {
    await client.chat.completions.create({ model, messages: msgs, temperature: -3 });
    check("openai_error_bad_param", false, "no error");
  } catch (e) {
    check("openai_error_bad_param", e instanceof OpenAI.BadRequestError && e.status === 400 &&
          e.error && e.error.param === "temperature", `${e.constructor.name} ${e.status}`);
  }
  try {
    const bad = new OpenAI({ baseURL: base, apiKey: key + "x", maxRetries: 0 });
    await bad.models.list();
    check("openai_error_bad_key", false, "no error");
  } catch (e) {
    check("openai_error_bad_key", e instanceof OpenAI.AuthenticationError && e.status === 401,
          `${e.constructor.name} ${e.status}`);
  }
}

main().then(() => process.exit(failed ? 1 : 0)).catch((e) => {
  console.log(`FAIL openai_client: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
