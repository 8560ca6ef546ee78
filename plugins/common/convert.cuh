// Device helpers the elementwise kernels share: fp32 <-> storage-type conversions (float, __half, __nv_bfloat16,
// int8 with round-half-even and saturation) and N-element loads/stores, as one 16-byte-or-less access (Pack) when
// the pointer and size allow it, else element by element.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace trtglm
{

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack
{
    T v[N];
};

__device__ __forceinline__ float toFloat(float x)
{
    return x;
}
__device__ __forceinline__ float toFloat(__half x)
{
    return __half2float(x);
}
__device__ __forceinline__ float toFloat(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float x);
template <>
__device__ __forceinline__ float fromFloat<float>(float x)
{
    return x;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float x)
{
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ int8_t fromFloat<int8_t>(float x)
{
    // cvt.rni: round half to even (NaN -> 0), then saturate to int8.
    return static_cast<int8_t>(min(max(__float2int_rn(x), -128), 127));
}

// N elements of T at p: one access of N * sizeof(T) bytes (<= 16) when kVector, else N scalar accesses.
template <bool kVector, int N, typename T>
__device__ __forceinline__ void load(T const* p, float (&f)[N])
{
    if constexpr (kVector)
    {
        Pack<T, N> const pk = *reinterpret_cast<Pack<T, N> const*>(p);
#pragma unroll
        for (int e = 0; e < N; ++e)
            f[e] = toFloat(pk.v[e]);
    }
    else
    {
#pragma unroll
        for (int e = 0; e < N; ++e)
            f[e] = toFloat(p[e]);
    }
}

template <bool kVector, int N, typename T>
__device__ __forceinline__ void store(T* p, float const (&f)[N])
{
    if constexpr (kVector)
    {
        Pack<T, N> pk;
#pragma unroll
        for (int e = 0; e < N; ++e)
            pk.v[e] = fromFloat<T>(f[e]);
        *reinterpret_cast<Pack<T, N>*>(p) = pk;
    }
    else
    {
#pragma unroll
        for (int e = 0; e < N; ++e)
            p[e] = fromFloat<T>(f[e]);
    }
}

} // namespace trtglm
