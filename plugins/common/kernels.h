// The C++ interface of trtglm's CUDA kernels: what the TensorRT plugins (IPluginV3) call. The kernels are the
// source of truth; each plugin folder implements its launch function in its .cu file. Tensors are contiguous,
// row-major, on the device; every launch is asynchronous on `stream` and returns the launch's cudaError_t.
//
// The same kernels are also exported as flat `extern "C" __global__` entry points (named in each .cu file) for
// TensorRT's ahead-of-time Python plugins and for tests that load the PTX directly. Their arguments follow
// TensorRT's AOT convention: input pointers, then int32 scalars (a float travels as its IEEE-754 bits), then
// output pointers.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace trtglm
{

enum class DType : int32_t
{
    kFLOAT = 0,
    kHALF = 1,
    kBF16 = 2,
    kINT8 = 3,
};

enum class NormKind : int32_t
{
    kRMS = 0,   // y = x / sqrt(mean(x^2) + eps) * gamma
    kLAYER = 1, // y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta
};

// out = norm(input + residual) (residual optional), residual_out = input + residual (optional), per row.
struct ResidualNormParams
{
    void const* input = nullptr;    // [rows, hidden], dtype
    void const* residual = nullptr; // [rows, hidden], dtype, or nullptr: no residual add
    void const* gamma = nullptr;    // [hidden], dtype
    void const* beta = nullptr;     // [hidden], dtype; LayerNorm only, nullptr: no bias
    void* output = nullptr;         // [rows, hidden], out_dtype
    void* residual_out = nullptr;   // [rows, hidden], dtype: input + residual; nullptr: not written
    int64_t rows = 0;
    int32_t hidden = 0; // 1 .. 16384
    float eps = 1e-5f;
    float out_scale = 1.f; // out_dtype kINT8: output = clamp(round(y / out_scale), -128, 127)
    NormKind kind = NormKind::kRMS;
    DType dtype = DType::kHALF;     // kFLOAT, kHALF or kBF16; statistics always in fp32
    DType out_dtype = DType::kHALF; // dtype, or kINT8
};
cudaError_t launchResidualNorm(ResidualNormParams const& p, cudaStream_t stream);

// Rotary position embedding on Q and K. Only the first rotary_dim channels of each head rotate (GLM: head_dim / 2,
// Llama: head_dim); the rest are copied. Pairs: interleaved (2i, 2i+1) (GLM, GPT-J) or halves (i, i + rotary_dim/2)
// (Llama's rotate_half). For pair i at token t: (a, b) -> (a cos - b sin, b cos + a sin), cos = cos[b, t, i].
struct RotaryParams
{
    void const* q = nullptr;   // [batch, q_heads, seq, head_dim], dtype
    void const* k = nullptr;   // [batch, kv_heads, seq, head_dim], dtype
    float const* cos = nullptr; // [batch, seq, rotary_dim / 2], fp32 (already gathered at each token's position)
    float const* sin = nullptr; // [batch, seq, rotary_dim / 2], fp32
    void* q_out = nullptr;     // like q
    void* k_out = nullptr;     // like k
    int32_t batch = 0, q_heads = 0, kv_heads = 0, seq = 0, head_dim = 0, rotary_dim = 0; // rotary_dim even
    bool interleaved = true;
    DType dtype = DType::kHALF; // kFLOAT, kHALF or kBF16
};
cudaError_t launchRotary(RotaryParams const& p, cudaStream_t stream);

// softmax(scale * Q K^T + causal mask) V with grouped-query attention (q_heads a multiple of kv_heads; query head
// h reads kv head h / (q_heads / kv_heads)). K and V hold the whole cache: past and current tokens. Causal: query i
// (0-based among q_len) sees keys j <= i + (kv_len - q_len). q_len > 1: the tiled flash kernel (online softmax);
// q_len == 1: the decode kernel (the KV length split across blocks, then combined).
struct AttentionParams
{
    void const* q = nullptr; // [batch, q_heads, q_len, head_dim], dtype
    void const* k = nullptr; // [batch, kv_heads, kv_len, head_dim], dtype
    void const* v = nullptr; // [batch, kv_heads, kv_len, head_dim], dtype
    void* out = nullptr;     // [batch, q_heads, q_len, head_dim], dtype
    int32_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0; // head_dim 64 or 128
    float scale = 0.f; // usually 1 / sqrt(head_dim)
    bool causal = true;
    DType dtype = DType::kHALF; // kHALF or kBF16 (fp32 accumulation)
    void* workspace = nullptr;  // decode only: attentionWorkspaceSize(p) bytes (split-KV partial results)
};
size_t attentionWorkspaceSize(AttentionParams const& p);
cudaError_t launchAttention(AttentionParams const& p, cudaStream_t stream);

} // namespace trtglm
