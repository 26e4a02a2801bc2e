#!/usr/bin/env python3
"""Index model of the two newer prefill kernels (no GPU needed): emulates their shared-memory
layouts and fragment addressing under the documented semantics of cp.async, ldmatrix(.trans),
mma.m16n8k16 and wgmma (A from registers; B through a no-swizzle descriptor, K-major:
element (k, n) at start + (n/8)*SBO + (k/8)*LBO + (n%8)*16 + (k%8)*2, MN-major:
start + (n/8)*SBO + (k/8)*LBO + (k%8)*16 + (n%8)*2) and checks that each operand holds the
right matrix elements. It mirrors the index formulas of prefill_attention.cu
(`prefill_attention_pipe_impl`) and prefill_wgmma.cu (`prefill_wgmma_impl`,
`prefill_wgmma_ws_impl`, its TMA variant) by hand: keep them in step. (GPU runs
7 and 8 on an H200 confirmed both descriptor readings: the kernels built on them match the
CPU reference, their twins with LBO and SBO exchanged did not.)

  python3 kernels/tools/fragment_model.py
"""
import numpy as np
rng = np.random.default_rng(0)
for HD in (64, 96, 128):
    BC = 64; TILE = BC * HD * 2
    K_LBO, K_SBO = 128, HD * 16
    K = rng.integers(0, 60000, size=(BC, HD)).astype(np.uint16)
    V = rng.integers(0, 60000, size=(BC, HD)).astype(np.uint16)
    # A fragments of P from the S accumulator layout: d[4j+e] -> row g (+8 if e>=2), col 8j+2t+(e&1)
    P = rng.standard_normal((64, BC)).astype(np.float32)
    for w in range(4):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            s = np.zeros(32)
            for j in range(8):
                for e in range(4):
                    s[4 * j + e] = P[16 * w + g + 8 * (e >> 1), 8 * j + 2 * t + (e & 1)]
            for kk in range(4):
                pa = [(s[8 * kk + 0], s[8 * kk + 1]), (s[8 * kk + 2], s[8 * kk + 3]),
                      (s[8 * kk + 4], s[8 * kk + 5]), (s[8 * kk + 6], s[8 * kk + 7])]
                # documented A layout: a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..), k within 16kk
                want = [(P[16 * w + g, 16 * kk + 2 * t], P[16 * w + g, 16 * kk + 2 * t + 1]),
                        (P[16 * w + g + 8, 16 * kk + 2 * t], P[16 * w + g + 8, 16 * kk + 2 * t + 1]),
                        (P[16 * w + g, 16 * kk + 2 * t + 8], P[16 * w + g, 16 * kk + 2 * t + 9]),
                        (P[16 * w + g + 8, 16 * kk + 2 * t + 8], P[16 * w + g + 8, 16 * kk + 2 * t + 9])]
                assert np.allclose(pa, want), (HD, w, lane, kk)
    print("HD", HD, "ok: P fragments match the wgmma A operand layout")
    # prefill_wgmma_impl: thread c's piece is (key c / (HD/8),
    # dims 8 (c % (HD/8)) ..) of both tiles; K into the K-major layout above, V into the
    # MN-major one, which wgmma reads with imm-trans-b = 1 (no-swizzle MN-major: element
    # (k, n) at start + (n/8)*SBO + (k/8)*LBO + (k%8)*16 + (n%8)*2).
    ring = np.zeros(2 * TILE // 2, dtype=np.uint16)
    rk, rv = 0, TILE
    seen_k, seen_v = set(), set()
    for c in range(BC * HD // 8):
        key, dp = c // (HD // 8), c % (HD // 8)
        ok_ = rk + (key >> 3) * K_SBO + dp * 128 + (key & 7) * 16
        ov = rv + (key >> 4) * (HD * 32) + ((key >> 3) & 1) * 128 + dp * 256 + (key & 7) * 16
        assert ok_ % 16 == 0 and ov % 16 == 0 and ok_ not in seen_k and ov not in seen_v
        assert rk <= ok_ < rv and rv <= ov < 2 * TILE
        seen_k.add(ok_); seen_v.add(ov)
        ring[ok_ // 2: ok_ // 2 + 8] = K[key, dp * 8: dp * 8 + 8]
        ring[ov // 2: ov // 2 + 8] = V[key, dp * 8: dp * 8 + 8]
    for ks in range(HD // 16):
        start = rk + ks * 256
        B = np.array([[ring[(start + (n // 8) * K_SBO + (k // 8) * K_LBO + (n % 8) * 16 + (k % 8) * 2) // 2]
                       for n in range(BC)] for k in range(16)])
        assert (B == K[:, 16 * ks: 16 * ks + 16].T).all(), ("ring K", HD, ks)
    RV_LBO, RV_SBO = 128, 256
    for kk in range(BC // 16):
        start = rv + kk * HD * 32
        B = np.array([[ring[(start + (n // 8) * RV_SBO + (k // 8) * RV_LBO + (k % 8) * 16 + (n % 8) * 2) // 2]
                       for n in range(HD)] for k in range(16)])
        assert (B == V[16 * kk: 16 * kk + 16, :]).all(), ("ring V", HD, kk)
    print("HD", HD, "ok: K tile (K-major) and V tile (MN-major) match the wgmma operand model")
    # prefill_wgmma_ws_impl's producer warpgroup: thread p (warp w = p / 32) copies keys
    # 8 (w + 4 i) + p % 8 (i < BC / 32, tiles of 64 or 128 keys), pieces (p / 8) % 4 + 4 dq,
    # into the same layouts as the ring; every piece exactly once, each KV block index as
    # the kernel computes it, and each quarter-warp (8 lanes, one shared-memory wavefront
    # of 16-byte stores) writing 128 contiguous bytes.
    for BCW in (64, 128):
        rvw = BCW * HD * 2
        pieces = set()
        for i in range(BCW // 32):
            for dq in range(HD // 32):
                for w in range(4):
                    ks_, vs_ = [], []
                    for lane in range(32):
                        p = 32 * w + lane
                        key_lo, dp0 = p & 7, (p >> 3) & 3
                        key, dp = 8 * (w + 4 * i) + key_lo, dp0 + 4 * dq
                        assert key // 16 == (w >> 1) + 2 * i
                        assert (key, dp) not in pieces
                        pieces.add((key, dp))
                        ks_.append((key >> 3) * K_SBO + dp * 128 + (key & 7) * 16)
                        vs_.append(rvw + (key >> 4) * (HD * 32) + ((key >> 3) & 1) * 128 + dp * 256 + (key & 7) * 16)
                    assert max(ks_) < rvw and max(vs_) < 2 * rvw
                    for q in range(4):
                        for a in (ks_[8 * q: 8 * q + 8], vs_[8 * q: 8 * q + 8]):
                            assert sorted(a) == list(range(min(a), min(a) + 128, 16)), ("ws banks", HD, BCW, i, dq, w, q)
        assert pieces == {(key, dp) for key in range(BCW) for dp in range(HD // 8)}, ("ws pieces", HD, BCW)
    print("HD", HD, "ok: the warp-specialised producer copies every piece once, conflict-free (64- and 128-key tiles)")
    # Its consumers' Q (64 rows a warpgroup) in the K tile's layout, read as wgmma's A
    # operand from shared memory (K-major: element (m, k) at start + (m/8)*SBO +
    # (k/8)*LBO + (m%8)*16 + (k%8)*2): thread i stores pieces c = i + 128 u.
    Q = rng.integers(0, 60000, size=(64, HD)).astype(np.uint16)
    sq = np.zeros(TILE // 2, dtype=np.uint16)
    seen = set()
    for u in range(HD // 16):
        addrs = []
        for i in range(128):
            c = i + 128 * u
            row, dp = ((c >> 3) // (HD // 8)) * 8 + (c & 7), (c >> 3) % (HD // 8)
            a = (row >> 3) * K_SBO + dp * 128 + (row & 7) * 16
            assert (row, dp) not in seen
            seen.add((row, dp)); addrs.append(a)
            sq[a // 2: a // 2 + 8] = Q[row, dp * 8: dp * 8 + 8]
        for q8 in range(16):
            a = addrs[8 * q8: 8 * q8 + 8]
            assert sorted(a) == list(range(min(a), min(a) + 128, 16)), ("ws q banks", HD, u, q8)
    assert len(seen) == 64 * HD // 8
    for ks in range(HD // 16):
        A = np.array([[sq[(ks * 256 + (m // 8) * K_SBO + (k // 8) * K_LBO + (m % 8) * 16 + (k % 8) * 2) // 2]
                       for k in range(16)] for m in range(64)])
        assert (A == Q[:, 16 * ks: 16 * ks + 16]).all(), ("ws Q", HD, ks)
    print("HD", HD, "ok: the warp-specialised consumers' Q in shared memory matches the wgmma A operand model")
    # The TMA design (head_dim 64 and 128, 128-key tiles): TMA writes box (KV block b,
    # 64-dim half h) into region h (BC x 128 bytes) at + 2048 b with the 128-byte swizzle
    # (16-byte chunk index XOR row, bits 4-6 ^= bits 7-9 of the offset from a 1024-byte
    # aligned base); wgmma reads the canonical 128B-swizzle layouts (PTX ISA / CUTLASS):
    # K-major K ((8,m),(T,2k)):((8T,SBO),(1,T)), MN-major V ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)),
    # the swizzle applied to the canonical address.
    if HD % 64 == 0:
        BCT = 128
        swz = lambda a: a ^ (((a >> 7) & 7) << 4)
        tma_addr = lambda key, dim: swz((dim // 64) * BCT * 128 + (key // 16) * 2048 + (key % 16) * 128 + (dim % 64) * 2)
        addrs = {tma_addr(key, dim) for key in range(BCT) for dim in range(HD)}
        assert len(addrs) == BCT * HD and max(addrs) < BCT * HD * 2, ("tma K tile", HD)
        for ks in range(HD // 16):
            start = (ks // 4) * BCT * 128 + (ks % 4) * 32
            for n in range(BCT):
                for k in range(16):
                    a = swz(start + (n % 8) * 128 + (n // 8) * 1024 + k * 2)
                    assert a == tma_addr(n, 16 * ks + k), ("tma K read", HD, ks, n, k)
        for kk in range(BCT // 16):
            start = kk * 2048
            for n in range(HD):
                for k in range(16):
                    a = swz(start + (n % 64) * 2 + (n // 64) * (BCT * 128) + (k % 8) * 128 + (k // 8) * 1024)
                    assert a == tma_addr(16 * kk + k, n), ("tma V read", HD, kk, n, k)
        print("HD", HD, "ok: TMA's swizzled K and V tiles match the wgmma 128B-swizzle operand model")

import numpy as np
rng = np.random.default_rng(1)
for HD in (64, 96, 128):
    BC = 64; PAD = HD + 8
    sK = rng.integers(0, 60000, size=(BC, PAD)).astype(np.uint16)
    sV = rng.integers(0, 60000, size=(BC, PAD)).astype(np.uint16)
    def ldsm(arr, rows_cols, trans):
        regs = np.zeros((32, 4, 2), dtype=np.uint16)
        for i in range(4):
            M = np.array([arr[r, c:c + 8] for (r, c) in rows_cols[8 * i: 8 * i + 8]])
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                regs[lane, i] = (M[2 * t, g], M[2 * t + 1, g]) if trans else (M[g, 2 * t], M[g, 2 * t + 1])
        return regs
    # S = Q K^T: B[k][n] = K[8jn + n][16ks + k]
    for jn in range(BC // 8):
        for ks in range(0, HD // 16, 2):
            rc = [(8 * jn + (lane & 7), 16 * ks + 8 * (lane >> 3)) for lane in range(32)]
            r = ldsm(sK, rc, False)
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for q, kstep in ((0, ks), (2, ks + 1)):
                    b0 = (sK[8 * jn + g, 16 * kstep + 2 * t], sK[8 * jn + g, 16 * kstep + 2 * t + 1])
                    b1 = (sK[8 * jn + g, 16 * kstep + 2 * t + 8], sK[8 * jn + g, 16 * kstep + 2 * t + 9])
                    assert tuple(r[lane, q]) == b0 and tuple(r[lane, q + 1]) == b1, (HD, jn, ks, lane)
    # O += P V: B[k][n] = V[16kk + k][8n + n']
    for kk in range(BC // 16):
        for n in range(0, HD // 8, 2):
            rc = [(16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1), 8 * (n + (lane >> 4))) for lane in range(32)]
            r = ldsm(sV, rc, True)
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for q, nt in ((0, n), (2, n + 1)):
                    b0 = (sV[16 * kk + 2 * t, 8 * nt + g], sV[16 * kk + 2 * t + 1, 8 * nt + g])
                    b1 = (sV[16 * kk + 2 * t + 8, 8 * nt + g], sV[16 * kk + 2 * t + 9, 8 * nt + g])
                    assert tuple(r[lane, q]) == b0 and tuple(r[lane, q + 1]) == b1, (HD, kk, n, lane)
    print("HD", HD, "ok: ldmatrix fragments match the mma.m16n8k16 B layout")
