// Rotary position embedding on Q and K in one launch (launchRotary in common/kernels.h, and the flat entry points
// below). Only the first rotary_dim channels of each head rotate (GLM: head_dim / 2; Llama: head_dim); the other
// head_dim - rotary_dim channels are copied (skipped when the output is the input: in place).
//
// Flat entry points (extern "C" __global__; TensorRT AOT argument order: inputs, int32 scalars, outputs).
// <dt> is f32 | f16 | bf16 (T = float | __half | __nv_bfloat16); cos and sin are fp32.
//
//   trtglm_rotary_interleaved_<dt> (T* q, T* k, float* cos, float* sin,
//                                   batch, q_heads, kv_heads, seq, head_dim, rotary_dim, T* q_out, T* k_out)
//   trtglm_rotary_halves_<dt>      (same arguments)
//
// 6 entry points in all. q [batch, q_heads, seq, head_dim], k [batch, kv_heads, seq, head_dim], cos and sin
// [batch, seq, rotary_dim / 2] (already gathered at each token's position), q_out like q, k_out like k.
// interleaved: pairs (2i, 2i + 1) (GLM, GPT-J); halves: pairs (i, i + rotary_dim / 2) (Llama's rotate_half).
// Pair i of token t in batch b: (a, d) -> (a cos - d sin, d cos + a sin), cos = cos[b, t, i]; fp32 math, one
// rounding to T. rotary_dim even, 0 <= rotary_dim <= head_dim. q_out may be q and k_out may be k (in place).
//
// Launch configuration (the same one launchRotary uses):
//   block = (256, 1, 1)
//   grid  = (ceil(batch * (q_heads + kv_heads) * seq * head_dim / (W * 256)), 1, 1), W = 8 for f16/bf16, 4 for f32
//   dynamic shared memory = 0 bytes
// The kernel strides over its work, so any grid.x >= 1 and any block.x <= 1024 is correct; the grid above gives
// each thread about one 16-byte vector (launchRotary computes the exact count).
//
// Design: memory-bound elementwise. A unit of work is one 16-byte vector of a head (interleaved: W / 2 pairs; the
// copied tail: W channels) or, for halves, the two W-channel vectors of W pairs; a thread takes units of a flat index
// over Q's rows then K's rows, so one launch covers both. Rows go in (batch, seq, head) order, heads fastest, so the
// heads of one token run on neighbouring threads and read its cos/sin row (8/16-byte read-only loads) from L1.
// Vector accesses need head_dim % W == 0, (rotary_dim / 2) % (W / 2) == 0 (interleaved) or % W == 0 (halves), and
// 16-byte aligned pointers; otherwise the same code runs per pair / element.
// Index math in 32 bits when the work fits (it always does for real models), else 64 bits.
#include "common/convert.cuh"
#include "common/kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace trtglm
{
namespace rotary
{

constexpr int kThreads = 256;

// N fp32 values of the read-only cos/sin tables: float4 / float2 accesses when kVector (N a multiple of 4, or 2).
template <bool kVector, int N>
__device__ __forceinline__ void loadTable(float const* __restrict__ p, float (&f)[N])
{
    if constexpr (kVector && N % 4 == 0)
    {
#pragma unroll
        for (int c = 0; c < N; c += 4)
        {
            float4 const v = __ldg(reinterpret_cast<float4 const*>(p + c));
            f[c] = v.x;
            f[c + 1] = v.y;
            f[c + 2] = v.z;
            f[c + 3] = v.w;
        }
    }
    else if constexpr (kVector && N == 2)
    {
        float2 const v = __ldg(reinterpret_cast<float2 const*>(p));
        f[0] = v.x;
        f[1] = v.y;
    }
    else
    {
#pragma unroll
        for (int e = 0; e < N; ++e)
            f[e] = __ldg(p + e);
    }
}

struct Shape
{
    int batch, q_heads, kv_heads, seq, head_dim, rotary_dim;
};

// How the work is cut: P pairs per rotation unit, C channels per copy unit, units per row of Q and of K.
struct Plan
{
    bool vector;
    int pairs;       // P
    int copy;        // C
    int rot_units;   // (rotary_dim / 2) / P per row
    int q_units;     // rot_units + the copy units of a row of Q (0 copy units when q_out == q)
    int k_units;
    int64_t q_total; // batch * q_heads * seq * q_units
    int64_t total;   // q_total + batch * kv_heads * seq * k_units
};

__host__ __device__ inline bool aligned16(void const* p)
{
    return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// The same decision on the host (launchRotary's grid) and on the device (the entry points).
__host__ __device__ inline Plan makePlan(Shape const& s, bool interleaved, int elem_bytes, void const* q,
    void const* k, void const* cos, void const* sin, void const* q_out, void const* k_out)
{
    int const w = 16 / elem_bytes;
    int const half = s.rotary_dim / 2;
    int const vec_pairs = interleaved ? w / 2 : w;
    Plan p{};
    p.vector = s.head_dim % w == 0 && half % vec_pairs == 0 && aligned16(q) && aligned16(k) && aligned16(cos)
        && aligned16(sin) && aligned16(q_out) && aligned16(k_out);
    p.pairs = p.vector ? vec_pairs : 1;
    p.copy = p.vector ? w : 1;
    p.rot_units = half / p.pairs;
    int const copy_units = (s.head_dim - s.rotary_dim) / p.copy;
    p.q_units = p.rot_units + (q_out == q ? 0 : copy_units);
    p.k_units = p.rot_units + (k_out == k ? 0 : copy_units);
    p.q_total = int64_t(s.batch) * s.q_heads * s.seq * p.q_units;
    p.total = p.q_total + int64_t(s.batch) * s.kv_heads * s.seq * p.k_units;
    return p;
}

// Units [blockIdx.x * blockDim.x + threadIdx.x, total), striding by the grid. Index: uint32_t or int64_t.
template <typename Index, bool kVector, bool kInterleaved, int P, int C, typename T>
__device__ __forceinline__ void rotateUnits(T const* q, T const* k, float const* __restrict__ cos,
    float const* __restrict__ sin, T* q_out, T* k_out, Shape const& s, Plan const& plan)
{
    int const half = s.rotary_dim / 2;
    Index const q_total = static_cast<Index>(plan.q_total);
    Index const total = static_cast<Index>(plan.total);
    Index const stride = Index(gridDim.x) * blockDim.x;
    for (Index g = Index(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += stride)
    {
        bool const is_q = g < q_total;
        Index const local = is_q ? g : g - q_total;
        Index const units = static_cast<Index>(is_q ? plan.q_units : plan.k_units);
        Index const heads = static_cast<Index>(is_q ? s.q_heads : s.kv_heads);
        // Rows in (batch, seq, head) order, heads fastest: the heads of a token run on neighbouring threads and
        // share its cos/sin row through L1. Row r of that order is row (b * heads + h) * seq + t of the tensor.
        Index const r = local / units;
        int const unit = static_cast<int>(local - r * units);
        Index const token = r / heads; // b * seq + t: the cos/sin row
        Index const h = r - token * heads;
        Index const b = token / static_cast<Index>(s.seq);
        Index const t = token - b * static_cast<Index>(s.seq);
        int64_t const row = (int64_t(b) * int64_t(heads) + int64_t(h)) * s.seq + int64_t(t);
        T const* src = (is_q ? q : k) + row * s.head_dim;
        T* dst = (is_q ? q_out : k_out) + row * s.head_dim;
        if (unit < plan.rot_units)
        {
            int64_t const table = int64_t(token) * half + int64_t(unit) * P;
            float c[P], sn[P];
            loadTable<kVector, P>(cos + table, c);
            loadTable<kVector, P>(sin + table, sn);
            if constexpr (kInterleaved)
            {
                float x[2 * P];
                load<kVector, 2 * P>(src + 2 * P * unit, x);
#pragma unroll
                for (int i = 0; i < P; ++i)
                {
                    float const a = x[2 * i], d = x[2 * i + 1];
                    x[2 * i] = a * c[i] - d * sn[i];
                    x[2 * i + 1] = d * c[i] + a * sn[i];
                }
                store<kVector, 2 * P>(dst + 2 * P * unit, x);
            }
            else
            {
                float a[P], d[P];
                load<kVector, P>(src + P * unit, a);
                load<kVector, P>(src + half + P * unit, d);
#pragma unroll
                for (int i = 0; i < P; ++i)
                {
                    float const x0 = a[i], x1 = d[i];
                    a[i] = x0 * c[i] - x1 * sn[i];
                    d[i] = x1 * c[i] + x0 * sn[i];
                }
                store<kVector, P>(dst + P * unit, a);
                store<kVector, P>(dst + half + P * unit, d);
            }
        }
        else
        {
            int const at = s.rotary_dim + (unit - plan.rot_units) * C;
            if constexpr (kVector)
                *reinterpret_cast<Pack<T, C>*>(dst + at) = *reinterpret_cast<Pack<T, C> const*>(src + at);
            else
                dst[at] = src[at];
        }
    }
}

template <bool kVector, bool kInterleaved, int P, int C, typename T>
__device__ __forceinline__ void rotateIndexed(T const* q, T const* k, float const* cos, float const* sin, T* q_out,
    T* k_out, Shape const& s, Plan const& plan)
{
    // 32-bit index math (divisions) when no index can pass 2^32 - 1, counting the last stride.
    int64_t const stride = int64_t(gridDim.x) * blockDim.x;
    if (plan.total + stride <= int64_t(UINT32_MAX))
        rotateUnits<uint32_t, kVector, kInterleaved, P, C>(q, k, cos, sin, q_out, k_out, s, plan);
    else
        rotateUnits<int64_t, kVector, kInterleaved, P, C>(q, k, cos, sin, q_out, k_out, s, plan);
}

// The body of every entry point.
template <bool kInterleaved, typename T>
__device__ __forceinline__ void rotary(T const* q, T const* k, float const* cos, float const* sin, T* q_out,
    T* k_out, Shape const& s)
{
    constexpr int kW = 16 / sizeof(T);
    Plan const plan = makePlan(s, kInterleaved, sizeof(T), q, k, cos, sin, q_out, k_out);
    if (plan.vector)
        rotateIndexed<true, kInterleaved, kInterleaved ? kW / 2 : kW, kW>(q, k, cos, sin, q_out, k_out, s, plan);
    else
        rotateIndexed<false, kInterleaved, 1, 1>(q, k, cos, sin, q_out, k_out, s, plan);
}

} // namespace rotary
} // namespace trtglm

// ---- flat entry points -------------------------------------------------------------------------------------------
#define TRTGLM_ROTARY_ENTRY(VARIANT, INTERLEAVED, DT, T)                                                             \
    extern "C" __global__ void __launch_bounds__(1024) trtglm_rotary_##VARIANT##_##DT(T const* q, T const* k,     \
        float const* cos, float const* sin, int32_t batch, int32_t q_heads, int32_t kv_heads, int32_t seq,          \
        int32_t head_dim, int32_t rotary_dim, T* q_out, T* k_out)                                                    \
    {                                                                                                                \
        trtglm::rotary::Shape const s{batch, q_heads, kv_heads, seq, head_dim, rotary_dim};                         \
        trtglm::rotary::rotary<INTERLEAVED>(q, k, cos, sin, q_out, k_out, s);                                        \
    }

TRTGLM_ROTARY_ENTRY(interleaved, true, f32, float)
TRTGLM_ROTARY_ENTRY(interleaved, true, f16, __half)
TRTGLM_ROTARY_ENTRY(interleaved, true, bf16, __nv_bfloat16)
TRTGLM_ROTARY_ENTRY(halves, false, f32, float)
TRTGLM_ROTARY_ENTRY(halves, false, f16, __half)
TRTGLM_ROTARY_ENTRY(halves, false, bf16, __nv_bfloat16)

#undef TRTGLM_ROTARY_ENTRY

// ---- C++ launch function: launches the entry points above ----------------------------------------------------------
namespace trtglm
{
namespace rotary
{

template <typename T>
struct Entries;

#define TRTGLM_ROTARY_TABLE(DT, T)                                                                                   \
    template <>                                                                                                      \
    struct Entries<T>                                                                                                \
    {                                                                                                                \
        static constexpr auto interleaved = &trtglm_rotary_interleaved_##DT;                                        \
        static constexpr auto halves = &trtglm_rotary_halves_##DT;                                                  \
    };
TRTGLM_ROTARY_TABLE(f32, float)
TRTGLM_ROTARY_TABLE(f16, __half)
TRTGLM_ROTARY_TABLE(bf16, __nv_bfloat16)
#undef TRTGLM_ROTARY_TABLE

template <typename T>
cudaError_t launchTyped(RotaryParams const& p, cudaStream_t stream)
{
    Shape const s{p.batch, p.q_heads, p.kv_heads, p.seq, p.head_dim, p.rotary_dim};
    Plan const plan = makePlan(s, p.interleaved, sizeof(T), p.q, p.k, p.cos, p.sin, p.q_out, p.k_out);
    if (plan.total == 0)
        return cudaSuccess;
    int64_t const blocks = (plan.total + kThreads - 1) / kThreads;
    dim3 const grid(static_cast<unsigned>(blocks < INT32_MAX ? blocks : INT32_MAX));
    auto const* q = static_cast<T const*>(p.q);
    auto const* k = static_cast<T const*>(p.k);
    auto* q_out = static_cast<T*>(p.q_out);
    auto* k_out = static_cast<T*>(p.k_out);
    auto const entry = p.interleaved ? Entries<T>::interleaved : Entries<T>::halves;
    entry<<<grid, kThreads, 0, stream>>>(q, k, p.cos, p.sin, p.batch, p.q_heads, p.kv_heads, p.seq, p.head_dim,
        p.rotary_dim, q_out, k_out);
    return cudaGetLastError();
}

} // namespace rotary

cudaError_t launchRotary(RotaryParams const& p, cudaStream_t stream)
{
    bool const dims_ok = p.batch >= 0 && p.q_heads >= 0 && p.kv_heads >= 0 && p.seq >= 0 && p.head_dim >= 1
        && p.rotary_dim >= 0 && p.rotary_dim % 2 == 0 && p.rotary_dim <= p.head_dim;
    bool const q_ok = p.q_heads == 0 || (p.q != nullptr && p.q_out != nullptr);
    bool const k_ok = p.kv_heads == 0 || (p.k != nullptr && p.k_out != nullptr);
    bool const table_ok = p.rotary_dim == 0 || (p.cos != nullptr && p.sin != nullptr);
    if (!dims_ok || !q_ok || !k_ok || !table_ok)
        return cudaErrorInvalidValue;
    switch (p.dtype)
    {
    case DType::kFLOAT: return rotary::launchTyped<float>(p, stream);
    case DType::kHALF: return rotary::launchTyped<__half>(p, stream);
    case DType::kBF16: return rotary::launchTyped<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace trtglm
