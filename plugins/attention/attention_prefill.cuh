// Prefill attention (q_len > 1): one FlashAttention-2 style pass per (batch, query head, 128-query tile).
//
// Block: 4 warps; warp w owns query rows [32w, 32w + 32) of the tile (two m16 tiles). Per key/value tile of BN keys:
//   S = Q K^T on tensor cores (mma.m16n8k16, fp32 accumulate; Q and K fragments ldmatrix'ed from shared memory),
//   S *= scale * log2(e); masked entries (key >= kv_len, or causal key > row + kv_len - q_len) = -inf;
//   online softmax in registers (row max over the quad with two xor-shuffles, exp2, running sum);
//   P (rounded to T) stays in registers as the A operand of O += P V (V fragments ldmatrix.trans'ed).
// Memory pipeline (FlashAttention-2's, one buffer each for K and V): V_j is copied while S_j = Q K_j^T is
// computed, and K_{j+1} while the softmax and P V_j run; Q stays in shared memory for the whole pass.
// Causal: tiles wholly above the diagonal are never loaded; a warp whose 32 rows all precede a tile skips it; only
// tiles that cross the diagonal or the end of the keys pay for the mask. At the end O / l is rounded to T, staged
// through the warp's own rows of the Q tile and written with 16-byte coalesced stores.
#ifndef TRTGLM_ATTENTION_PREFILL_CUH
#define TRTGLM_ATTENTION_PREFILL_CUH

#include "attention_tile.cuh"

namespace trtglm
{
namespace attn
{

template <int D>
struct PrefillConfig
{
    static_assert(D == 64 || D == 128, "head_dim 64 or 128");
    static constexpr int kWarps = 4;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kRowsPerWarp = 32;                // two m16 tiles
    static constexpr int kBlockM = kWarps * kRowsPerWarp;  // 128 queries per block
    static constexpr int kBlockN = D == 64 ? 128 : 64;     // keys per tile (FlashAttention-2's sm80 choice)
    static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * D * 2; // Q, K, V tiles (2-byte elements)
};

// One block's work. bh = batch * q_heads + head (the index of the [q_len, D] slices of q and out), m_block: which
// 128-row tile of the queries. smem: PrefillConfig<D>::kSmemBytes bytes, 16-byte aligned.
template <int D, typename T>
__device__ __forceinline__ void prefillAttention(T const* __restrict__ q, T const* __restrict__ k,
    T const* __restrict__ v, T* __restrict__ out, int q_heads, int kv_heads, int q_len, int kv_len, float scale,
    bool causal, T* smem, int tid, int bh, int m_block)
{
    using Cfg = PrefillConfig<D>;
    constexpr int BM = Cfg::kBlockM;
    constexpr int BN = Cfg::kBlockN;
    constexpr int NT = Cfg::kThreads;
    constexpr int MT = 2;       // m16 tiles per warp
    constexpr int SN = BN / 8;  // n8 tiles of S
    constexpr int ON = D / 8;   // n8 tiles of O

    int const warp = tid >> 5;
    int const lane = tid & 31;
    int const g = lane >> 2;
    int const t = lane & 3;

    T* const sQ = smem;
    T* const sK = sQ + BM * D;
    T* const sV = sK + BN * D;

    int const b = bh / q_heads;
    int const h = bh - b * q_heads;
    int const kvh = h / (q_heads / kv_heads);
    int const m0 = m_block * BM;
    int const offset = kv_len - q_len; // causal: row i sees keys j <= i + offset
    int64_t const q_base = static_cast<int64_t>(bh) * q_len * D;
    int64_t const kv_base = (static_cast<int64_t>(b) * kv_heads + kvh) * kv_len * D;
    T const* const kh = k + kv_base;
    T const* const vh = v + kv_base;

    int const n_end = causal ? min(kv_len, m0 + BM + offset) : kv_len;
    int const n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;
    int const wrow0 = m0 + warp * Cfg::kRowsPerWarp; // this warp's first query row
    float const scale_log2 = scale * kLog2e;

    // Per-lane ldmatrix byte offsets inside the tiles (row & 7 == lane & 7 in all three patterns).
    int const sw = lane & 7;
    // Q (A operand): lanes 0-15 rows 0-15 at chunk 2kk, lanes 16-31 rows 0-15 at chunk 2kk+1.
    int const q_row = warp * Cfg::kRowsPerWarp + (lane & 15);
    int const q_chunk = lane >> 4;
    // K (B operand of Q K^T): matrices (keys 0-7, chunk 2kk), (keys 0-7, 2kk+1), (keys 8-15, 2kk), (keys 8-15, 2kk+1).
    int const k_row = (lane & 7) + ((lane >> 4) << 3);
    int const k_chunk = (lane >> 3) & 1;
    // V (B operand of P V, transposed): (keys 0-7, chunk 2dp), (keys 8-15, 2dp), (keys 0-7, 2dp+1), (keys 8-15, 2dp+1).
    int const v_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    int const v_chunk = lane >> 4;

    uint32_t const sQa = smemAddress(sQ);
    uint32_t const sKa = smemAddress(sK);
    uint32_t const sVa = smemAddress(sV);

    float o[MT][ON][4];
    float row_max[MT][2];
    float row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
    {
#pragma unroll
        for (int j = 0; j < ON; ++j)
        {
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                o[mt][j][e] = 0.f;
            }
        }
        row_max[mt][0] = row_max[mt][1] = kNegInf;
        row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }

    if (n_tiles > 0)
    {
        loadTile<BM, D, NT>(sQ, q + q_base + static_cast<int64_t>(m0) * D, q_len - m0, tid);
        loadTile<BN, D, NT>(sK, kh, kv_len, tid);
        cpAsyncCommit();
    }

    for (int j = 0; j < n_tiles; ++j)
    {
        int const n0 = j * BN;
        // A warp works on a tile unless all its rows are padding or (causal) all precede the tile's first key.
        bool const active = wrow0 < q_len && (!causal || n0 <= wrow0 + Cfg::kRowsPerWarp - 1 + offset);

        cpAsyncWait<0>(); // K_j (and Q) landed
        syncBlock();      // ... for every thread; and everyone is done with V_{j-1}
        loadTile<BN, D, NT>(sV, vh + static_cast<int64_t>(n0) * D, kv_len - n0, tid);
        cpAsyncCommit();

        float s[MT][SN][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
        {
#pragma unroll
            for (int n = 0; n < SN; ++n)
            {
#pragma unroll
                for (int e = 0; e < 4; ++e)
                {
                    s[mt][n][e] = 0.f;
                }
            }
        }
        if (active)
        {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
            {
                uint32_t qa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                {
                    int const row = q_row + mt * 16;
                    ldmatrixX4(qa[mt], sQa + 2 * (row * D + (((2 * kk + q_chunk) ^ sw) << 3)));
                }
#pragma unroll
                for (int np = 0; np < BN / 16; ++np)
                {
                    uint32_t kb[4];
                    int const row = np * 16 + k_row;
                    ldmatrixX4(kb, sKa + 2 * (row * D + (((2 * kk + k_chunk) ^ sw) << 3)));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                    {
                        Mma<T>::run(s[mt][2 * np], qa[mt], kb[0], kb[1]);
                        Mma<T>::run(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
                    }
                }
            }
        }

        cpAsyncWait<0>(); // V_j landed
        syncBlock();      // ... for every thread; and everyone is done with K_j
        if (j + 1 < n_tiles)
        {
            int const n1 = n0 + BN;
            loadTile<BN, D, NT>(sK, kh + static_cast<int64_t>(n1) * D, kv_len - n1, tid);
            cpAsyncCommit();
        }
        if (!active)
        {
            continue;
        }

        // Scale into the log2 domain, then mask the keys past the end and (causal) past each row's diagonal.
        bool const need_mask = n0 + BN > kv_len || (causal && n0 + BN - 1 > wrow0 + offset);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
        {
#pragma unroll
            for (int n = 0; n < SN; ++n)
            {
#pragma unroll
                for (int e = 0; e < 4; ++e)
                {
                    float x = s[mt][n][e] * scale_log2;
                    if (need_mask)
                    {
                        int const key = n0 + n * 8 + 2 * t + (e & 1);
                        int const row = wrow0 + mt * 16 + g + ((e >> 1) << 3);
                        if (key >= kv_len || (causal && key > row + offset))
                        {
                            x = kNegInf;
                        }
                    }
                    s[mt][n][e] = x;
                }
            }
        }

        // Online softmax: rows (mt, hh) are g + 8 hh of m-tile mt; the 4 lanes of a quad share a row.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
        {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh)
            {
                float mx = kNegInf;
#pragma unroll
                for (int n = 0; n < SN; ++n)
                {
                    mx = fmaxf(mx, fmaxf(s[mt][n][2 * hh], s[mt][n][2 * hh + 1]));
                }
                mx = fmaxf(mx, shflXor(mx, 1));
                mx = fmaxf(mx, shflXor(mx, 2));
                float const m_new = fmaxf(row_max[mt][hh], mx);
                float const m_base = m_new == kNegInf ? 0.f : m_new; // a row with no key yet: avoid -inf - -inf
                float const alpha = exp2Fast(row_max[mt][hh] - m_base);
                row_max[mt][hh] = m_new;
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < SN; ++n)
                {
#pragma unroll
                    for (int e = 2 * hh; e < 2 * hh + 2; ++e)
                    {
                        float const p = exp2Fast(s[mt][n][e] - m_base);
                        s[mt][n][e] = p;
                        sum += p;
                    }
                }
                row_sum[mt][hh] = row_sum[mt][hh] * alpha + sum;
#pragma unroll
                for (int n = 0; n < ON; ++n)
                {
                    o[mt][n][2 * hh] *= alpha;
                    o[mt][n][2 * hh + 1] *= alpha;
                }
            }
        }

        // O += P V: the S accumulators of n8 tiles 2kk, 2kk+1 are exactly the A fragment of k16 step kk.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
        {
            uint32_t pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
            {
                pa[mt][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp)
            {
                uint32_t vb[4];
                int const row = kk * 16 + v_row;
                ldmatrixX4Trans(vb, sVa + 2 * (row * D + (((2 * dp + v_chunk) ^ sw) << 3)));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                {
                    Mma<T>::run(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
                    Mma<T>::run(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
    }
    cpAsyncWait<0>();
    syncBlock(); // no copy in flight, nobody reads the Q tile any more

    // Epilogue: O / l rounded to T into this warp's own 32 rows of the Q tile, then 16-byte stores of whole rows.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
    {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
        {
            float l = row_sum[mt][hh];
            l += shflXor(l, 1);
            l += shflXor(l, 2);
            float const inv = l > 0.f ? 1.f / l : 0.f;
            int const row = warp * Cfg::kRowsPerWarp + mt * 16 + g + 8 * hh;
#pragma unroll
            for (int n = 0; n < ON; ++n)
            {
                uint32_t const packed = Mma<T>::pack(o[mt][n][2 * hh] * inv, o[mt][n][2 * hh + 1] * inv);
                *reinterpret_cast<uint32_t*>(sQ + swizzle<D>(row, n) + 2 * t) = packed;
            }
        }
    }
    syncWarp();
    constexpr int kChunks = D / 8;
#pragma unroll
    for (int i = 0; i < Cfg::kRowsPerWarp * kChunks / 32; ++i)
    {
        int const idx = lane + i * 32;
        int const r = idx / kChunks;
        int const c = idx % kChunks;
        int const row = wrow0 + r;
        if (row < q_len)
        {
            *reinterpret_cast<uint4*>(out + q_base + static_cast<int64_t>(row) * D + c * 8)
                = *reinterpret_cast<uint4 const*>(sQ + swizzle<D>(warp * Cfg::kRowsPerWarp + r, c));
        }
    }
}

} // namespace attn
} // namespace trtglm

#endif // TRTGLM_ATTENTION_PREFILL_CUH
