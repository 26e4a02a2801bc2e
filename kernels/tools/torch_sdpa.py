#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on the shapes kernels/src/bin/gpu-check.rs
measures (dense, contiguous K/V, GQA via enable_gqa), for a side-by-side comparison.
Prints one JSON object."""
import json
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    print(json.dumps({"error": f"no torch: {e}"}))
    sys.exit(0)


def time_ms(fn, reps):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    if not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA device"}))
        return
    dev = torch.device("cuda:0")
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "decode": [], "prefill": []}
    n_kv, group, hd = 8, 2, 128
    for ctx in [4096, 8192, 16384, 32768]:
        per_seq = ctx * n_kv * hd * 2 * 2
        batch = max(1, min(256, (2 << 30) // per_seq))
        q = torch.randn(batch, n_kv * group, 1, hd, device=dev, dtype=torch.bfloat16)
        k = torch.randn(batch, n_kv, ctx, hd, device=dev, dtype=torch.bfloat16)
        v = torch.randn(batch, n_kv, ctx, hd, device=dev, dtype=torch.bfloat16)
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 20)
        out["decode"].append({"context": ctx, "batch": batch, "ms": ms, "gb_per_s": batch * per_seq / (ms / 1e3) / 1e9})
        del q, k, v
    nh, n_kv, hd = 32, 8, 128
    for seqs, n in [(4, 2048), (2, 8192)]:
        q = torch.randn(seqs, nh, n, hd, device=dev, dtype=torch.bfloat16)
        k = torch.randn(seqs, n_kv, n, hd, device=dev, dtype=torch.bfloat16)
        v = torch.randn(seqs, n_kv, n, hd, device=dev, dtype=torch.bfloat16)
        ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 10)
        flops = 4.0 * (n * (n + 1) / 2) * hd * nh * seqs
        out["prefill"].append({"seqs": seqs, "tokens": n, "ms": ms, "tflops": flops / (ms / 1e3) / 1e12})
        del q, k, v
    print(json.dumps(out))


main()
