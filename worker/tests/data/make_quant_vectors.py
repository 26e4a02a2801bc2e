#!/usr/bin/env python3
"""Regenerates quant_vectors.json: reference dequantization vectors for worker/src/quant.rs.

The expected values come from the PyPI `gguf` package (gguf.quants), which mirrors ggml's
reference dequantization in ggml-quants.c. For each supported tensor type we write a few rows:

* "quantized" rows: random normal data quantized by gguf (where gguf can quantize that type);
* "random" rows: random block bytes whose f16 scale fields are replaced by sane small values
  (covers every bit pattern of the packed quants, and is the only option for the K-quants,
  which gguf can dequantize but not quantize);
* a few hand-picked edge blocks (zero scales, negative scales, subnormal scales).

Every row is stored as hex of its raw bytes plus hex of the expected little-endian f32
values, so the Rust test can compare bit for bit. Run from anywhere:

    python3 worker/tests/data/make_quant_vectors.py
"""

from __future__ import annotations

import json
import os

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

SEED = 20240611
ROW_ELEMS = 512  # two K-quant super-blocks, sixteen 32-element blocks

# Byte offsets of the f16 scale fields inside one block, per type.
SCALE_OFFSETS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}

TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


def sane_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """Small f16 scales of both signs, including an exact zero and a subnormal."""
    s = rng.uniform(-0.05, 0.05, size=n).astype(np.float16)
    if n >= 3:
        s[0] = np.float16(0.0)
        s[1] = np.float16(-0.0)
        s[2] = np.float16(3e-7)  # subnormal in f16
    return s


def random_blocks(rng: np.random.Generator, qtype: T, n_elems: int, edge: bool) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = n_elems // block_size
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:
        scales = sane_scales(rng, n_blocks) if edge else rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def row_entry(qtype: T, kind: str, raw: np.ndarray, n_elems: int) -> dict:
    expected = quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
    assert expected.size == n_elems, (qtype.name, expected.size, n_elems)
    return {
        "type": qtype.name,
        "type_id": int(qtype.value),
        "kind": kind,
        "n": n_elems,
        "bytes": raw.astype(np.uint8).tobytes().hex(),
        "expected": expected.astype("<f4").tobytes().hex(),
    }


def main() -> None:
    rng = np.random.default_rng(SEED)
    rows = []
    for qtype in TYPES:
        # Quantized rows: gguf's own quantizer where it has one.
        for scale in (1.0, 0.02):
            data = (rng.standard_normal(ROW_ELEMS) * scale).astype(np.float32)
            try:
                raw = quants.quantize(data, qtype)
            except NotImplementedError:
                break
            rows.append(row_entry(qtype, f"quantized(scale={scale})", raw.view(np.uint8).reshape(-1), ROW_ELEMS))
        # Random block bytes with sane scales (all bit patterns of the quant payload).
        if qtype in SCALE_OFFSETS:
            rows.append(row_entry(qtype, "random", random_blocks(rng, qtype, ROW_ELEMS, edge=False), ROW_ELEMS))
            rows.append(row_entry(qtype, "random+edge-scales", random_blocks(rng, qtype, ROW_ELEMS, edge=True), ROW_ELEMS))
    out = {
        "generator": "worker/tests/data/make_quant_vectors.py",
        "seed": SEED,
        "rows": rows,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_vectors.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {len(rows)} rows to {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
