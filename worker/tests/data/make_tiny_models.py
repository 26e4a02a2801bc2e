#!/usr/bin/env python3
"""Generate a tiny random-weight Llama in every format the worker loads, plus references.

Usage: make_tiny_models.py OUT_DIR

Writes (deterministically: fixed numpy seed, no timestamps):

  OUT_DIR/hf/        LlamaForCausalLM, untied lm_head, F32, sharded in 2 safetensors files
                     + model.safetensors.index.json, config.json, tokenizer.json,
                     tokenizer_config.json (ChatML-like chat_template, bos/eos).
  OUT_DIR/hf_tied/   Same model with tie_word_embeddings (no lm_head), every tensor BF16,
                     single model.safetensors.
  OUT_DIR/tiny-{f32,f16,q8_0,q4_0,q4_1}.gguf
                     llama.cpp layout: q/k rows permuted as convert_hf_to_gguf.py does,
                     2-D weights in the file type, norm vectors F32, gpt2 tokenizer metadata.
                     (K-quants are written only if gguf-py can quantize them; 0.19 cannot.)
  OUT_DIR/expected.json
                     For a fixed prompt: last-position logits and an 8-token greedy
                     continuation (with top-2 margins) of a float64 numpy Llama forward over
                     each variant's own weights (HF order, rotate_half RoPE; quantized GGUF
                     weights are dequantized with gguf.quants.dequantize and un-permuted).

Needs numpy and the PyPI `gguf` package (pip install numpy gguf).
"""

import json
import os
import struct
import sys

try:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as QT
    from gguf import quants as gq
except ImportError as e:  # the Rust test turns this into a failure message
    sys.exit(f"make_tiny_models.py: {e}; run `pip install numpy gguf`")

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20240607

HIDDEN = 64
INTER = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
THETA = 10000.0
EPS = 1e-5
CTX = 128
N_GEN = 8

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- tokenizer


def make_tokenizer():
    """tests/data/tiny_bytelevel_tokenizer.json (llama3-style byte-level BPE, 270 tokens)
    plus the two ChatML specials, so the chat template's markers are real tokens."""
    with open(os.path.join(HERE, "tiny_bytelevel_tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    next_id = 1 + max(
        max(tok["model"]["vocab"].values()), max(a["id"] for a in tok["added_tokens"])
    )
    for text in ["<|im_start|>", "<|im_end|>"]:
        tok["added_tokens"].append(
            {
                "id": next_id,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
        next_id += 1
    n = next_id
    tokens = [None] * n
    types = [gguf.TokenType.NORMAL] * n
    for text, i in tok["model"]["vocab"].items():
        tokens[i] = text
    for a in tok["added_tokens"]:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
    assert all(t is not None for t in tokens), "tokenizer ids must be dense"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    tok_cfg = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|im_end|>",
        "clean_up_tokenization_spaces": True,
        "model_max_length": CTX,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    return tok, tok_cfg, tokens, [int(t) for t in types], merges, ids


# --------------------------------------------------------------------------- weights


def make_weights(vocab):
    rng = np.random.default_rng(SEED)

    def mat(rows, cols, gain=1.0):
        return (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # Gains chosen so that both the untied and the tied greedy continuations vary and
    # every top-2 margin stays >= 0.1 (far above the float error the test tolerates).
    w = {"model.embed_tokens.weight": (0.5 * rng.standard_normal((vocab, HIDDEN))).astype(np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(HIDDEN)
        w[p + "self_attn.q_proj.weight"] = mat(HEADS * HEAD_DIM, HIDDEN, 2.0)
        w[p + "self_attn.k_proj.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN, 2.0)
        w[p + "self_attn.v_proj.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = mat(HIDDEN, HEADS * HEAD_DIM, 2.0)
        w[p + "post_attention_layernorm.weight"] = norm(HIDDEN)
        w[p + "mlp.gate_proj.weight"] = mat(INTER, HIDDEN)
        w[p + "mlp.up_proj.weight"] = mat(INTER, HIDDEN)
        w[p + "mlp.down_proj.weight"] = mat(HIDDEN, INTER, 2.0)
    w["model.norm.weight"] = norm(HIDDEN)
    w["lm_head.weight"] = mat(vocab, HIDDEN, 3.0)
    return w


def to_bf16_bits(a):
    """Round-to-nearest-even f32 -> bf16, as uint16 bit patterns."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------- reference


def rms_norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def forward(w, ids, tied):
    """float64 Llama forward (HF conventions); logits of every position."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    t = len(ids)
    x = w["model.embed_tokens.weight"][ids]
    inv = THETA ** (-np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM)
    ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=-1)  # [t, hd]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    group = HEADS // KV_HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, HEADS, HEAD_DIM)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, KV_HEADS, HEAD_DIM)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, KV_HEADS, HEAD_DIM)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(HEAD_DIM) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        a = np.einsum("hqk,khd->qhd", s, v).reshape(t, HEADS * HEAD_DIM)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1.0 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    out = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    return x @ out.T


def reference(w, prompt, tied):
    logits = forward(w, prompt, tied)[-1]
    seq = list(prompt)
    greedy, margins = [], []
    step = logits
    for _ in range(N_GEN):
        order = np.argsort(-step, kind="stable")
        greedy.append(int(order[0]))
        margins.append(float(step[order[0]] - step[order[1]]))
        seq.append(int(order[0]))
        step = forward(w, seq, tied)[-1]
    return {
        "logits": [float(v) for v in logits],
        "greedy": greedy,
        "margins": margins,
    }


# --------------------------------------------------------------------------- safetensors


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype string, numpy array of the raw element type)."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, dtype, arr in tensors:
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    return off


def hf_config(vocab, tied, dtype):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": vocab,
        "rms_norm_eps": EPS,
        "rope_theta": THETA,
        "rope_scaling": None,
        "max_position_embeddings": CTX,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "bos_token_id": 267,
        "eos_token_id": 271,
    }


def write_hf_dir(d, tok, tok_cfg, cfg):
    os.makedirs(d, exist_ok=True)
    for name, obj in [("config.json", cfg), ("tokenizer.json", tok), ("tokenizer_config.json", tok_cfg)]:
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)


# --------------------------------------------------------------------------- gguf

HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{HF_TO_GGUF[rest]}"


def permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute(w, n_head):
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(path, w, qtype, tokens, types, merges, ids):
    """Write the (untied) model; returns the weights as the file holds them, mapped back
    to HF names and order (dequantized, un-permuted) for the reference."""
    wr = gguf.GGUFWriter(path, "llama")
    wr.add_name("tiny-llama")
    wr.add_block_count(LAYERS)
    wr.add_context_length(CTX)
    wr.add_embedding_length(HIDDEN)
    wr.add_feed_forward_length(INTER)
    wr.add_head_count(HEADS)
    wr.add_head_count_kv(KV_HEADS)
    wr.add_rope_freq_base(THETA)
    wr.add_layer_norm_rms_eps(EPS)
    wr.add_rope_dimension_count(HEAD_DIM)
    wr.add_vocab_size(len(tokens))
    wr.add_file_type(
        {
            QT.F32: gguf.LlamaFileType.ALL_F32,
            QT.F16: gguf.LlamaFileType.MOSTLY_F16,
            QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
            QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
            QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
            QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
            QT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
            QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
        }[qtype]
    )
    wr.add_quantization_version(gguf.GGML_QUANT_VERSION)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("llama-bpe")  # the llama3 regex of tokenizer.json + ignore_merges
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges(merges)
    wr.add_bos_token_id(ids["<|begin_of_text|>"])
    wr.add_eos_token_id(ids["<|im_end|>"])
    # tokenizer.json's TemplateProcessing prepends BOS; convert_hf_to_gguf records that.
    wr.add_add_bos_token(True)
    wr.add_chat_template(CHAT_TEMPLATE)
    back = {}
    for name, a in w.items():
        g = gguf_name(name)
        if name.endswith("q_proj.weight"):
            a = permute(a, HEADS, HEADS)
        elif name.endswith("k_proj.weight"):
            a = permute(a, HEADS, KV_HEADS)
        if a.ndim == 1 or qtype == QT.F32:
            wr.add_tensor(g, a.astype(np.float32))
            stored = a.astype(np.float32)
        elif qtype == QT.F16:
            wr.add_tensor(g, a.astype(np.float16))
            stored = a.astype(np.float16).astype(np.float32)
        else:
            q = gq.quantize(a, qtype)
            wr.add_tensor(g, q, raw_dtype=qtype)
            stored = gq.dequantize(q, qtype).reshape(a.shape).astype(np.float32)
        if name.endswith("q_proj.weight"):
            stored = unpermute(stored, HEADS)
        elif name.endswith("k_proj.weight"):
            stored = unpermute(stored, KV_HEADS)
        back[name] = stored
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return back


def can_quantize(qtype):
    try:
        gq.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
        return True
    except (NotImplementedError, gq.QuantError):
        return False


# --------------------------------------------------------------------------- main


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    tok, tok_cfg, tokens, types, merges, ids = make_tokenizer()
    vocab = len(tokens)
    w = make_weights(vocab)
    rng = np.random.default_rng(SEED + 1)
    prompt = [ids["<|begin_of_text|>"]] + [int(v) for v in rng.integers(32, 267, 19)]

    variants = {}

    # hf/: untied, F32, two shards in HF's naming.
    d = os.path.join(out, "hf")
    write_hf_dir(d, tok, tok_cfg, hf_config(vocab, False, "float32"))
    names = list(w)
    split = names.index("model.layers.1.input_layernorm.weight")
    shards = [names[:split], names[split:]]
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(d, fname), [(n, "F32", w[n]) for n in part])
        weight_map.update({n: fname for n in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    variants["hf"] = reference(w, prompt, tied=False)

    # hf_tied/: tied embeddings, every tensor BF16, one file.
    d = os.path.join(out, "hf_tied")
    write_hf_dir(d, tok, tok_cfg, hf_config(vocab, True, "bfloat16"))
    bits = {n: to_bf16_bits(a) for n, a in w.items() if n != "lm_head.weight"}
    write_safetensors(os.path.join(d, "model.safetensors"), [(n, "BF16", b) for n, b in bits.items()])
    variants["hf_tied"] = reference({n: from_bf16_bits(b) for n, b in bits.items()}, prompt, tied=True)

    # GGUF files.
    wanted = [("f32", QT.F32), ("f16", QT.F16), ("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0), ("q4_1", QT.Q4_1)]
    wanted += [(n, t) for n, t in [("q4_k", QT.Q4_K), ("q5_k", QT.Q5_K), ("q6_k", QT.Q6_K)]
               if can_quantize(t)]
    for label, qtype in wanted:
        fname = f"tiny-{label}.gguf"
        stored = write_gguf(os.path.join(out, fname), w, qtype, tokens, types, merges, ids)
        variants[fname] = reference(stored, prompt, tied=False)

    expected = {
        "generator": "worker/tests/data/make_tiny_models.py",
        "seed": SEED,
        "config": {
            "n_layers": LAYERS,
            "hidden": HIDDEN,
            "intermediate": INTER,
            "n_heads": HEADS,
            "n_kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "vocab_size": vocab,
            "max_context": CTX,
        },
        "bos": ids["<|begin_of_text|>"],
        "eos": ids["<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
        "prompt": prompt,
        "variants": variants,
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


if __name__ == "__main__":
    main()
