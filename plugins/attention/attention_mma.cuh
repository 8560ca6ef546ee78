// The hardware primitives of the attention kernels (sm_80+): 16-byte cp.async copies, ldmatrix fragment loads,
// mma.sync.m16n8k16 with fp32 accumulation, barriers, shuffles, exp2. The kernel bodies (attention_prefill.cuh,
// attention_decode.cuh, attention_tile.cuh) reach the hardware only through this header, so each primitive can be
// read against the PTX ISA in one place (and a host-side emulation of these few functions can run the bodies).
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 * g + t:
//   A (16 x 16, row-major), 4 x b32: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
//                                    a3 = A[g+8][2t+8, 2t+9]                    (low half: the lower column)
//   B (16 x 8, "col"), 2 x b32:      b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g] (low half: the lower row)
//   C (16 x 8, fp32), 4 x f32:       c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8 x 8 matrix i; register i of lane (4g + t) receives
// matrix i's elements [g][2t, 2t+1], or with .trans its elements [2t][g], [2t+1][g].
#ifndef TRTGLM_ATTENTION_MMA_CUH
#define TRTGLM_ATTENTION_MMA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace trtglm
{
namespace attn
{

__device__ __forceinline__ uint32_t smemAddress(void const* p)
{
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronous; valid == false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cpAsync16(uint32_t dst, void const* src, bool valid)
{
    int const bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cpAsyncCommit()
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cpAsyncWait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrixX4(uint32_t (&r)[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrixX4Trans(uint32_t (&r)[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void syncBlock()
{
    __syncthreads();
}

__device__ __forceinline__ void syncWarp()
{
    __syncwarp();
}

__device__ __forceinline__ float shflXor(float v, int mask)
{
    return __shfl_xor_sync(0xffffffffu, v, mask);
}

// 2^x (ex2.approx under --use_fast_math; 2^-inf = 0).
__device__ __forceinline__ float exp2Fast(float x)
{
    return exp2f(x);
}

// The element type's mma and conversions. pack(lo, hi): two values rounded to T in one b32, lo in the low half.
template <typename T>
struct Mma;

template <>
struct Mma<__half>
{
    static __device__ __forceinline__ void run(float (&c)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
    {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __half2 const h = __floats2half2_rn(lo, hi);
        uint32_t u;
        memcpy(&u, &h, sizeof(u));
        return u;
    }
};

template <>
struct Mma<__nv_bfloat16>
{
    static __device__ __forceinline__ void run(float (&c)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
    {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __nv_bfloat162 const h = __floats2bfloat162_rn(lo, hi);
        uint32_t u;
        memcpy(&u, &h, sizeof(u));
        return u;
    }
};

} // namespace attn
} // namespace trtglm

#endif // TRTGLM_ATTENTION_MMA_CUH
