// Residual add + RMSNorm / LayerNorm, optionally quantized to INT8 on the way out (launchResidualNorm in
// common/kernels.h, and the flat entry points below).
//
// Flat entry points (extern "C" __global__; TensorRT AOT argument order: inputs, int32 scalars, outputs).
// <dt> is f32 | f16 | bf16 (T = float | __half | __nv_bfloat16). eps and out_scale travel as the IEEE-754 bits of a
// float in an int32; rows = the product of the leading dims, hidden = the last dim.
//
//   trtglm_residual_norm_rms_<dt>            (T* input, T* gamma, rows, hidden, eps, T* output)
//   trtglm_residual_norm_layer_<dt>          (T* input, T* gamma, rows, hidden, eps, T* output)
//   trtglm_residual_norm_layer_bias_<dt>     (T* input, T* gamma, T* beta, rows, hidden, eps, T* output)
//   trtglm_residual_norm_add_rms_<dt>        (T* input, T* residual, T* gamma, rows, hidden, eps,
//                                             T* output, T* residual_out)
//   trtglm_residual_norm_add_layer_<dt>      (T* input, T* residual, T* gamma, rows, hidden, eps,
//                                             T* output, T* residual_out)
//   trtglm_residual_norm_add_layer_bias_<dt> (T* input, T* residual, T* gamma, T* beta, rows, hidden, eps,
//                                             T* output, T* residual_out)
//   trtglm_residual_norm_<variant>_i8_<dt>   each of the six above with int32 out_scale after eps and an
//                                             int8_t* output, e.g. trtglm_residual_norm_add_rms_i8_f16
//                                             (T* input, T* residual, T* gamma, rows, hidden, eps, out_scale,
//                                              int8_t* output, T* residual_out)
//
// 36 entry points in all (12 variants x 3 dtypes). residual_out may be null (not written). output may alias input;
// residual_out may alias input or residual (an in-place residual stream); gamma and beta alias nothing written.
//
// Launch configuration (all entry points; the same one launchResidualNorm uses):
//   block = (X, Y, 1) with X = 32 * ceil(hidden / 512) (threads per row, a multiple of 32, <= 1024 for
//           hidden <= 16384) and Y = rows per block: 4 when X == 32, 2 when X == 64, else 1
//   grid  = (ceil(rows / Y), 1, 1)
//   dynamic shared memory = 0 bytes
// Any X that is a multiple of 32 with X * Y <= 1024 and any grid.x >= 1 is also correct (the kernel strides over
// rows, and re-reads from global memory whatever does not fit in its registers); the values above keep each row in
// registers (16 values per thread, kept as T) and are the fast ones. Simplest for an AOT plugin: Y = 1, grid = rows.
//
// Math (fp32): x = input + residual, rounded to T (that is residual_out, and the value normalized);
//   RMS:   y = x * rsqrt(mean(x^2) + eps) * gamma
//   Layer: y = (x - mean(x)) * rsqrt(mean((x - mean(x))^2) + eps) * gamma + beta   (two-pass, from registers)
//   _i8:   output = clamp(round_half_even(y * (1 / out_scale)), -128, 127); else output = T(y).
//
// Design: one block (one warp for hidden <= 512, several rows per block) per row; 16-byte vector loads and
// stores when hidden is a multiple of 16 / sizeof(T) and every pointer is aligned (else scalar: the same code with a
// vector width of 1, 8 values in registers); the row is read once and kept in registers; fp32 sums with
// xor-shuffles, then one shared float per warp, double-buffered so each reduction costs one __syncthreads; mean and
// variance divide by hidden with an IEEE division (the rest may use --use_fast_math: rsqrtf is approximate).
#include "common/convert.cuh"
#include "common/kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace trtglm
{
namespace norm
{

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr int kCapacity = 16;      // fp32 values of a row each thread keeps in registers
constexpr int kMaxWarps = kMaxThreads / kWarp;

__device__ __forceinline__ float warpSum(float v)
{
#pragma unroll
    for (int m = kWarp / 2; m > 0; m /= 2)
        v += __shfl_xor_sync(0xffffffffu, v, m);
    return v; // the same bits in every lane (fp32 addition commutes)
}

// Sum over the threadIdx.x of a row group (blockDim.x a multiple of 32); every thread of the group gets the total.
// partial: 2 x kMaxWarps floats, used alternately (`turn`), so that one __syncthreads per call is enough: a write
// to a buffer always follows the barrier of the previous call, which every thread passes only after reading it.
__device__ __forceinline__ float rowSum(float v, float* partial, int& turn)
{
    v = warpSum(v);
    int const warps = blockDim.x / kWarp;
    if (warps == 1)
        return v;
    float* buf = partial + turn * kMaxWarps + threadIdx.y * warps;
    turn ^= 1;
    if (threadIdx.x % kWarp == 0)
        buf[threadIdx.x / kWarp] = v;
    __syncthreads();
    int const lane = threadIdx.x % kWarp;
    return warpSum(lane < warps ? buf[lane] : 0.f);
}

// x = input (+ residual, rounded to T, written to residual_out) for the vector at element offset `at`. Kept as T:
// exact (x is a T value), and half the registers of fp32 for fp16/bf16.
template <int V, typename T>
__device__ __forceinline__ Pack<T, V> loadRow(T const* in, T const* res, T* res_out, int64_t at)
{
    Pack<T, V> x = *reinterpret_cast<Pack<T, V> const*>(in + at);
    if (res != nullptr)
    {
        Pack<T, V> const r = *reinterpret_cast<Pack<T, V> const*>(res + at);
#pragma unroll
        for (int e = 0; e < V; ++e)
            x.v[e] = fromFloat<T>(toFloat(x.v[e]) + toFloat(r.v[e]));
        if (res_out != nullptr)
            *reinterpret_cast<Pack<T, V>*>(res_out + at) = x;
    }
    return x;
}

// The same values again, for the part of a row that did not fit in registers: from residual_out when it was
// written (it may alias input or residual), else recomputed.
template <int V, typename T>
__device__ __forceinline__ Pack<T, V> reloadRow(T const* in, T const* res, T const* res_out, int64_t at)
{
    if (res != nullptr && res_out != nullptr)
        return *reinterpret_cast<Pack<T, V> const*>(res_out + at);
    return loadRow<V>(in, res, static_cast<T*>(nullptr), at);
}

template <int V, typename T>
__device__ __forceinline__ void accumulate(Pack<T, V> const& x, float& sum, float& sumsq)
{
#pragma unroll
    for (int e = 0; e < V; ++e)
    {
        float const f = toFloat(x.v[e]);
        sum += f;
        sumsq += f * f;
    }
}

template <int V, typename T>
__device__ __forceinline__ float deviation(Pack<T, V> const& x, float mean)
{
    float dev = 0.f;
#pragma unroll
    for (int e = 0; e < V; ++e)
    {
        float const d = toFloat(x.v[e]) - mean;
        dev += d * d;
    }
    return dev;
}

template <int V, bool kLayer, typename T, typename OutT>
__device__ __forceinline__ void storeRow(T const* __restrict__ gamma, T const* __restrict__ beta, OutT* out,
    int64_t at, int col, Pack<T, V> const& x, float mean, float rstd, float inv_scale)
{
    float g[V], y[V];
    load<true, V>(gamma + col, g);
#pragma unroll
    for (int e = 0; e < V; ++e)
        y[e] = (kLayer ? toFloat(x.v[e]) - mean : toFloat(x.v[e])) * rstd * g[e];
    if (kLayer && beta != nullptr)
    {
        float b[V];
        load<true, V>(beta + col, b);
#pragma unroll
        for (int e = 0; e < V; ++e)
            y[e] += b[e];
    }
    if constexpr (sizeof(OutT) == 1)
    {
#pragma unroll
        for (int e = 0; e < V; ++e)
            y[e] *= inv_scale;
    }
    store<true, V>(out + at, y);
}

// Rows blockIdx.x * blockDim.y + threadIdx.y, striding by gridDim.x * blockDim.y; V: elements per access.
template <int V, bool kLayer, typename T, typename OutT>
__device__ __forceinline__ void normRows(T const* in, T const* res, T const* __restrict__ gamma,
    T const* __restrict__ beta, OutT* out, T* res_out, int64_t rows, int hidden, float eps, float inv_scale,
    float* partial)
{
    // Vectors held in registers; the element-wise fallback holds half as many (its 64-bit addresses would otherwise
    // spill at the 64 registers a 1024-thread block allows) and re-reads the rest of a long row (L1/L2 hits).
    constexpr int kRegs = V == 1 ? kCapacity / 2 : kCapacity / V;
    int const nvec = hidden / V;
    int const tx = threadIdx.x;
    int const nx = blockDim.x;
    float const n = static_cast<float>(hidden); // exact: hidden < 2^24
    int turn = 0;
    for (int64_t first = int64_t(blockIdx.x) * blockDim.y; first < rows; first += int64_t(gridDim.x) * blockDim.y)
    {
        int64_t const row = first + threadIdx.y;
        bool const valid = row < rows; // the whole block reaches every barrier; only valid rows touch memory
        int64_t const base = valid ? row * hidden : 0;
        int const stop = valid ? nvec : 0;

        Pack<T, V> x[kRegs];
        float sum = 0.f, sumsq = 0.f;
#pragma unroll
        for (int j = 0; j < kRegs; ++j)
        {
            int const i = j * nx + tx;
            if (i < stop)
            {
                x[j] = loadRow<V>(in, res, res_out, base + int64_t(i) * V);
                accumulate(x[j], sum, sumsq);
            }
        }
#pragma unroll 1
        for (int i = kRegs * nx + tx; i < stop; i += nx) // only when blockDim.x * kCapacity < hidden
            accumulate(loadRow<V>(in, res, res_out, base + int64_t(i) * V), sum, sumsq);

        float mean = 0.f, rstd;
        if constexpr (kLayer)
        {
            mean = __fdiv_rn(rowSum(sum, partial, turn), n); // IEEE division: once per row
            float dev = 0.f;
#pragma unroll
            for (int j = 0; j < kRegs; ++j)
            {
                if (j * nx + tx < stop)
                    dev += deviation(x[j], mean);
            }
#pragma unroll 1
            for (int i = kRegs * nx + tx; i < stop; i += nx)
                dev += deviation(reloadRow<V>(in, res, res_out, base + int64_t(i) * V), mean);
            rstd = rsqrtf(__fdiv_rn(rowSum(dev, partial, turn), n) + eps);
        }
        else
        {
            rstd = rsqrtf(__fdiv_rn(rowSum(sumsq, partial, turn), n) + eps);
        }

#pragma unroll
        for (int j = 0; j < kRegs; ++j)
        {
            int const i = j * nx + tx;
            if (i < stop)
                storeRow<V, kLayer>(gamma, beta, out, base + int64_t(i) * V, i * V, x[j], mean, rstd, inv_scale);
        }
#pragma unroll 1
        for (int i = kRegs * nx + tx; i < stop; i += nx)
        {
            int64_t const at = base + int64_t(i) * V;
            storeRow<V, kLayer>(gamma, beta, out, at, i * V, reloadRow<V>(in, res, res_out, at), mean, rstd, inv_scale);
        }
    }
}

__device__ __forceinline__ bool aligned(void const* p, unsigned bytes)
{
    return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The body of every entry point: 16-byte accesses when hidden and all pointers allow it, else element by element.
template <bool kLayer, typename T, typename OutT>
__device__ __forceinline__ void residualNorm(T const* in, T const* res, T const* gamma, T const* beta, OutT* out,
    T* res_out, int64_t rows, int hidden, float eps, float out_scale)
{
    __shared__ float partial[2 * kMaxWarps];
    constexpr int kVec = 16 / sizeof(T);
    float const inv_scale = sizeof(OutT) == 1 ? __frcp_rn(out_scale) : 1.f;
    bool const vector = hidden % kVec == 0 && aligned(in, 16) && aligned(res, 16) && aligned(gamma, 16)
        && aligned(beta, 16) && aligned(res_out, 16) && aligned(out, kVec * sizeof(OutT));
    if (vector)
        normRows<kVec, kLayer>(in, res, gamma, beta, out, res_out, rows, hidden, eps, inv_scale, partial);
    else
        normRows<1, kLayer>(in, res, gamma, beta, out, res_out, rows, hidden, eps, inv_scale, partial);
}

} // namespace norm
} // namespace trtglm

// ---- flat entry points -------------------------------------------------------------------------------------------
#define TRTGLM_UNPACK(...) __VA_ARGS__
#define TRTGLM_NORM_ENTRY(VARIANT, DT, T, O, LAYER, INPUTS, OUTPUTS, RES, BETA, RES_OUT, SCALE_PARAM, SCALE)         \
    extern "C" __global__ void __launch_bounds__(1024) trtglm_residual_norm_##VARIANT##_##DT(                        \
        TRTGLM_UNPACK INPUTS, int32_t rows, int32_t hidden, int32_t eps TRTGLM_UNPACK SCALE_PARAM,                   \
        TRTGLM_UNPACK OUTPUTS)                                                                                        \
    {                                                                                                                 \
        trtglm::norm::residualNorm<LAYER, T, O>(                                                                      \
            input, RES, gamma, BETA, output, RES_OUT, rows, hidden, __int_as_float(eps), SCALE);                      \
    }
// The six variants with output type O (T, or int8_t with the _i8 suffix and an out_scale argument).
#define TRTGLM_NORM_VARIANTS(DT, T, O, SFX, SCALE_PARAM, SCALE)                                                      \
    TRTGLM_NORM_ENTRY(rms##SFX, DT, T, O, false, (T const* input, T const* gamma), (O* output), nullptr, nullptr,     \
        nullptr, SCALE_PARAM, SCALE)                                                                                  \
    TRTGLM_NORM_ENTRY(layer##SFX, DT, T, O, true, (T const* input, T const* gamma), (O* output), nullptr, nullptr,    \
        nullptr, SCALE_PARAM, SCALE)                                                                                  \
    TRTGLM_NORM_ENTRY(layer_bias##SFX, DT, T, O, true, (T const* input, T const* gamma, T const* beta), (O* output), \
        nullptr, beta, nullptr, SCALE_PARAM, SCALE)                                                                   \
    TRTGLM_NORM_ENTRY(add_rms##SFX, DT, T, O, false, (T const* input, T const* residual, T const* gamma),            \
        (O* output, T* residual_out), residual, nullptr, residual_out, SCALE_PARAM, SCALE)                            \
    TRTGLM_NORM_ENTRY(add_layer##SFX, DT, T, O, true, (T const* input, T const* residual, T const* gamma),           \
        (O* output, T* residual_out), residual, nullptr, residual_out, SCALE_PARAM, SCALE)                            \
    TRTGLM_NORM_ENTRY(add_layer_bias##SFX, DT, T, O, true,                                                           \
        (T const* input, T const* residual, T const* gamma, T const* beta), (O* output, T* residual_out), residual,   \
        beta, residual_out, SCALE_PARAM, SCALE)
#define TRTGLM_NORM_ENTRIES(DT, T)                                                                                    \
    TRTGLM_NORM_VARIANTS(DT, T, T, , (), 1.f)                                                                         \
    TRTGLM_NORM_VARIANTS(DT, T, int8_t, _i8, (, int32_t out_scale), __int_as_float(out_scale))

TRTGLM_NORM_ENTRIES(f32, float)
TRTGLM_NORM_ENTRIES(f16, __half)
TRTGLM_NORM_ENTRIES(bf16, __nv_bfloat16)

#undef TRTGLM_NORM_ENTRIES
#undef TRTGLM_NORM_VARIANTS
#undef TRTGLM_NORM_ENTRY
#undef TRTGLM_UNPACK

// ---- C++ launch function: launches the entry points above ----------------------------------------------------------
namespace trtglm
{
namespace norm
{

struct Launch
{
    dim3 grid, block;
    cudaStream_t stream;
};

// The entry points of one dtype, by variant (O: the output type).
template <typename T, typename O>
struct Entries;

#define TRTGLM_NORM_TABLE(DT, T, O, SFX)                                                                             \
    template <>                                                                                                      \
    struct Entries<T, O>                                                                                             \
    {                                                                                                                \
        static constexpr auto rms = &trtglm_residual_norm_rms##SFX##_##DT;                                          \
        static constexpr auto layer = &trtglm_residual_norm_layer##SFX##_##DT;                                      \
        static constexpr auto layer_bias = &trtglm_residual_norm_layer_bias##SFX##_##DT;                            \
        static constexpr auto add_rms = &trtglm_residual_norm_add_rms##SFX##_##DT;                                  \
        static constexpr auto add_layer = &trtglm_residual_norm_add_layer##SFX##_##DT;                              \
        static constexpr auto add_layer_bias = &trtglm_residual_norm_add_layer_bias##SFX##_##DT;                    \
    };
TRTGLM_NORM_TABLE(f32, float, float, )
TRTGLM_NORM_TABLE(f16, __half, __half, )
TRTGLM_NORM_TABLE(bf16, __nv_bfloat16, __nv_bfloat16, )
TRTGLM_NORM_TABLE(f32, float, int8_t, _i8)
TRTGLM_NORM_TABLE(f16, __half, int8_t, _i8)
TRTGLM_NORM_TABLE(bf16, __nv_bfloat16, int8_t, _i8)
#undef TRTGLM_NORM_TABLE

int32_t floatBits(float f)
{
    int32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    return bits;
}

// Launches `entry` with the scalars in the AOT order: rows, hidden, eps, then out_scale for an int8 output.
template <typename O, typename Entry, typename... Inputs>
void launchEntry(Entry entry, Launch const& l, int32_t rows, ResidualNormParams const& p, O* out, Inputs... in)
{
    int32_t const eps = floatBits(p.eps);
    if constexpr (sizeof(O) == 1)
        entry<<<l.grid, l.block, 0, l.stream>>>(in..., rows, p.hidden, eps, floatBits(p.out_scale), out);
    else
        entry<<<l.grid, l.block, 0, l.stream>>>(in..., rows, p.hidden, eps, out);
}

template <typename O, typename Entry, typename T, typename... Inputs>
void launchAddEntry(Entry entry, Launch const& l, int32_t rows, ResidualNormParams const& p, O* out, T* res_out,
    Inputs... in)
{
    int32_t const eps = floatBits(p.eps);
    if constexpr (sizeof(O) == 1)
        entry<<<l.grid, l.block, 0, l.stream>>>(in..., rows, p.hidden, eps, floatBits(p.out_scale), out, res_out);
    else
        entry<<<l.grid, l.block, 0, l.stream>>>(in..., rows, p.hidden, eps, out, res_out);
}

// One launch of at most INT32_MAX rows (the entry points take rows as int32), rows starting at `first`.
template <typename T, typename O>
void launchChunk(ResidualNormParams const& p, Launch const& l, int64_t first, int32_t rows)
{
    using E = Entries<T, O>;
    int64_t const at = first * p.hidden;
    auto const* in = static_cast<T const*>(p.input) + at;
    auto const* gamma = static_cast<T const*>(p.gamma);
    auto const* beta = static_cast<T const*>(p.beta);
    auto* out = static_cast<O*>(p.output) + at;
    bool const layer = p.kind == NormKind::kLAYER;
    if (p.residual != nullptr)
    {
        auto const* res = static_cast<T const*>(p.residual) + at;
        T* res_out = p.residual_out ? static_cast<T*>(p.residual_out) + at : nullptr;
        if (layer && beta)
            launchAddEntry(E::add_layer_bias, l, rows, p, out, res_out, in, res, gamma, beta);
        else if (layer)
            launchAddEntry(E::add_layer, l, rows, p, out, res_out, in, res, gamma);
        else
            launchAddEntry(E::add_rms, l, rows, p, out, res_out, in, res, gamma);
    }
    else if (layer && beta)
        launchEntry(E::layer_bias, l, rows, p, out, in, gamma, beta);
    else if (layer)
        launchEntry(E::layer, l, rows, p, out, in, gamma);
    else
        launchEntry(E::rms, l, rows, p, out, in, gamma);
}

template <typename T, typename O>
cudaError_t launchTyped(ResidualNormParams const& p, cudaStream_t stream)
{
    int const x = kWarp * ((p.hidden + kWarp * kCapacity - 1) / (kWarp * kCapacity));
    int const threads = x < kMaxThreads ? x : kMaxThreads;
    int const y = threads == kWarp ? 4 : threads == 2 * kWarp ? 2 : 1;
    constexpr int64_t kMaxRows = INT32_MAX;
    for (int64_t first = 0; first < p.rows; first += kMaxRows)
    {
        int64_t const left = p.rows - first;
        int32_t const rows = static_cast<int32_t>(left < kMaxRows ? left : kMaxRows);
        Launch const l{dim3(static_cast<unsigned>((int64_t(rows) + y - 1) / y)), dim3(threads, y), stream};
        launchChunk<T, O>(p, l, first, rows);
        cudaError_t const err = cudaGetLastError();
        if (err != cudaSuccess)
            return err;
    }
    return cudaSuccess;
}

template <typename T>
cudaError_t launchDtype(ResidualNormParams const& p, cudaStream_t stream)
{
    return p.out_dtype == DType::kINT8 ? launchTyped<T, int8_t>(p, stream) : launchTyped<T, T>(p, stream);
}

} // namespace norm

cudaError_t launchResidualNorm(ResidualNormParams const& p, cudaStream_t stream)
{
    bool const float_dtype = p.dtype == DType::kFLOAT || p.dtype == DType::kHALF || p.dtype == DType::kBF16;
    bool const kind_ok = p.kind == NormKind::kRMS || p.kind == NormKind::kLAYER;
    if (!float_dtype || !kind_ok || (p.out_dtype != p.dtype && p.out_dtype != DType::kINT8) || p.input == nullptr
        || p.gamma == nullptr || p.output == nullptr || p.rows < 0 || p.hidden < 1 || !(p.eps >= 0.f)
        || (p.beta != nullptr && p.kind != NormKind::kLAYER) || (p.residual_out != nullptr && p.residual == nullptr)
        || (p.out_dtype == DType::kINT8 && !(p.out_scale > 0.f && std::isfinite(p.out_scale))))
        return cudaErrorInvalidValue;
    if (p.rows == 0)
        return cudaSuccess;
    switch (p.dtype)
    {
    case DType::kFLOAT: return norm::launchDtype<float>(p, stream);
    case DType::kHALF: return norm::launchDtype<__half>(p, stream);
    case DType::kBF16: return norm::launchDtype<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace trtglm
