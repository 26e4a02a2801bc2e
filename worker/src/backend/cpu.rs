//! The CPU backend: the model forward pass over the paged KV cache, using the reference
//! kernels of the `kernels` crate and all configured threads (one rayon pool).
//!
//! Every token of every chunk in a step is processed as one flat batch through the
//! matrix multiplications (so weights are read once per step, whatever the batch), and
//! attention runs per (token, head) over the sequence's paged cache.

use std::sync::Arc;

use kernels::KvLayout;
use kernels::cpu::{
    PagedAttention, RopeTable, add_rms_norm, rms_norm, rope_and_write_kv, silu_and_mul,
};
use rayon::prelude::*;

use super::kv_scales::{KvAbsMax, KvScales};
use super::{Backend, BackendError, KvDtype, SeqChunk, check_chunks, fp8_round_scaled};
use crate::model::{ModelConfig, Weights};

pub struct CpuBackend {
    cfg: ModelConfig,
    weights: Arc<Weights>,
    layout: KvLayout,
    rope: RopeTable,
    /// Per layer: K and V caches, `[num_blocks][block_size][n_kv][head_dim]`.
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    pool: Arc<rayon::ThreadPool>,
    scratch: Scratch,
    /// K/V values are rounded to e4m3 at these per-(layer, KV head) scales as they are
    /// written ([`KvDtype::Fp8`]).
    kv_fp8: Option<KvScales>,
    /// The largest |K| and |V| written per (layer, KV head), when recording
    /// ([`CpuBackend::with_kv_absmax`]: calibration of FP8 scales).
    kv_absmax: Option<KvAbsMax>,
}

/// Activation buffers reused across steps.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

/// Where each flat token of the step belongs.
struct TokenSlot {
    chunk: usize,
    pos: usize,
}

impl CpuBackend {
    pub fn new(
        cfg: ModelConfig,
        weights: Arc<Weights>,
        num_blocks: usize,
        block_size: usize,
        threads: usize,
    ) -> Result<Self, BackendError> {
        let layout = KvLayout {
            num_blocks,
            block_size,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("cpu-backend-{i}"))
            .build()
            .map_err(|e| {
                BackendError::Device(format!("cannot start {threads} CPU threads: {e}"))
            })?;
        let pool = Arc::new(pool);
        let rope = RopeTable::new(cfg.rope_style, &cfg.rope_inv_freq(), cfg.max_context);
        let n = layout.elements();
        Ok(Self {
            k_cache: (0..cfg.n_layers).map(|_| vec![0.0; n]).collect(),
            v_cache: (0..cfg.n_layers).map(|_| vec![0.0; n]).collect(),
            cfg,
            weights,
            layout,
            rope,
            pool,
            scratch: Scratch::default(),
            kv_fp8: None,
            kv_absmax: None,
        })
    }

    /// The KV cache's storage: [`KvDtype::Fp8`] rounds every K/V value to e4m3 (scale
    /// [`super::KV_FP8_SCALE`] until [`Backend::set_kv_scales`]) as it is written, as the
    /// CUDA backend's FP8 cache does.
    pub fn with_kv_dtype(mut self, kv: KvDtype) -> Self {
        self.kv_fp8 = (kv == KvDtype::Fp8).then(|| {
            KvScales::uniform(self.cfg.n_layers, self.cfg.n_kv_heads, super::KV_FP8_SCALE)
        });
        self
    }

    /// Records the largest |K| (after RoPE) and |V| written per (layer, KV head), for
    /// [`CpuBackend::kv_absmax`].
    pub fn with_kv_absmax(mut self) -> Self {
        self.kv_absmax = Some(KvAbsMax::new(self.cfg.n_layers, self.cfg.n_kv_heads));
        self
    }

    /// What [`CpuBackend::with_kv_absmax`] recorded (before any FP8 rounding).
    pub fn kv_absmax(&self) -> Option<&KvAbsMax> {
        self.kv_absmax.as_ref()
    }

    fn check(&self, chunks: &[SeqChunk<'_>]) -> Result<Vec<TokenSlot>, BackendError> {
        let total = check_chunks(
            chunks,
            self.rope.max_pos(),
            self.layout.block_size,
            self.layout.num_blocks,
            self.cfg.vocab_size,
        )?;
        let mut slots = Vec::with_capacity(total);
        for (ci, c) in chunks.iter().enumerate() {
            slots.extend((0..c.tokens.len()).map(|i| TokenSlot {
                chunk: ci,
                pos: c.start + i,
            }));
        }
        Ok(slots)
    }

    fn forward_inner(&mut self, chunks: &[SeqChunk<'_>], slots: &[TokenSlot]) -> Vec<f32> {
        let cfg = &self.cfg;
        let w = &self.weights;
        let s = &mut self.scratch;
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let t = slots.len();
        let q_dim = cfg.n_heads * hd;
        let kv_dim = cfg.n_kv_heads * hd;
        let qkv_dim = q_dim + 2 * kv_dim;
        let inter = cfg.intermediate;
        let eps = cfg.rms_eps;

        // Embeddings.
        s.x.resize(t * h, 0.0);
        let tokens: Vec<u32> = chunks
            .iter()
            .flat_map(|c| c.tokens.iter().copied())
            .collect();
        s.x.par_chunks_mut(h)
            .zip(tokens.par_iter())
            .for_each(|(row, &tok)| {
                w.embed.dequantize_row(tok as usize, row);
            });
        s.xn.resize(t * h, 0.0);
        s.qkv.resize(t * qkv_dim, 0.0);
        s.attn.resize(t * q_dim, 0.0);
        s.proj.resize(t * h, 0.0);
        s.gate_up.resize(t * 2 * inter, 0.0);
        s.act.resize(t * inter, 0.0);
        let attn = PagedAttention {
            layout: self.layout,
            n_heads: cfg.n_heads,
            scale: 1.0 / (hd as f32).sqrt(),
        };

        for (li, lw) in w.layers.iter().enumerate() {
            // Attention block. The residual add of the previous layer's MLP is fused into
            // this norm (layer 0 has nothing to add).
            if li == 0 {
                s.xn.par_chunks_mut(h)
                    .zip(s.x.par_chunks(h))
                    .for_each(|(o, x)| rms_norm(x, &lw.attn_norm, eps, o));
            } else {
                s.x.par_chunks_mut(h)
                    .zip(s.proj.par_chunks(h))
                    .zip(s.xn.par_chunks_mut(h))
                    .for_each(|((x, p), o)| add_rms_norm(x, p, &lw.attn_norm, eps, o));
            }
            lw.wqkv.matmul(&s.xn, t, &mut s.qkv);
            if let Some(b) = &lw.bqkv {
                s.qkv
                    .par_chunks_mut(qkv_dim)
                    .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
            }
            let (kc, vc) = (&mut self.k_cache[li], &mut self.v_cache[li]);
            for (row, slot) in s.qkv.chunks_exact_mut(qkv_dim).zip(slots) {
                let (q, rest) = row.split_at_mut(q_dim);
                let (k, v) = rest.split_at_mut(kv_dim);
                let phys = self.layout.slot(chunks[slot.chunk].block_table, slot.pos);
                rope_and_write_kv(&self.rope, &self.layout, slot.pos, phys, q, k, v, kc, vc);
                let at = self.layout.offset(phys, 0);
                let (kr, vr) = (&mut kc[at..at + kv_dim], &mut vc[at..at + kv_dim]);
                if let Some(m) = &mut self.kv_absmax {
                    m.observe(li, hd, kr, vr);
                }
                if let Some(sc) = &self.kv_fp8 {
                    for (row, scales) in [(kr, &sc.k[li]), (vr, &sc.v[li])] {
                        for (head, &scale) in row.chunks_exact_mut(hd).zip(scales) {
                            head.iter_mut()
                                .for_each(|x| *x = fp8_round_scaled(*x, scale));
                        }
                    }
                }
            }
            let (kc, vc) = (&self.k_cache[li], &self.v_cache[li]);
            let qkv = &s.qkv;
            // One task per (token, KV head): the group's query heads share K/V reads.
            let group = cfg.n_heads / cfg.n_kv_heads;
            s.attn.par_chunks_mut(group * hd).enumerate().for_each_init(
                Vec::new,
                |scores, (i, out)| {
                    let (ti, kv_head) = (i / cfg.n_kv_heads, i % cfg.n_kv_heads);
                    let slot = &slots[ti];
                    let q = &qkv[ti * qkv_dim + kv_head * group * hd..][..group * hd];
                    attn.group_heads(
                        q,
                        kv_head,
                        slot.pos,
                        chunks[slot.chunk].block_table,
                        kc,
                        vc,
                        scores,
                        out,
                    );
                },
            );
            lw.wo.matmul(&s.attn, t, &mut s.proj);

            // MLP block with the attention residual fused into its norm.
            s.x.par_chunks_mut(h)
                .zip(s.proj.par_chunks(h))
                .zip(s.xn.par_chunks_mut(h))
                .for_each(|((x, p), o)| add_rms_norm(x, p, &lw.ffn_norm, eps, o));
            lw.w_gate_up.matmul(&s.xn, t, &mut s.gate_up);
            s.act
                .par_chunks_mut(inter)
                .zip(s.gate_up.par_chunks(2 * inter))
                .for_each(|(o, gu)| {
                    let (g, u) = gu.split_at(inter);
                    silu_and_mul(g, u, o);
                });
            lw.w_down.matmul(&s.act, t, &mut s.proj);
        }

        // Final residual, norm and output projection, only for tokens that need logits.
        let mut rows = Vec::new();
        let mut end = 0;
        for c in chunks {
            end += c.tokens.len();
            if c.want_logits {
                rows.push(end - 1);
            }
        }
        let mut sel = vec![0.0f32; rows.len() * h];
        for (o, &r) in sel.chunks_exact_mut(h).zip(&rows) {
            let mut x = s.x[r * h..(r + 1) * h].to_vec();
            add_rms_norm(&mut x, &s.proj[r * h..(r + 1) * h], &w.final_norm, eps, o);
        }
        let mut logits = vec![0.0f32; rows.len() * cfg.vocab_size];
        if !rows.is_empty() {
            w.output.matmul(&sel, rows.len(), &mut logits);
        }
        logits
    }
}

impl Backend for CpuBackend {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn name(&self) -> String {
        format!("cpu ({} threads)", self.pool.current_num_threads())
    }

    fn num_kv_blocks(&self) -> usize {
        self.layout.num_blocks
    }

    fn set_kv_scales(&mut self, scales: &KvScales) -> Result<(), BackendError> {
        let Some(current) = &mut self.kv_fp8 else {
            return Err(BackendError::KvScales(
                "the KV cache is not FP8 (--kv-cache-dtype fp8)".into(),
            ));
        };
        scales
            .check(self.cfg.n_layers, self.cfg.n_kv_heads)
            .map_err(BackendError::KvScales)?;
        current.clone_from(scales);
        Ok(())
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>]) -> Result<Vec<f32>, BackendError> {
        let slots = self.check(chunks)?;
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        // `install` runs the closure on the pool so every par_iter inside uses its threads.
        let pool = Arc::clone(&self.pool);
        Ok(pool.install(|| self.forward_inner(chunks, &slots)))
    }
}
