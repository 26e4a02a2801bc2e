#!/usr/bin/env python3
"""Write a random-weight Llama model as a Hugging Face directory (config.json,
tokenizer.json, tokenizer_config.json, model.safetensors in bf16) with the shapes of a
real model, for benchmarks on machines the real weights cannot be copied to (the GPU
check: model files do not travel there). Outputs are meaningless; speed is not.

  python3 kernels/tools/make_random_model.py --shape eurollm-1.7b --out DIR
Shapes: smollm2-135m, eurollm-1.7b, tiny (for tests). Needs numpy.
Prints one JSON line: `weight_bytes` (the whole file's tensors), `decode_weight_bytes`
(what one decode step reads of them: an untied embedding table only a row a token) and
`kv_bytes_per_context_token` (K and V of every layer, bf16), for the bandwidth limit.
"""
import argparse
import json
import os
import struct

import numpy as np

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, context, tied
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, 8192, True),
    "eurollm-1.7b": (2048, 5632, 24, 16, 8, 128000, 4096, False),
    "tiny": (128, 256, 2, 4, 2, 1000, 512, False),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_alphabet():
    """GPT-2's byte-to-unicode table: every byte as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tokenizer(vocab):
    """Byte-level BPE over the 256 byte symbols (no merges), filler tokens up to the
    model's vocabulary (never produced by encoding; they decode to their own text) and
    three special tokens at the end."""
    symbols = byte_alphabet()
    specials = ["<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]
    fill = vocab - len(symbols) - len(specials)
    assert fill >= 0, "vocabulary too small"
    names = symbols + [f"tok{i}" for i in range(fill)]
    base = len(names)
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": base + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, s in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {n: i for i, n in enumerate(names)}, "merges": []},
    }
    cfg = {"bos_token": specials[0], "eos_token": specials[2], "chat_template": CHAT_TEMPLATE,
           "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    return tok, cfg, base, base + 2


def bf16_bytes(a):
    """float32 array -> bf16 bytes (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


def write(out, shape, seed):
    hidden, inter, layers, heads, kv, vocab, ctx, tied = SHAPES[shape]
    hd = hidden // heads
    os.makedirs(out, exist_ok=True)
    tok, tok_cfg, bos, eos = tokenizer(vocab)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": ctx,
        "hidden_act": "silu", "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
        "bos_token_id": bos, "eos_token_id": eos,
    }
    for name, obj in [("config.json", config), ("tokenizer.json", tok), ("tokenizer_config.json", tok_cfg)]:
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(obj, f)
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (heads * hd, hidden)), (p + "self_attn.k_proj.weight", (kv * hd, hidden)),
                   (p + "self_attn.v_proj.weight", (kv * hd, hidden)), (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes.append(("model.norm.weight", (hidden,)))
    if not tied:
        shapes.append(("lm_head.weight", (vocab, hidden)))
    header, offset = {}, 0
    for name, shp in shapes:
        n = int(np.prod(shp)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    # Matrices are windows, at random offsets, into one pool of 2^22 normal samples per
    # scale (generating 1.7e9 independent samples took minutes; the speed of the model
    # does not depend on the values).
    rng = np.random.default_rng(seed)
    pool_n = 1 << 22
    normal = rng.standard_normal(pool_n, dtype=np.float32)
    pools = {}
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, shp in shapes:
            n = int(np.prod(shp))
            if len(shp) == 1:
                f.write(bf16_bytes(np.ones(shp, dtype=np.float32)))
                continue
            fan_in = shp[1]
            if fan_in not in pools:
                pools[fan_in] = bf16_bytes(normal * (1.0 / np.sqrt(fan_in))) * 2
            pool = memoryview(pools[fan_in])
            while n > 0:
                take = min(n, pool_n)
                start = int(rng.integers(0, pool_n)) * 2
                f.write(pool[start:start + take * 2])
                n -= take
    # What one decode step reads: every tensor except an untied embedding table, of which
    # it reads one row a token (a tied table is the output projection too, read whole);
    # and, per token of context, each layer's K and V rows.
    embed = vocab * hidden * 2
    decode_bytes = offset - embed + hidden * 2 if not tied else offset
    kv_bytes_per_context_token = layers * 2 * kv * hd * 2
    return offset, decode_bytes, kv_bytes_per_context_token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    n, decode_bytes, kv_bytes = write(a.out, a.shape, a.seed)
    print(json.dumps({"shape": a.shape, "dir": a.out, "weight_bytes": n,
                      "decode_weight_bytes": decode_bytes, "kv_bytes_per_context_token": kv_bytes}))


main()
