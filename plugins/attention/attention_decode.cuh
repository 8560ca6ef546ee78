// Decode attention (q_len == 1) against a KV cache: flash-decoding.
//
// The keys of one (batch, kv head) are cut into num_splits chunks of `chunk` keys (a multiple of 64), one block
// per (batch, kv head, group of up to 16 query heads, chunk). The query heads of a GQA group share their K/V, so a
// block computes all of them at once on tensor cores: the (up to) 16 query vectors are the 16 rows of the mma's A
// operand (missing heads are zero rows), 16 keys are one n16 step:
//   S (16 heads x 16 keys) = Q K^T, online softmax per head, O (16 x D) += P V.
// Each of the 4 warps takes every 4th 16-key tile of the chunk and streams it through its own two-stage cp.async
// pipeline (no block barrier in the loop; the copy of tile i+4 overlaps the math of tile i). At the end the warps
// merge their (max, sum, O) through shared memory, and the block writes either the output (num_splits == 1) or
// the chunk's partial result to the workspace:
//   partial_o  [num_splits, batch * q_heads, D] fp32: the chunk's softmax-weighted mean of V (O / l),
//   partial_ml [num_splits, batch * q_heads] float2:  (m, l), m = max of scale * log2(e) * q.k, l = sum 2^(x - m)
// (partial_ml follows partial_o in the workspace). The combine kernel then merges the chunks per query head:
//   out = sum_s w_s o_s / sum_s w_s, w_s = l_s 2^(m_s - max_s m_s).
#ifndef TRTGLM_ATTENTION_DECODE_CUH
#define TRTGLM_ATTENTION_DECODE_CUH

#include "attention_tile.cuh"

namespace trtglm
{
namespace attn
{

template <int D>
struct DecodeConfig
{
    static_assert(D == 64 || D == 128, "head_dim 64 or 128");
    static constexpr int kWarps = 4;
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kHeads = 16;                        // query heads per block (the mma's M)
    static constexpr int kKeys = 16;                         // keys per warp tile (the mma's K of P V)
    static constexpr int kStages = 2;                        // cp.async stages per warp
    static constexpr int kChunkAlign = kWarps * kKeys;       // a chunk is a multiple of this many keys
    static constexpr int kStageElems = 2 * kKeys * D;        // K then V tile
    static constexpr int kOStride = D + 8;                   // fp32 row stride of the merge buffer (fewer conflicts)
    static constexpr int kSmemBytes = kWarps * kStages * kStageElems * 2;
    static_assert(kWarps * kHeads * kOStride * 4 + 2 * kWarps * kHeads * 4 <= kSmemBytes, "merge buffer fits");
};

// Keys per split, shared by the kernels and the host: ceil(kv_len / num_splits) rounded up to a multiple of 64.
__host__ __device__ __forceinline__ int decodeChunk(int kv_len, int num_splits)
{
    int const per = (kv_len + num_splits - 1) / num_splits;
    int const align = DecodeConfig<64>::kChunkAlign;
    return (per + align - 1) / align * align;
}

// One block's work. head_block = (batch * kv_heads + kv head) * ceil(group / 16) + head group; split: the chunk.
// smem: DecodeConfig<D>::kSmemBytes bytes, 16-byte aligned. partial: the workspace (unused if num_splits == 1).
template <int D, typename T>
__device__ __forceinline__ void decodeAttention(T const* __restrict__ q, T const* __restrict__ k,
    T const* __restrict__ v, float* __restrict__ partial, T* __restrict__ out, int batch, int q_heads, int kv_heads,
    int kv_len, float scale, int num_splits, T* smem, int tid, int head_block, int split)
{
    using Cfg = DecodeConfig<D>;
    constexpr int KEYS = Cfg::kKeys;
    constexpr int ON = D / 8; // n8 tiles of O

    int const warp = tid >> 5;
    int const lane = tid & 31;
    int const g = lane >> 2;
    int const t = lane & 3;

    int const group = q_heads / kv_heads;
    int const head_groups = (group + Cfg::kHeads - 1) / Cfg::kHeads;
    int const hg = head_block % head_groups;
    int const bk = head_block / head_groups; // batch * kv_heads + kv head
    int const b = bk / kv_heads;
    int const kvh = bk - b * kv_heads;
    int const n_heads = min(Cfg::kHeads, group - hg * Cfg::kHeads);
    int const row0 = b * q_heads + kvh * group + hg * Cfg::kHeads; // first query row in [batch * q_heads]

    int const chunk = decodeChunk(kv_len, num_splits);
    int const key_begin = min(kv_len, split * chunk);
    int const key_end = min(kv_len, key_begin + chunk);
    int const n_tiles = (key_end - key_begin + KEYS - 1) / KEYS;
    float const scale_log2 = scale * kLog2e;

    // Q as the A operand, straight from global memory (16 rows of D, read once): rows g and g + 8.
    uint32_t qa[D / 16][4];
    {
        T const* const q0 = q + static_cast<int64_t>(row0) * D;
        bool const lo = g < n_heads;
        bool const hi = g + 8 < n_heads;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
        {
            int const col = kk * 16 + 2 * t;
            qa[kk][0] = lo ? *reinterpret_cast<uint32_t const*>(q0 + g * D + col) : 0u;
            qa[kk][1] = hi ? *reinterpret_cast<uint32_t const*>(q0 + (g + 8) * D + col) : 0u;
            qa[kk][2] = lo ? *reinterpret_cast<uint32_t const*>(q0 + g * D + col + 8) : 0u;
            qa[kk][3] = hi ? *reinterpret_cast<uint32_t const*>(q0 + (g + 8) * D + col + 8) : 0u;
        }
    }

    float o[ON][4];
#pragma unroll
    for (int n = 0; n < ON; ++n)
    {
#pragma unroll
        for (int e = 0; e < 4; ++e)
        {
            o[n][e] = 0.f;
        }
    }
    float row_max[2] = {kNegInf, kNegInf};
    float row_sum[2] = {0.f, 0.f};

    int64_t const kv_base = static_cast<int64_t>(bk) * kv_len * D;
    T* const stages = smem + warp * Cfg::kStages * Cfg::kStageElems;
    int const sw = lane & 7;
    int const k_row = (lane & 7) + ((lane >> 4) << 3);        // see attention_prefill.cuh
    int const k_chunk = (lane >> 3) & 1;
    int const v_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    int const v_chunk = lane >> 4;

    auto issue = [&](int tile, int stage)
    {
        int const key0 = key_begin + tile * KEYS;
        T* const sk = stages + stage * Cfg::kStageElems;
        loadTile<KEYS, D, 32>(sk, k + kv_base + static_cast<int64_t>(key0) * D, key_end - key0, lane);
        loadTile<KEYS, D, 32>(sk + KEYS * D, v + kv_base + static_cast<int64_t>(key0) * D, key_end - key0, lane);
        cpAsyncCommit();
    };

    if (warp < n_tiles)
    {
        issue(warp, 0);
    }
    for (int it = 0;; ++it)
    {
        int const tile = warp + it * Cfg::kWarps;
        if (tile >= n_tiles)
        {
            break;
        }
        if (tile + Cfg::kWarps < n_tiles)
        {
            issue(tile + Cfg::kWarps, (it + 1) % Cfg::kStages);
            cpAsyncWait<1>();
        }
        else
        {
            cpAsyncWait<0>();
        }
        syncWarp(); // every lane's copies of this tile landed

        int const key0 = key_begin + tile * KEYS;
        T const* const sk = stages + (it % Cfg::kStages) * Cfg::kStageElems;
        uint32_t const sKa = smemAddress(sk);
        uint32_t const sVa = smemAddress(sk + KEYS * D);

        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
        {
            uint32_t kb[4];
            ldmatrixX4(kb, sKa + 2 * (k_row * D + (((2 * kk + k_chunk) ^ sw) << 3)));
            Mma<T>::run(s[0], qa[kk], kb[0], kb[1]);
            Mma<T>::run(s[1], qa[kk], kb[2], kb[3]);
        }
        bool const need_mask = key0 + KEYS > key_end;
#pragma unroll
        for (int n = 0; n < 2; ++n)
        {
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                float x = s[n][e] * scale_log2;
                if (need_mask && key0 + n * 8 + 2 * t + (e & 1) >= key_end)
                {
                    x = kNegInf;
                }
                s[n][e] = x;
            }
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
        {
            float mx = fmaxf(fmaxf(s[0][2 * hh], s[0][2 * hh + 1]), fmaxf(s[1][2 * hh], s[1][2 * hh + 1]));
            mx = fmaxf(mx, shflXor(mx, 1));
            mx = fmaxf(mx, shflXor(mx, 2));
            float const m_new = fmaxf(row_max[hh], mx);
            float const m_base = m_new == kNegInf ? 0.f : m_new;
            float const alpha = exp2Fast(row_max[hh] - m_base);
            row_max[hh] = m_new;
            float sum = 0.f;
#pragma unroll
            for (int n = 0; n < 2; ++n)
            {
#pragma unroll
                for (int e = 2 * hh; e < 2 * hh + 2; ++e)
                {
                    float const p = exp2Fast(s[n][e] - m_base);
                    s[n][e] = p;
                    sum += p;
                }
            }
            row_sum[hh] = row_sum[hh] * alpha + sum;
#pragma unroll
            for (int n = 0; n < ON; ++n)
            {
                o[n][2 * hh] *= alpha;
                o[n][2 * hh + 1] *= alpha;
            }
        }
        uint32_t pa[4];
        pa[0] = Mma<T>::pack(s[0][0], s[0][1]);
        pa[1] = Mma<T>::pack(s[0][2], s[0][3]);
        pa[2] = Mma<T>::pack(s[1][0], s[1][1]);
        pa[3] = Mma<T>::pack(s[1][2], s[1][3]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp)
        {
            uint32_t vb[4];
            ldmatrixX4Trans(vb, sVa + 2 * (v_row * D + (((2 * dp + v_chunk) ^ sw) << 3)));
            Mma<T>::run(o[2 * dp], pa, vb[0], vb[1]);
            Mma<T>::run(o[2 * dp + 1], pa, vb[2], vb[3]);
        }
        syncWarp(); // every lane is done with this stage before it is refilled
    }

    // Merge the 4 warps: (m, l) per head and the unnormalized O, through shared memory (reusing the stages).
    syncBlock();
    float* const sO = reinterpret_cast<float*>(smem);
    float* const sM = sO + Cfg::kWarps * Cfg::kHeads * Cfg::kOStride;
    float* const sL = sM + Cfg::kWarps * Cfg::kHeads;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
    {
        float l = row_sum[hh];
        l += shflXor(l, 1);
        l += shflXor(l, 2);
        int const r = warp * Cfg::kHeads + g + 8 * hh;
        if (t == 0)
        {
            sM[r] = row_max[hh];
            sL[r] = l;
        }
#pragma unroll
        for (int n = 0; n < ON; ++n)
        {
            *reinterpret_cast<float2*>(sO + r * Cfg::kOStride + n * 8 + 2 * t)
                = make_float2(o[n][2 * hh], o[n][2 * hh + 1]);
        }
    }
    syncBlock();

    int64_t const rows = static_cast<int64_t>(batch) * q_heads;
    for (int idx = tid; idx < n_heads * (D / 4); idx += Cfg::kThreads)
    {
        int const r = idx / (D / 4);
        int const d = (idx % (D / 4)) * 4;
        float m = kNegInf;
#pragma unroll
        for (int w = 0; w < Cfg::kWarps; ++w)
        {
            m = fmaxf(m, sM[w * Cfg::kHeads + r]);
        }
        float l = 0.f;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int w = 0; w < Cfg::kWarps; ++w)
        {
            float const mw = sM[w * Cfg::kHeads + r];
            float const weight = mw == kNegInf ? 0.f : exp2Fast(mw - m);
            l += sL[w * Cfg::kHeads + r] * weight;
            float4 const ow = *reinterpret_cast<float4 const*>(sO + (w * Cfg::kHeads + r) * Cfg::kOStride + d);
            acc[0] += ow.x * weight;
            acc[1] += ow.y * weight;
            acc[2] += ow.z * weight;
            acc[3] += ow.w * weight;
        }
        float const inv = l > 0.f ? 1.f / l : 0.f;
        int64_t const row = row0 + r;
        if (num_splits == 1)
        {
            uint2 packed;
            packed.x = Mma<T>::pack(acc[0] * inv, acc[1] * inv);
            packed.y = Mma<T>::pack(acc[2] * inv, acc[3] * inv);
            *reinterpret_cast<uint2*>(out + row * D + d) = packed;
        }
        else
        {
            int64_t const slot = split * rows + row;
            *reinterpret_cast<float4*>(partial + slot * D + d)
                = make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
            if (d == 0)
            {
                reinterpret_cast<float2*>(partial + num_splits * rows * D)[slot] = make_float2(m, l);
            }
        }
    }
}

// Merge the num_splits partial results of each query row (one warp per row of [batch * q_heads]).
constexpr int kCombineWarps = 4;

template <int D, typename T>
__device__ __forceinline__ void combineAttention(
    float const* __restrict__ partial, T* __restrict__ out, int64_t rows, int num_splits, int tid, int block)
{
    constexpr int V = D / 32; // values per lane: 2 or 4
    int const lane = tid & 31;
    int64_t const row = static_cast<int64_t>(block) * kCombineWarps + (tid >> 5);
    if (row >= rows)
    {
        return;
    }
    float2 const* const ml = reinterpret_cast<float2 const*>(partial + num_splits * rows * D);
    float m = kNegInf;
    for (int s = lane; s < num_splits; s += 32)
    {
        m = fmaxf(m, ml[s * rows + row].x);
    }
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1)
    {
        m = fmaxf(m, shflXor(m, mask));
    }
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i)
    {
        acc[i] = 0.f;
    }
    float l = 0.f;
    for (int s = 0; s < num_splits; ++s)
    {
        float2 const e = ml[s * rows + row];
        float const weight = e.y > 0.f ? e.y * exp2Fast(e.x - m) : 0.f; // an empty chunk has l == 0
        l += weight;
        float const* const po = partial + (s * rows + row) * D + lane * V;
        float vals[V];
        if constexpr (V == 4)
        {
            float4 const x = *reinterpret_cast<float4 const*>(po);
            vals[0] = x.x;
            vals[1] = x.y;
            vals[2] = x.z;
            vals[3] = x.w;
        }
        else
        {
            float2 const x = *reinterpret_cast<float2 const*>(po);
            vals[0] = x.x;
            vals[1] = x.y;
        }
#pragma unroll
        for (int i = 0; i < V; ++i)
        {
            acc[i] += weight * vals[i];
        }
    }
    float const inv = l > 0.f ? 1.f / l : 0.f;
    T* const dst = out + row * D + lane * V;
    if constexpr (V == 4)
    {
        uint2 packed;
        packed.x = Mma<T>::pack(acc[0] * inv, acc[1] * inv);
        packed.y = Mma<T>::pack(acc[2] * inv, acc[3] * inv);
        *reinterpret_cast<uint2*>(dst) = packed;
    }
    else
    {
        *reinterpret_cast<uint32_t*>(dst) = Mma<T>::pack(acc[0] * inv, acc[1] * inv);
    }
}

} // namespace attn
} // namespace trtglm

#endif // TRTGLM_ATTENTION_DECODE_CUH
