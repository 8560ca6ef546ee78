// Shared memory tiles of the attention kernels: constants, the XOR swizzle and the cp.async tile copy.
//
// A tile holds rows of D elements as D / 8 chunks of 16 bytes; chunk c of row r is stored at chunk c ^ (r & 7) of
// that row, so the 8 rows an ldmatrix phase reads, and the 16-byte chunks a cp.async phase writes, fall in 8
// distinct bank groups: no bank conflicts.
#ifndef TRTGLM_ATTENTION_TILE_CUH
#define TRTGLM_ATTENTION_TILE_CUH

#include "attention_mma.cuh"

#include <cstdint>

namespace trtglm
{
namespace attn
{

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_huge_valf();

// Element offset of chunk `chunk` (8 elements) of row `row` in a swizzled tile of rows of D elements.
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk)
{
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// Copy a tile of ROWS x D elements (rows of a contiguous [*, D] tensor starting at `src`) into the swizzled shared
// tile `dst` with cp.async, NTHREADS threads cooperating (thread `tid`); rows >= rows_valid are zero-filled and
// not read (`src` itself must point into the tensor). Thread tid copies chunk tid % (D / 8) of rows
// tid / (D / 8) + i * NTHREADS / (D / 8): consecutive threads take consecutive chunks of a row (whole 128-byte
// lines per 8 threads), and each thread's addresses differ from its first by constants.
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void loadTile(T* dst, T const* src, int rows_valid, int tid)
{
    constexpr int kChunks = D / 8;
    static_assert(NTHREADS % kChunks == 0 && ROWS % (NTHREADS / kChunks) == 0, "tile must split evenly");
    constexpr int kStep = NTHREADS / kChunks; // rows between a thread's chunks
    int const row0 = tid / kChunks;
    int const chunk = tid % kChunks;
    T const* const from0 = src + row0 * D + chunk * 8;
    uint32_t const to = smemAddress(dst);
    int const left = rows_valid - row0;
#pragma unroll
    for (int i = 0; i < ROWS / kStep; ++i)
    {
        int const row = row0 + i * kStep;
        // kStep a multiple of 8: every row of this thread has the same swizzle.
        int const offset = kStep % 8 == 0 ? swizzle<D>(row0, chunk) + i * kStep * D : swizzle<D>(row, chunk);
        bool const valid = i * kStep < left;
        cpAsync16(to + 2 * offset, valid ? from0 + static_cast<int64_t>(i) * kStep * D : src, valid);
    }
}

} // namespace attn
} // namespace trtglm

#endif // TRTGLM_ATTENTION_TILE_CUH
