use proptest::prelude::*;

use super::*;
use crate::cpu;

use crate::test_util::rand_vec;

fn close(a: f32, b: f32, rel: f32, abs: f32) -> bool {
    (a - b).abs() <= rel * b.abs() + abs
}

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(to_bf16(1.0), 0x3f80);
    assert_eq!(from_bf16(0x3f80), 1.0);
    // Exactly halfway between 1.0 and the next bf16 (1 + 2^-7): ties to even (1.0).
    assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
    // Halfway above an odd mantissa rounds up to even.
    assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
    // Just above halfway rounds up.
    assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(to_bf16(-2.5), 0xc020);
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    // Values too large for bf16 overflow to infinity, as on the GPU.
    assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
}

/// Dense decode attention in f64 over the (bf16-rounded) inputs: the definition.
fn dense_decode(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f64> {
    let s: Vec<f64> = keys
        .iter()
        .map(|k| {
            q.iter()
                .zip(k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale as f64
        })
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    (0..q.len())
        .map(|d| e.iter().zip(values).map(|(w, v)| w / z * v[d] as f64).sum())
        .collect()
}

struct Case {
    shape: DecodeShape,
    q: Vec<u16>,
    kc: Vec<u16>,
    vc: Vec<u16>,
    tables: Vec<u32>,
    lens: Vec<usize>,
}

fn decode_case(lens: &[usize], n_kv: usize, group: usize, hd: usize, seed: u64) -> Case {
    let bs = 16;
    let max_blocks = lens.iter().map(|l| l.div_ceil(bs)).max().unwrap_or(1);
    let num_blocks = max_blocks * lens.len() + 2;
    let layout = KvLayout {
        num_blocks,
        block_size: bs,
        n_kv_heads: n_kv,
        head_dim: hd,
    };
    // Sequence i uses physical blocks in a scrambled order.
    let mut tables = vec![0u32; lens.len() * max_blocks];
    for (i, _) in lens.iter().enumerate() {
        for b in 0..max_blocks {
            tables[i * max_blocks + b] = (num_blocks - 1 - (i * max_blocks + b)) as u32;
        }
    }
    let n_heads = n_kv * group;
    Case {
        shape: DecodeShape {
            layout,
            n_heads,
            max_blocks,
            scale: 1.0 / (hd as f32).sqrt(),
            num_splits: 1,
        },
        q: to_bf16_vec(&rand_vec(lens.len() * n_heads * hd, seed)),
        kc: to_bf16_vec(&rand_vec(layout.elements(), seed ^ 1)),
        vc: to_bf16_vec(&rand_vec(layout.elements(), seed ^ 2)),
        tables,
        lens: lens.to_vec(),
    }
}

fn check_against_dense(c: &Case, out: &[u16]) -> Result<(), String> {
    let l = &c.shape.layout;
    let hd = l.head_dim;
    let group = c.shape.n_heads / l.n_kv_heads;
    for (seq, &len) in c.lens.iter().enumerate() {
        let table = &c.tables[seq * c.shape.max_blocks..(seq + 1) * c.shape.max_blocks];
        for h in 0..c.shape.n_heads {
            let kvh = h / group;
            let row = |cache: &[u16], p: usize| {
                let off = l.offset(l.slot(table, p), kvh);
                from_bf16_vec(&cache[off..off + hd])
            };
            let keys: Vec<Vec<f32>> = (0..len).map(|p| row(&c.kc, p)).collect();
            let values: Vec<Vec<f32>> = (0..len).map(|p| row(&c.vc, p)).collect();
            let q = from_bf16_vec(&c.q[(seq * c.shape.n_heads + h) * hd..][..hd]);
            let want = dense_decode(&q, &keys, &values, c.shape.scale);
            for d in 0..hd {
                let got = from_bf16(out[(seq * c.shape.n_heads + h) * hd + d]);
                if !close(got, want[d] as f32, 1.0 / 128.0, 2e-3) {
                    return Err(format!("seq {seq} head {h} dim {d}: {got} vs {}", want[d]));
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// The kernel's algorithm (chunks, online softmax, split-KV + merge) equals dense
    /// attention within bf16 rounding, for every split count, including empty splits.
    #[test]
    fn decode_attention_equals_dense(
        lens in prop::collection::vec(1usize..700, 1..4),
        n_kv in 1usize..3,
        group in prop::sample::select(vec![1usize, 2, 3, 4, 8]),
        hd in prop::sample::select(vec![64usize, 96, 128]),
        splits in 1usize..5,
        seed in any::<u64>(),
    ) {
        let mut c = decode_case(&lens, n_kv, group, hd, seed);
        c.shape.num_splits = splits;
        let out = decode_attention(&c.shape, &c.q, &c.kc, &c.vc, &c.tables, &c.lens);
        check_against_dense(&c, &out).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn decode_attention_long_context_many_chunks() {
    // 2 sequences of 1000+ tokens: 4-5 chunks each, with 1 and 3 splits.
    let mut c = decode_case(&[1033, 777], 2, 4, 128, 7);
    for splits in [1, 3] {
        c.shape.num_splits = splits;
        let out = decode_attention(&c.shape, &c.q, &c.kc, &c.vc, &c.tables, &c.lens);
        check_against_dense(&c, &out).unwrap();
    }
}

#[test]
fn decode_attention_agrees_with_the_f32_paged_kernel() {
    // The f32 CPU kernel on the same (bf16-valued) inputs: same math, different order.
    let c = decode_case(&[40, 17], 3, 3, 64, 11);
    let out = decode_attention(&c.shape, &c.q, &c.kc, &c.vc, &c.tables, &c.lens);
    let l = c.shape.layout;
    let attn = cpu::PagedAttention {
        layout: l,
        n_heads: c.shape.n_heads,
        scale: c.shape.scale,
    };
    let (kc, vc) = (from_bf16_vec(&c.kc), from_bf16_vec(&c.vc));
    let hd = l.head_dim;
    for (seq, &len) in c.lens.iter().enumerate() {
        let table = &c.tables[seq * c.shape.max_blocks..(seq + 1) * c.shape.max_blocks];
        for h in 0..c.shape.n_heads {
            let base = (seq * c.shape.n_heads + h) * hd;
            let q = from_bf16_vec(&c.q[base..base + hd]);
            let mut want = vec![0.0; hd];
            attn.head(&q, h, len - 1, table, &kc, &vc, &mut Vec::new(), &mut want);
            for d in 0..hd {
                // Within one bf16 step (the two sum in different orders).
                let (a, b) = (out[base + d] as i32, to_bf16(want[d]) as i32);
                assert!(
                    (a - b).abs() <= 1,
                    "seq {seq} head {h} dim {d}: {a:#x} vs {b:#x}"
                );
            }
        }
    }
}

#[test]
fn norms_match_the_f32_kernels() {
    let dim = 64;
    let x = to_bf16_vec(&rand_vec(3 * dim, 1));
    let w = to_bf16_vec(&rand_vec(dim, 2));
    let got = rms_norm(&x, &w, dim, 1e-5);
    let (xf, wf) = (from_bf16_vec(&x), from_bf16_vec(&w));
    for r in 0..3 {
        let mut want = vec![0.0; dim];
        cpu::rms_norm(&xf[r * dim..(r + 1) * dim], &wf, 1e-5, &mut want);
        for d in 0..dim {
            let g = from_bf16(got[r * dim + d]);
            assert!(close(g, want[d], 1.0 / 128.0, 1e-6), "{g} vs {}", want[d]);
        }
    }
    let mut residual = rand_vec(3 * dim, 3);
    let mut residual_f32 = residual.clone();
    let got = add_rms_norm(&mut residual, &x, &w, dim, 1e-5);
    for r in 0..3 {
        let mut want = vec![0.0; dim];
        cpu::add_rms_norm(
            &mut residual_f32[r * dim..(r + 1) * dim],
            &xf[r * dim..(r + 1) * dim],
            &wf,
            1e-5,
            &mut want,
        );
        for d in 0..dim {
            assert_eq!(residual[r * dim + d], residual_f32[r * dim + d]);
            let g = from_bf16(got[r * dim + d]);
            assert!(close(g, want[d], 1.0 / 128.0, 1e-6), "{g} vs {}", want[d]);
        }
    }
}

#[test]
fn silu_and_mul_matches_the_f32_kernel() {
    let inter = 24;
    let gu = to_bf16_vec(
        &rand_vec(2 * 2 * inter, 5)
            .iter()
            .map(|v| v * 6.0)
            .collect::<Vec<_>>(),
    );
    let got = silu_and_mul(&gu, inter);
    let f = from_bf16_vec(&gu);
    for r in 0..2 {
        let row = &f[r * 2 * inter..(r + 1) * 2 * inter];
        let mut want = vec![0.0; inter];
        cpu::silu_and_mul(&row[..inter], &row[inter..], &mut want);
        for i in 0..inter {
            assert_eq!(got[r * inter + i], to_bf16(want[i]));
        }
    }
}

#[test]
fn gemv_matches_a_dense_f64_product() {
    let (rows, k, t) = (13, 40, 3);
    let w = to_bf16_vec(&rand_vec(rows * k, 11));
    let x = to_bf16_vec(&rand_vec(t * k, 12));
    let got = gemv(&w, &x, rows, k);
    assert_eq!(got.len(), t * rows);
    let (wf, xf) = (from_bf16_vec(&w), from_bf16_vec(&x));
    for ti in 0..t {
        for r in 0..rows {
            let want: f64 = (0..k)
                .map(|c| f64::from(wf[r * k + c]) * f64::from(xf[ti * k + c]))
                .sum();
            let g = from_bf16(got[ti * rows + r]);
            assert!(
                close(g, want as f32, 1.0 / 128.0, 1e-5),
                "row {r} token {ti}: {g} vs {want}"
            );
        }
    }
}

#[test]
fn gemv_norm_late_is_the_normalised_product_in_f64() {
    let (rows, k, t, eps) = (9, 64, 2, 1e-5f32);
    let w = to_bf16_vec(&rand_vec(rows * k, 21));
    let res: Vec<f32> = rand_vec(t * k, 22).iter().map(|v| v * 3.0).collect();
    let nw = to_bf16_vec(&rand_vec(k, 23));
    let got = gemv_norm_late_f32(&w, &res, &nw, rows, k, eps);
    assert_eq!(got.len(), t * rows);
    let (wf, nf) = (from_bf16_vec(&w), from_bf16_vec(&nw));
    // The rounded path (`gemv_norm`: normalised input stored as bf16) agrees within bf16
    // tolerance.
    let rounded = gemv_f32(&w, &rms_norm_f32(&res, &nw, k, eps), rows, k);
    for ti in 0..t {
        let r = &res[ti * k..(ti + 1) * k];
        let ss: f64 = r.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
        let inv = 1.0 / (ss / k as f64 + f64::from(eps)).sqrt();
        for row in 0..rows {
            let want: f64 = (0..k)
                .map(|c| f64::from(wf[row * k + c]) * f64::from(r[c]) * f64::from(nf[c]))
                .sum::<f64>()
                * inv;
            let g = got[ti * rows + row];
            assert!(
                close(g, want as f32, 1e-4, 1e-5),
                "row {row} token {ti}: {g} vs {want}"
            );
            let q = rounded[ti * rows + row];
            assert!(close(q, g, 1.0 / 64.0, 2e-2), "rounded {q} vs late {g}");
        }
    }
}

#[test]
fn half_rope_equals_interleaved_rope_on_permuted_dimensions() {
    for (hd, rot) in [(16, 16), (16, 12), (64, 64)] {
        let order = half_to_interleaved_order(hd, rot);
        let mut seen = order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..hd).collect::<Vec<_>>(), "a permutation");
        let inv = cpu::RopeTable::inv_freq(10000.0, rot);
        let half = cpu::RopeTable::new(cpu::RopeStyle::Half, &inv, 32);
        let inter = cpu::RopeTable::new(cpu::RopeStyle::Interleaved, &inv, 32);
        let x = rand_vec(hd, 31);
        for pos in [0, 5, 31] {
            let mut a = x.clone();
            half.rotate(&mut a, pos);
            let mut b: Vec<f32> = order.iter().map(|&o| x[o]).collect();
            inter.rotate(&mut b, pos);
            for j in 0..hd {
                assert!(
                    (b[j] - a[order[j]]).abs() < 1e-6,
                    "hd {hd} rot {rot} pos {pos} dim {j}"
                );
            }
        }
    }
    // Rows: q and k heads permuted, v heads kept.
    let (cols, nh, nkv, hd) = (3, 2, 1, 4);
    let w: Vec<u16> = (0..(nh + 2 * nkv) * hd * cols).map(|i| i as u16).collect();
    let p = interleave_qk_rows(&w, cols, nh, nkv, hd, hd);
    let row = |m: &[u16], r: usize| m[r * cols..(r + 1) * cols].to_vec();
    // Head 0: new rows 0, 1, 2, 3 are old rows 0, 2, 1, 3; v (head 3) unchanged.
    assert_eq!(row(&p, 1), row(&w, 2));
    assert_eq!(row(&p, 2), row(&w, 1));
    assert_eq!(row(&p, 4 * 2 + 1), row(&w, 4 * 2 + 2));
    assert_eq!(&p[3 * hd * cols..], &w[3 * hd * cols..]);
}

#[test]
fn rope_write_kv_matches_the_f32_kernel() {
    for style in [cpu::RopeStyle::Interleaved, cpu::RopeStyle::Half] {
        let (n_heads, n_kv, hd, rot) = (4, 2, 16, 12);
        let table = cpu::RopeTable::new(style, &cpu::RopeTable::inv_freq(10000.0, rot), 64);
        // The same cos/sin the kernel reads: [max_pos][rot / 2].
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..64 {
            for i in 0..rot / 2 {
                let mut e = vec![0.0f32; rot];
                let (a, b) = match style {
                    cpu::RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    cpu::RopeStyle::Half => (i, i + rot / 2),
                };
                e[a] = 1.0;
                table.rotate(&mut e, p);
                cos.push(e[a]);
                sin.push(e[b]);
            }
        }
        let s = RopeShape {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
            rot_dim: rot,
            style,
            cos: &cos,
            sin: &sin,
        };
        let tokens = 3;
        let (qd, kv) = (n_heads * hd, n_kv * hd);
        // A fused q|k|v row with 4 padding elements, as a strided projection output.
        let stride = qd + 2 * kv + 4;
        let mut qkv = to_bf16_vec(&rand_vec(tokens * stride, 8));
        let orig = qkv.clone();
        let positions = [5usize, 6, 63];
        let slots = [17i64, -1, 2];
        let mut kc = vec![0u16; 20 * kv];
        let mut vc = vec![0u16; 20 * kv];
        rope_write_kv(&s, &mut qkv, stride, &positions, &slots, &mut kc, &mut vc);
        for (t, &pos) in positions.iter().enumerate() {
            let row = &orig[t * stride..(t + 1) * stride];
            for h in 0..n_heads {
                let mut want = from_bf16_vec(&row[h * hd..(h + 1) * hd]);
                table.rotate(&mut want, pos);
                for d in 0..hd {
                    let got = from_bf16(qkv[t * stride + h * hd + d]);
                    assert!(
                        close(got, want[d], 1.0 / 128.0, 1e-6),
                        "{style:?} q {got} vs {}",
                        want[d]
                    );
                }
            }
            // k, v and the padding are untouched in the projection buffer.
            assert_eq!(&qkv[t * stride + qd..(t + 1) * stride], &row[qd..]);
            let Ok(slot) = usize::try_from(slots[t]) else {
                continue;
            };
            for h in 0..n_kv {
                let mut want = from_bf16_vec(&row[qd + h * hd..qd + (h + 1) * hd]);
                table.rotate(&mut want, pos);
                for d in 0..hd {
                    let got = from_bf16(kc[slot * kv + h * hd + d]);
                    assert!(
                        close(got, want[d], 1.0 / 128.0, 1e-6),
                        "{style:?} k {got} vs {}",
                        want[d]
                    );
                }
            }
            assert_eq!(&vc[slot * kv..(slot + 1) * kv], &row[qd + kv..qd + 2 * kv]);
        }
        // The token without a slot wrote nothing.
        let written: std::collections::BTreeSet<usize> = (0..20)
            .filter(|s| kc[s * kv..(s + 1) * kv].iter().any(|x| *x != 0))
            .collect();
        assert_eq!(written, [2usize, 17].into_iter().collect());
    }
}

#[test]
fn softmax_rows_with_temperature() {
    let logits = [1.0f32, 2.0, 3.0, 0.0, 0.0, 0.0];
    let p = softmax_rows(&logits, 3, 0.5);
    let z: f32 = [2.0f32, 4.0, 6.0].iter().map(|x| (x - 6.0).exp()).sum();
    assert!(close(p[2], 1.0 / z, 1e-6, 0.0));
    assert!(close(p.iter().take(3).sum::<f32>(), 1.0, 1e-6, 0.0));
    assert!(p[3..].iter().all(|x| close(*x, 1.0 / 3.0, 1e-6, 0.0)));
}

#[test]
fn prefill_attention_matches_the_f32_paged_kernel() {
    // Two sequences: 5 new tokens after 30 cached, and a fresh 20-token prompt.
    let c = decode_case(&[35, 20], 2, 2, 64, 21);
    let (n_new, hd, nh) = ([5usize, 20], 64, c.shape.n_heads);
    let cu_q = [0, n_new[0], n_new[0] + n_new[1]];
    let q = to_bf16_vec(&rand_vec(cu_q[2] * nh * hd, 22));
    let out = prefill_attention(&c.shape, &q, &c.kc, &c.vc, &c.tables, &cu_q, &c.lens);
    let l = c.shape.layout;
    let attn = cpu::PagedAttention {
        layout: l,
        n_heads: nh,
        scale: c.shape.scale,
    };
    let (kc, vc) = (from_bf16_vec(&c.kc), from_bf16_vec(&c.vc));
    for (seq, &len) in c.lens.iter().enumerate() {
        let table = &c.tables[seq * c.shape.max_blocks..(seq + 1) * c.shape.max_blocks];
        let rows = cu_q[seq]..cu_q[seq + 1];
        let qf = from_bf16_vec(&q[rows.start * nh * hd..rows.end * nh * hd]);
        let mut want = vec![0.0; qf.len()];
        attn.run(
            &qf,
            len - n_new[seq],
            n_new[seq],
            table,
            &kc,
            &vc,
            &mut want,
        );
        for (i, w) in want.iter().enumerate() {
            let got = from_bf16(out[rows.start * nh * hd + i]);
            assert!(
                close(got, *w, 1.0 / 128.0, 1e-3),
                "seq {seq} element {i}: {got} vs {w}"
            );
        }
    }
}

/// The reference runs its rows on every core: a batch with a sequence that has no new
/// tokens between two that have gives, row for row, what each sequence gives alone.
#[test]
fn prefill_attention_rows_are_independent_of_the_batch() {
    let c = decode_case(&[40, 17, 70], 2, 4, 64, 31);
    let (hd, nh, mb) = (64, c.shape.n_heads, c.shape.max_blocks);
    let n_new = [9usize, 0, 70];
    let cu_q = [0, 9, 9, 79];
    let q = to_bf16_vec(&rand_vec(cu_q[3] * nh * hd, 32));
    let kv = (KvCache::Bf16(&c.kc), KvCache::Bf16(&c.vc));
    let all = prefill_attention_kv(&c.shape, &q, kv.0, kv.1, &c.tables, &cu_q, &c.lens);
    for seq in [0, 2] {
        let rows = cu_q[seq] * nh * hd..cu_q[seq + 1] * nh * hd;
        let alone = prefill_attention_kv(
            &c.shape,
            &q[rows.clone()],
            kv.0,
            kv.1,
            &c.tables[seq * mb..(seq + 1) * mb],
            &[0, n_new[seq]],
            &c.lens[seq..=seq],
        );
        assert_eq!(all[rows], alone[..], "sequence {seq}");
    }
}

#[test]
fn embed_rows_gathers_table_rows() {
    let table: Vec<u16> = (0..5 * 8).map(|i| i as u16).collect();
    let out = embed_rows(&table, &[4, 0, 4], 8);
    assert_eq!(&out[..8], &table[32..40]);
    assert_eq!(&out[8..16], &table[..8]);
    assert_eq!(&out[16..], &table[32..40]);
}

/// The top-k reference against a naive repeated-maximum selection, with ties, NaN, both
/// infinities and both zeros.
#[test]
fn topk_rows_matches_naive_selection() {
    let vocab = 3000;
    let mut logits: Vec<f32> = crate::test_util::rand_vec(2 * vocab, 77)
        .iter()
        .map(|v| (v * 8.0).round() / 2.0) // many exact ties
        .collect();
    logits[5] = f32::NAN;
    logits[6] = f32::INFINITY;
    logits[7] = f32::NEG_INFINITY;
    logits[8] = -0.0;
    logits[9] = 0.0;
    logits[vocab + 1] = f32::INFINITY;
    logits[vocab + 2] = f32::MAX;
    for k in [1usize, 2, 17, 256, TOPK_MAX] {
        let (vals, ids) = topk_rows(&logits, vocab, k);
        assert_eq!((vals.len(), ids.len()), (2 * k, 2 * k));
        for (r, row) in logits.chunks_exact(vocab).enumerate() {
            let mut taken = vec![false; vocab];
            for j in 0..k {
                let mut best: Option<usize> = None;
                for i in 0..vocab {
                    if taken[i] {
                        continue;
                    }
                    let better = match best {
                        None => true,
                        Some(b) => sanitize_logit(row[i])
                            .total_cmp(&sanitize_logit(row[b]))
                            .is_gt(),
                    };
                    if better {
                        best = Some(i);
                    }
                }
                let b = best.unwrap();
                taken[b] = true;
                assert_eq!(ids[r * k + j], b as i32, "row {r} k {k} rank {j}");
                assert_eq!(vals[r * k + j].to_bits(), sanitize_logit(row[b]).to_bits());
            }
        }
    }
    // The sanitized infinities: +inf ranks as f32::MAX, ahead of an equal f32::MAX only by id.
    let (vals, ids) = topk_rows(&logits[vocab..], vocab, 2);
    assert_eq!((ids[0], ids[1]), (1, 2));
    assert_eq!((vals[0], vals[1]), (f32::MAX, f32::MAX));
}

/// The dense draw's reference: for every u the pick's running-sum interval (f64, id
/// order, kept weights) holds u, over vocabularies smaller than a tile, not a multiple of
/// 32, and larger than 32 x 1024 (several tokens a lane); min-p drops tokens; inv_t = 0
/// is the greedy pick; a row without a finite logit gives token 0.
#[test]
fn sample_rows_draws_by_running_sum_in_id_order() {
    for (vocab, seed) in [(5usize, 1u64), (1000, 2), (49_153, 3), (70_001, 4)] {
        let mut row: Vec<f32> = crate::test_util::rand_vec(vocab, seed)
            .iter()
            .map(|v| v * 6.0)
            .collect();
        row[vocab / 2] = f32::NAN;
        row[vocab - 1] = f32::NEG_INFINITY;
        for (inv_t, min_w) in [(1.0f32, 0.0f32), (1.0 / 0.7, 0.0), (1.0, 0.05), (3.0, 0.5)] {
            let n = 64;
            let params: Vec<SampleParams> = (0..n)
                .map(|i| SampleParams {
                    inv_t,
                    min_w,
                    u: (i as f64 + 0.5) / n as f64,
                })
                .collect();
            let rows: Vec<f32> = (0..n).flat_map(|_| row.iter().copied()).collect();
            let (ids, stats) = sample_rows(&rows, vocab, &params);
            let mx = row
                .iter()
                .map(|&v| sanitize_logit(v))
                .fold(f32::NEG_INFINITY, f32::max);
            let all: f64 = row
                .iter()
                .map(|&l| f64::from(sample_weight(sanitize_logit(l), mx, inv_t)))
                .sum();
            for (p, (&id, &(m, sum))) in params.iter().zip(ids.iter().zip(&stats)) {
                assert_eq!(m, mx);
                assert!((f64::from(sum) - all).abs() <= 1e-5 * all, "{sum} vs {all}");
                let (u, lo, hi) = sample_interval(&row, p, id as usize)
                    .unwrap_or_else(|| panic!("vocab {vocab}: token {id} has no kept weight"));
                assert!(
                    lo - 1e-7 <= u && u < hi + 1e-7,
                    "vocab {vocab} u {u}: [{lo}, {hi})"
                );
                let w = sample_weight(sanitize_logit(row[id as usize]), mx, inv_t);
                assert!(w >= min_w, "min-p kept {w} < {min_w}");
            }
        }
        let greedy = SampleParams {
            inv_t: 0.0,
            min_w: 0.0,
            u: 0.5,
        };
        let (ids, _) = sample_rows(&row, vocab, &[greedy]);
        assert_eq!(ids, argmax_rows(&row, vocab));
    }
    // Rare tokens stay reachable: in a 128k vocabulary dominated by one token, a draw
    // aimed at the middle of a token of probability ~2e-9 (far below an f32 ulp of the
    // total, 1.2e-7, which f32 running sums could not resolve; the fixed-point sums
    // err by about 1e-13 a token) picks it, in the middle of the row and at its end.
    let vocab = 128_000;
    let mut row: Vec<f32> = crate::test_util::rand_vec(vocab, 11)
        .iter()
        .map(|v| v - 20.0)
        .collect();
    row[5] = 0.0;
    let p = SampleParams {
        inv_t: 1.0,
        min_w: 0.0,
        u: 0.0,
    };
    for id in [vocab / 2 + 1, vocab - 1] {
        let (_, lo, hi) = sample_interval(&row, &p, id).unwrap();
        assert!(hi - lo < 1e-8, "a rare token: {}", hi - lo);
        let aimed = SampleParams {
            u: (lo + hi) / 2.0,
            ..p
        };
        assert_eq!(sample_rows(&row, vocab, &[aimed]).0, vec![id as u32]);
    }
    let dead = [f32::NAN, f32::NEG_INFINITY, f32::NAN];
    let p = SampleParams {
        inv_t: 1.0,
        min_w: 0.0,
        u: 0.9,
    };
    assert_eq!(sample_rows(&dead, 3, &[p]).0, vec![0]);
    // One token far above the rest takes every draw; u just below 1 still lands on a
    // token with weight.
    let mut peaked = vec![0.0f32; 4096];
    peaked[4000] = 200.0;
    for u in [0.0, 0.5, 0.999_999_9, 1.0 - f64::EPSILON] {
        let p = SampleParams {
            inv_t: 1.0,
            min_w: 0.0,
            u,
        };
        assert_eq!(sample_rows(&peaked, 4096, &[p]).0, vec![4000]);
    }
}

#[test]
fn argmax_rows_is_the_sampler_greedy_rule() {
    let m = f32::MAX;
    let rows = [
        vec![1.0, 3.0, 3.0, 2.0],
        vec![f32::NAN, 0.5, 0.25, 0.5],
        vec![m, 1.0, f32::INFINITY, 0.0],
        vec![f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY, f32::NAN],
        vec![f32::NAN, f32::NAN, f32::NAN, -1.0],
        vec![f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NAN],
    ];
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    // +inf counts as f32::MAX, so the earlier MAX wins the tie.
    assert_eq!(argmax_rows(&flat, 4), vec![1, 1, 0, 0, 3, 0]);
}

/// Every finite e4m3 value, by code, from the format's definition (no bit tricks).
fn e4m3_table() -> Vec<(u8, f64)> {
    (0u8..=255)
        .filter(|c| c & 0x7f != 0x7f)
        .map(|c| {
            let (e, m) = (i32::from((c >> 3) & 0xf), f64::from(c & 7));
            let mag = if e == 0 {
                m / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f64.powi(e - 7)
            };
            (c, if c & 0x80 != 0 { -mag } else { mag })
        })
        .collect()
}

/// Nearest finite e4m3 code by exhaustive search: ties to the even code, beyond 448
/// the largest finite value of that sign.
fn e4m3_nearest(x: f32, table: &[(u8, f64)]) -> u8 {
    let x = f64::from(x);
    let mut best = (f64::INFINITY, 0u8);
    for &(c, v) in table {
        if (v == 0.0 && x.is_sign_negative() != (c & 0x80 != 0))
            || (v != 0.0 && (v < 0.0) != (x < 0.0))
        {
            continue;
        }
        let d = (v - x).abs();
        if d < best.0 || (d == best.0 && c & 1 == 0) {
            best = (d, c);
        }
    }
    best.1
}

#[test]
fn e4m3_decodes_every_code_and_round_trips() {
    let table = e4m3_table();
    assert_eq!(table.len(), 254);
    for &(c, v) in &table {
        assert_eq!(f64::from(from_e4m3(c)), v, "code {c:#04x}");
        assert_eq!(to_e4m3(from_e4m3(c)), c, "code {c:#04x}");
    }
    assert!(from_e4m3(0x7f).is_nan() && from_e4m3(0xff).is_nan());
    assert_eq!(from_e4m3(0x38), 1.0);
    assert_eq!(from_e4m3(0x7e), 448.0);
    assert_eq!(from_e4m3(0x08), 2f32.powi(-6));
    assert_eq!(from_e4m3(0x01), 2f32.powi(-9));
}

#[test]
fn e4m3_rounds_to_nearest_even_and_saturates() {
    let table = e4m3_table();
    // Every midpoint between neighbours, and just either side of it.
    for c in 0u8..0x7e {
        let (lo, hi) = (from_e4m3(c), from_e4m3(c + 1));
        let mid = (lo + hi) / 2.0;
        let even = if c % 2 == 0 { c } else { c + 1 };
        assert_eq!(to_e4m3(mid), even, "midpoint above {c:#04x}");
        assert_eq!(to_e4m3(-mid), even | 0x80, "midpoint below -{c:#04x}");
        assert_eq!(to_e4m3(f32::from_bits(mid.to_bits() - 1)), c);
        assert_eq!(to_e4m3(f32::from_bits(mid.to_bits() + 1)), c + 1);
    }
    for x in [448.0f32, 449.0, 464.0, 480.0, 1e9, f32::MAX, f32::INFINITY] {
        assert_eq!(to_e4m3(x), 0x7e, "{x}");
        assert_eq!(to_e4m3(-x), 0xfe, "{x}");
    }
    assert_eq!(to_e4m3(f32::NAN) & 0x7f, 0x7f);
    assert_eq!(to_e4m3(-0.0), 0x80);
    assert_eq!(
        to_e4m3(2f32.powi(-11)),
        0x00,
        "a quarter step rounds to zero"
    );
    // Random values over the whole range against the exhaustive search.
    let xs = rand_vec(20_000, 99);
    for (i, &r) in xs.iter().enumerate() {
        let x = r * 2f32.powi((i % 22) as i32 - 12);
        assert_eq!(to_e4m3(x), e4m3_nearest(x, &table), "{x}");
    }
}

/// e4m3 codes of `x / scale[kv head]` for a `[slots][n_kv][hd]` cache.
fn quantize(x: &[u16], n_kv: usize, hd: usize, scales: &[f32]) -> Vec<u8> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| to_e4m3(from_bf16(v) / scales[(i / hd) % n_kv]))
        .collect()
}

#[test]
fn fp8_decode_attention_equals_dense_over_the_dequantized_cache() {
    for (lens, n_kv, group, hd, splits) in [
        (vec![1usize, 40, 300], 2usize, 4usize, 128usize, 1usize),
        (vec![1033, 77], 2, 8, 64, 3),
        (vec![500], 1, 1, 96, 2),
    ] {
        let c = decode_case(&lens, n_kv, group, hd, 5 + hd as u64);
        // Per-head scales: the values are in [-1, 1); scales put them mid-range and in
        // the subnormals (head 1's K scale is large).
        let ks: Vec<f32> = (0..n_kv).map(|h| [1.0 / 64.0, 2.0][h % 2]).collect();
        let vs: Vec<f32> = (0..n_kv).map(|h| [0.01, 1.0 / 200.0][h % 2]).collect();
        let kq = quantize(&c.kc, n_kv, hd, &ks);
        let vq = quantize(&c.vc, n_kv, hd, &vs);
        let mut shape = c.shape;
        shape.num_splits = splits;
        let out = decode_attention_kv(
            &shape,
            &c.q,
            KvCache::Fp8 {
                codes: &kq,
                scales: &ks,
            },
            KvCache::Fp8 {
                codes: &vq,
                scales: &vs,
            },
            &c.tables,
            &c.lens,
        );
        // The definition over the dequantized values...
        let l = &shape.layout;
        for (seq, &len) in c.lens.iter().enumerate() {
            let table = &c.tables[seq * shape.max_blocks..(seq + 1) * shape.max_blocks];
            for h in 0..shape.n_heads {
                let kvh = h / group;
                let row = |codes: &[u8], sc: f32, p: usize| -> Vec<f32> {
                    let off = l.offset(l.slot(table, p), kvh);
                    codes[off..off + hd]
                        .iter()
                        .map(|&x| from_e4m3(x) * sc)
                        .collect()
                };
                let keys: Vec<Vec<f32>> = (0..len).map(|p| row(&kq, ks[kvh], p)).collect();
                let values: Vec<Vec<f32>> = (0..len).map(|p| row(&vq, vs[kvh], p)).collect();
                let q = from_bf16_vec(&c.q[(seq * shape.n_heads + h) * hd..][..hd]);
                let want = dense_decode(&q, &keys, &values, shape.scale);
                // ... and the unquantized one, which fp8 only approximates: e4m3 keeps 3
                // mantissa bits, so each value is off by up to 1/16 of itself.
                let exact_k: Vec<Vec<f32>> = (0..len)
                    .map(|p| {
                        let off = l.offset(l.slot(table, p), kvh);
                        from_bf16_vec(&c.kc[off..off + hd])
                    })
                    .collect();
                let exact_v: Vec<Vec<f32>> = (0..len)
                    .map(|p| {
                        let off = l.offset(l.slot(table, p), kvh);
                        from_bf16_vec(&c.vc[off..off + hd])
                    })
                    .collect();
                let exact = dense_decode(&q, &exact_k, &exact_v, shape.scale);
                for d in 0..hd {
                    let got = from_bf16(out[(seq * shape.n_heads + h) * hd + d]);
                    assert!(
                        close(got, want[d] as f32, 1.0 / 128.0, 2e-3),
                        "seq {seq} head {h} dim {d}: {got} vs {}",
                        want[d]
                    );
                    assert!(
                        (f64::from(got) - exact[d]).abs() < 0.08,
                        "seq {seq} head {h} dim {d}: {got} vs unquantized {}",
                        exact[d]
                    );
                }
            }
        }
    }
}

#[test]
fn rope_write_kv_fp8_stores_the_rounded_bf16_path_values() {
    for style in [cpu::RopeStyle::Interleaved, cpu::RopeStyle::Half] {
        let (n_heads, n_kv, hd, rot) = (4, 2, 16, 12);
        let half = rot / 2;
        let (cos, sin): (Vec<f32>, Vec<f32>) = (0..64 * half)
            .map(|i| {
                let a = (i / half) as f32 * 0.1 / (1 + i % half) as f32;
                (a.cos(), a.sin())
            })
            .unzip();
        let s = RopeShape {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
            rot_dim: rot,
            style,
            cos: &cos,
            sin: &sin,
        };
        let (qd, kv) = (n_heads * hd, n_kv * hd);
        let stride = qd + 2 * kv + 4;
        let tokens = 3;
        let qkv0 = to_bf16_vec(&rand_vec(tokens * stride, 31));
        let positions = [5usize, 6, 63];
        let slots = [17i64, -1, 2];
        let (ks, vs) = ([0.01f32, 1.0 / 300.0], [0.005f32, 0.02]);
        // The bf16 path is the reference for q (identical) and, to e4m3 precision, for
        // the cache.
        let (mut q_bf, mut kc, mut vc) = (qkv0.clone(), vec![0u16; 20 * kv], vec![0u16; 20 * kv]);
        rope_write_kv(&s, &mut q_bf, stride, &positions, &slots, &mut kc, &mut vc);
        let (mut q_f8, mut k8, mut v8) = (qkv0.clone(), vec![0u8; 20 * kv], vec![0u8; 20 * kv]);
        rope_write_kv_fp8(
            &s, &mut q_f8, stride, &positions, &slots, &mut k8, &mut v8, &ks, &vs,
        );
        assert_eq!(q_bf, q_f8, "q is rotated the same");
        for slot in [17usize, 2] {
            for i in slot * kv..(slot + 1) * kv {
                let h = (i / hd) % n_kv;
                // V: exactly the e4m3 of the bf16 value over its scale.
                assert_eq!(v8[i], to_e4m3(from_bf16(vc[i]) / vs[h]));
                // K: within half an e4m3 step (1/16 relative) plus the bf16 rounding.
                let (got, want) = (from_e4m3(k8[i]) * ks[h], from_bf16(kc[i]));
                assert!(
                    close(got, want, 1.0 / 16.0 + 1.0 / 128.0, ks[h] * 2f32.powi(-10)),
                    "{got} vs {want}"
                );
            }
        }
        // The skipped token (slot -1) wrote nothing; untouched slots stay zero.
        assert!(k8[..2 * kv].iter().all(|&c| c == 0) && v8[5 * kv..6 * kv].iter().all(|&c| c == 0));
    }
}
