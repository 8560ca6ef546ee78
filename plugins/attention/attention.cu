// Attention: softmax(scale * Q K^T + causal mask) V, grouped-query, head_dim 64 or 128, fp16 / bf16 with fp32
// accumulation (launchAttention and attentionWorkspaceSize in common/kernels.h, and the flat entry points below).
// Prefill (q_len > 1): attention_prefill.cuh, a FlashAttention-2 style tiled kernel on tensor cores. Decode
// (q_len == 1): attention_decode.cuh, flash-decoding (the keys split across blocks, then a combine kernel).
//
// Flat entry points (extern "C" __global__; TensorRT AOT argument order: inputs, int32 scalars, outputs).
// <d> is d64 | d128 (head_dim D), <dt> is f16 | bf16 (T = __half | __nv_bfloat16); scale travels as the IEEE-754
// bits of a float in an int32; causal is 0 or 1. Layouts: q, out [batch, q_heads, q_len, D]; k, v [batch,
// kv_heads, kv_len, D]; all contiguous, 16-byte aligned. q_heads a multiple of kv_heads; causal needs
// kv_len >= q_len (query i sees keys j <= i + kv_len - q_len).
//
//   trtglm_attention_prefill_<d>_<dt> (T* q, T* k, T* v, batch, q_heads, kv_heads, q_len, kv_len, scale, causal,
//                                      T* out)
//       grid  = (batch * q_heads, ceil(q_len / 128), 1), block = (128, 1, 1)
//       dynamic shared memory = 49152 bytes (d64) | 65536 bytes (d128)   [(128 + 2 * BN) * D * 2, BN = 128 | 64]
//       (above 48 KiB: raise cudaFuncAttributeMaxDynamicSharedMemorySize first)
//   trtglm_attention_decode_<d>_<dt>  (T* q, T* k, T* v, batch, q_heads, kv_heads, kv_len, scale, num_splits,
//                                      float* partial, T* out)                                       [q_len == 1]
//       grid  = (batch * kv_heads * ceil(q_heads / kv_heads / 16), num_splits, 1), block = (128, 1, 1)
//       dynamic shared memory = 32768 bytes (d64) | 65536 bytes (d128)   [4 warps * 2 stages * 2 * 16 * D * 2]
//       num_splits == 1: writes out (partial unused, may be null); else writes partial (the workspace,
//       num_splits * batch * q_heads * (D + 2) floats) and the combine kernel must follow.
//   trtglm_attention_decode1_<d>_<dt> (T* q, T* k, T* v, batch, q_heads, kv_heads, kv_len, scale, T* out)
//       the decode kernel with one split and no workspace (TensorRT's AOT plugins launch one kernel and have no
//       workspace): grid = (batch * kv_heads * ceil(q_heads / kv_heads / 16), 1, 1), the rest as decode
//   trtglm_attention_combine_<d>_<dt> (float* partial, batch, q_heads, num_splits, T* out)
//       grid  = (ceil(batch * q_heads / 4), 1, 1), block = (128, 1, 1), dynamic shared memory = 0
//
// 16 entry points in all (4 kernels x 2 head dims x 2 dtypes). launchAttention launches exactly these; the decode
// kernel is correct for any num_splits >= 1 (chunks of ceil(kv_len / num_splits) keys rounded up to 64, empty
// chunks allowed); launchAttention picks num_splits = min(512 / grid.x, ceil(kv_len / 128), 128), at least 1.
//
// Design (sm_80 and sm_90; mma.sync.m16n8k16 with fp32 accumulation, ldmatrix, cp.async; no sm_90-only features):
//   prefill: 128 queries per block, 4 warps of 32 rows, K/V tiles of BN keys through XOR-swizzled shared memory,
//     FlashAttention-2's pipeline (V_j copied during Q K_j^T, K_{j+1} during softmax and P V_j), online softmax in
//     registers with exp2 and scale * log2(e) folded in, causal tiles above the diagonal skipped, the last query
//     tile's blocks launched first (they have the most keys under a causal mask).
//   decode: the up-to-16 query heads of a GQA group are the 16 rows of one mma tile, so K and V are read once per
//     group; 4 warps with private 2-stage cp.async pipelines over 16-key tiles; warps merged in shared memory.
#include "common/kernels.h"

#include "attention/attention_decode.cuh"
#include "attention/attention_prefill.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace trtglm
{
namespace attn
{

template <int D, typename T>
__device__ __forceinline__ void prefillEntry(T const* q, T const* k, T const* v, int32_t batch, int32_t q_heads,
    int32_t kv_heads, int32_t q_len, int32_t kv_len, int32_t scale_bits, int32_t causal, T* out)
{
    extern __shared__ uint4 attnSmem[];
    if (static_cast<int64_t>(blockIdx.x) >= static_cast<int64_t>(batch) * q_heads)
    {
        return;
    }
    // Largest m_block first: under a causal mask it has the most keys, so the longest blocks start earliest.
    prefillAttention<D, T>(q, k, v, out, q_heads, kv_heads, q_len, kv_len, __int_as_float(scale_bits), causal != 0,
        reinterpret_cast<T*>(attnSmem), static_cast<int>(threadIdx.x), static_cast<int>(blockIdx.x),
        static_cast<int>(gridDim.y - 1 - blockIdx.y));
}

template <int D, typename T>
__device__ __forceinline__ void decodeEntry(T const* q, T const* k, T const* v, int32_t batch, int32_t q_heads,
    int32_t kv_heads, int32_t kv_len, int32_t scale_bits, int32_t num_splits, float* partial, T* out)
{
    extern __shared__ uint4 attnSmem[];
    decodeAttention<D, T>(q, k, v, partial, out, batch, q_heads, kv_heads, kv_len, __int_as_float(scale_bits),
        num_splits, reinterpret_cast<T*>(attnSmem), static_cast<int>(threadIdx.x), static_cast<int>(blockIdx.x),
        static_cast<int>(blockIdx.y));
}

} // namespace attn
} // namespace trtglm

#define TRTGLM_ATTENTION_ENTRIES(D, DT, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(trtglm::attn::PrefillConfig<D>::kThreads)                             \
        trtglm_attention_prefill_d##D##_##DT(T const* q, T const* k, T const* v, int32_t batch, int32_t q_heads,       \
            int32_t kv_heads, int32_t q_len, int32_t kv_len, int32_t scale_bits, int32_t causal, T* out)               \
    {                                                                                                                  \
        trtglm::attn::prefillEntry<D, T>(q, k, v, batch, q_heads, kv_heads, q_len, kv_len, scale_bits, causal, out);   \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(trtglm::attn::DecodeConfig<D>::kThreads)                              \
        trtglm_attention_decode_d##D##_##DT(T const* q, T const* k, T const* v, int32_t batch, int32_t q_heads,        \
            int32_t kv_heads, int32_t kv_len, int32_t scale_bits, int32_t num_splits, float* partial, T* out)          \
    {                                                                                                                  \
        trtglm::attn::decodeEntry<D, T>(                                                                               \
            q, k, v, batch, q_heads, kv_heads, kv_len, scale_bits, num_splits, partial, out);                          \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(trtglm::attn::DecodeConfig<D>::kThreads)                              \
        trtglm_attention_decode1_d##D##_##DT(T const* q, T const* k, T const* v, int32_t batch, int32_t q_heads,       \
            int32_t kv_heads, int32_t kv_len, int32_t scale_bits, T* out)                                              \
    {                                                                                                                  \
        trtglm::attn::decodeEntry<D, T>(q, k, v, batch, q_heads, kv_heads, kv_len, scale_bits, 1, nullptr, out);       \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * trtglm::attn::kCombineWarps)                                     \
        trtglm_attention_combine_d##D##_##DT(                                                                          \
            float const* partial, int32_t batch, int32_t q_heads, int32_t num_splits, T* out)                          \
    {                                                                                                                  \
        trtglm::attn::combineAttention<D, T>(partial, out, static_cast<int64_t>(batch) * q_heads, num_splits,          \
            static_cast<int>(threadIdx.x), static_cast<int>(blockIdx.x));                                              \
    }

TRTGLM_ATTENTION_ENTRIES(64, f16, __half)
TRTGLM_ATTENTION_ENTRIES(64, bf16, __nv_bfloat16)
TRTGLM_ATTENTION_ENTRIES(128, f16, __half)
TRTGLM_ATTENTION_ENTRIES(128, bf16, __nv_bfloat16)

#undef TRTGLM_ATTENTION_ENTRIES

namespace trtglm
{
namespace
{

constexpr int kDecodeTargetBlocks = 512; // about 4 resident decode blocks on each of 132 SMs
constexpr int kDecodeMinChunk = 128;     // keys per split at least (each split writes 16 x D fp32 partials)
constexpr int kDecodeMaxSplits = 128;

int64_t ceilDiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

int64_t decodeHeadBlocks(int64_t batch, AttentionParams const& p)
{
    int64_t const group = p.q_heads / p.kv_heads;
    return batch * p.kv_heads * ceilDiv(group, attn::DecodeConfig<64>::kHeads);
}

int decodeSplits(int64_t batch, int64_t kv_len, AttentionParams const& p)
{
    int64_t const blocks = decodeHeadBlocks(batch, p);
    int64_t const by_grid = kDecodeTargetBlocks / std::max<int64_t>(blocks, 1);
    int64_t const by_len = ceilDiv(kv_len, kDecodeMinChunk);
    return static_cast<int>(std::max<int64_t>(1, std::min({by_grid, by_len, int64_t{kDecodeMaxSplits}})));
}

size_t decodeWorkspace(int64_t batch, int64_t kv_len, AttentionParams const& p)
{
    int const splits = decodeSplits(batch, kv_len, p);
    if (splits <= 1)
    {
        return 0;
    }
    return static_cast<size_t>(splits) * batch * p.q_heads * (p.head_dim + 2) * sizeof(float);
}

bool shapesValid(AttentionParams const& p)
{
    return p.batch >= 0 && p.q_heads > 0 && p.kv_heads > 0 && p.q_heads % p.kv_heads == 0 && p.q_len >= 1
        && p.kv_len >= 1 && (p.head_dim == 64 || p.head_dim == 128) && (!p.causal || p.kv_len >= p.q_len);
}

template <typename Kernel>
cudaError_t allowSmem(Kernel kernel, int bytes)
{
    return bytes > 48 * 1024 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)
                             : cudaSuccess;
}

template <int D, typename T, typename Prefill, typename Decode, typename Combine>
cudaError_t launch(AttentionParams const& p, Prefill prefill, Decode decode, Combine combine, cudaStream_t stream)
{
    T const* q = static_cast<T const*>(p.q);
    T const* k = static_cast<T const*>(p.k);
    T const* v = static_cast<T const*>(p.v);
    T* out = static_cast<T*>(p.out);
    int32_t scale_bits;
    static_assert(sizeof(scale_bits) == sizeof(p.scale), "float is 32 bits");
    std::memcpy(&scale_bits, &p.scale, sizeof(scale_bits));

    if (p.q_len > 1)
    {
        using Cfg = attn::PrefillConfig<D>;
        cudaError_t err = allowSmem(prefill, Cfg::kSmemBytes);
        if (err != cudaSuccess)
        {
            return err;
        }
        dim3 const grid(static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.q_heads),
            static_cast<unsigned>(ceilDiv(p.q_len, Cfg::kBlockM)));
        prefill<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
            q, k, v, p.batch, p.q_heads, p.kv_heads, p.q_len, p.kv_len, scale_bits, p.causal ? 1 : 0, out);
        return cudaGetLastError();
    }

    using Cfg = attn::DecodeConfig<D>;
    int const splits = decodeSplits(p.batch, p.kv_len, p);
    float* partial = static_cast<float*>(p.workspace);
    if (splits > 1 && partial == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    cudaError_t err = allowSmem(decode, Cfg::kSmemBytes);
    if (err != cudaSuccess)
    {
        return err;
    }
    dim3 const grid(static_cast<unsigned>(decodeHeadBlocks(p.batch, p)), static_cast<unsigned>(splits));
    decode<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
        q, k, v, p.batch, p.q_heads, p.kv_heads, p.kv_len, scale_bits, splits, partial, out);
    if (splits > 1)
    {
        err = cudaGetLastError();
        if (err != cudaSuccess)
        {
            return err;
        }
        int64_t const rows = static_cast<int64_t>(p.batch) * p.q_heads;
        combine<<<static_cast<unsigned>(ceilDiv(rows, attn::kCombineWarps)), 32 * attn::kCombineWarps, 0, stream>>>(
            partial, p.batch, p.q_heads, splits, out);
    }
    return cudaGetLastError();
}

} // namespace

size_t attentionWorkspaceSize(AttentionParams const& p)
{
    if (p.q_len != 1 || !shapesValid(p) || p.batch == 0)
    {
        return 0;
    }
    // The largest need over every batch' <= batch (kv_len' <= kv_len needs no more: the splits only grow with
    // kv_len), so a TensorRT plugin may ask with its profile's largest shapes.
    size_t bytes = 0;
    for (int64_t b = 1; b <= p.batch; ++b)
    {
        bytes = std::max(bytes, decodeWorkspace(b, p.kv_len, p));
        if (decodeSplits(b, p.kv_len, p) == 1)
        {
            break; // larger batches split no more
        }
    }
    return bytes;
}

cudaError_t launchAttention(AttentionParams const& p, cudaStream_t stream)
{
    if (!shapesValid(p) || p.q == nullptr || p.k == nullptr || p.v == nullptr || p.out == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0)
    {
        return cudaSuccess;
    }
    switch (p.dtype)
    {
    case DType::kHALF:
        return p.head_dim == 64
            ? launch<64, __half>(p, trtglm_attention_prefill_d64_f16, trtglm_attention_decode_d64_f16,
                trtglm_attention_combine_d64_f16, stream)
            : launch<128, __half>(p, trtglm_attention_prefill_d128_f16, trtglm_attention_decode_d128_f16,
                trtglm_attention_combine_d128_f16, stream);
    case DType::kBF16:
        return p.head_dim == 64
            ? launch<64, __nv_bfloat16>(p, trtglm_attention_prefill_d64_bf16, trtglm_attention_decode_d64_bf16,
                trtglm_attention_combine_d64_bf16, stream)
            : launch<128, __nv_bfloat16>(p, trtglm_attention_prefill_d128_bf16, trtglm_attention_decode_d128_bf16,
                trtglm_attention_combine_d128_bf16, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace trtglm
