// Host emulation of trtglm's attention kernel bodies: the real attention_prefill.cuh / attention_decode.cuh /
// attention_tile.cuh compiled by g++, with the hardware primitives of attention_mma.cuh replaced by a fiber-based
// warp emulator that follows the PTX ISA's definitions (ldmatrix, mma.m16n8k16, cp.async groups, barriers,
// shuffles). One OS thread; each CUDA thread is a ucontext fiber; fibers switch only at barriers.
// Checks: deadlock (a barrier not reached by all), divergent warp collectives, misaligned/out-of-range shared
// addresses, reads of a cp.async destination before its wait (destinations are poisoned with NaN at issue and
// filled only at cp.async.wait_group), copies still in flight at exit.
//
// g++ -std=c++20 -O2 -shared -fPIC -I/usr/local/cuda/include -I<repo>/plugins emu.cpp -o libattnemu.so
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define TRTGLM_ATTENTION_MMA_CUH // the emulator supplies the primitives

namespace emu
{
struct Fiber
{
    ucontext_t ctx;
    std::vector<char> stack;
    int tid = 0;
    bool done = false;
    struct Copy
    {
        uint32_t dst;
        void const* src;
        bool valid;
        long group; // -1: not committed yet
    };
    std::vector<Copy> pending;
    long next_group = 0;
};
struct Barrier
{
    int count = 0;
    int arrived = 0;
    uint64_t gen = 0;
};
struct WarpX
{
    int op[32];
    uint32_t u[32][6];
    float f[32];
};

static ucontext_t g_sched;
static std::vector<Fiber> g_fibers;
static Fiber* g_cur = nullptr;
static Barrier g_block;
static std::vector<Barrier> g_warps;
static std::vector<WarpX> g_x;
static std::vector<unsigned char> g_smem;
static uint64_t g_progress = 0;
static std::function<void(int)> g_fn;
static int g_errors = 0;

static void fail(char const* what)
{
    if (g_errors++ < 20)
    {
        std::fprintf(stderr, "emu: tid %d: %s\n", g_cur ? g_cur->tid : -1, what);
    }
}

static void yield()
{
    swapcontext(&g_cur->ctx, &g_sched);
}

static void arrive(Barrier& b)
{
    uint64_t const gen = b.gen;
    if (++b.arrived == b.count)
    {
        b.arrived = 0;
        ++b.gen;
        ++g_progress;
        yield(); // let the others run first: the most adversarial order for the one that released
    }
    else
    {
        while (b.gen == gen)
        {
            yield();
        }
    }
}

static void trampoline()
{
    g_fn(g_cur->tid);
    if (!g_cur->pending.empty())
    {
        fail("cp.async copies still in flight at exit");
    }
    g_cur->done = true;
    ++g_progress;
}

static int runBlock(int threads, size_t smem_bytes, std::function<void(int)> fn)
{
    g_fn = std::move(fn);
    g_smem.assign(smem_bytes + 16, 0xff);
    g_fibers.clear();
    g_fibers.resize(threads);
    g_block = Barrier{threads, 0, 0};
    g_warps.assign((threads + 31) / 32, Barrier{32, 0, 0});
    g_x.assign(g_warps.size(), WarpX{});
    for (int i = 0; i < threads; ++i)
    {
        Fiber& f = g_fibers[i];
        f.tid = i;
        f.stack.resize(256 * 1024);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &g_sched;
        makecontext(&f.ctx, trampoline, 0);
    }
    for (;;)
    {
        bool all_done = true;
        uint64_t const before = g_progress;
        for (auto& f : g_fibers)
        {
            if (f.done)
            {
                continue;
            }
            all_done = false;
            g_cur = &f;
            swapcontext(&g_sched, &f.ctx);
        }
        g_cur = nullptr;
        if (all_done)
        {
            return 0;
        }
        if (g_progress == before)
        {
            std::fprintf(stderr, "emu: deadlock (a barrier some threads never reach)\n");
            ++g_errors;
            return 1;
        }
    }
}

static int lane()
{
    return g_cur->tid & 31;
}
static WarpX& wx()
{
    return g_x[g_cur->tid >> 5];
}
static void warpArrive(int op)
{
    wx().op[lane()] = op;
    arrive(g_warps[g_cur->tid >> 5]);
    for (int l = 0; l < 32; ++l)
    {
        if (wx().op[l] != op)
        {
            fail("divergent warp collective");
            break;
        }
    }
}
static void warpLeave()
{
    arrive(g_warps[g_cur->tid >> 5]);
}

static unsigned char* smemAt(uint32_t addr, uint32_t bytes, uint32_t align)
{
    if (addr % align || addr + bytes > g_smem.size() - 16)
    {
        fail("shared address misaligned or out of range");
        return g_smem.data();
    }
    return g_smem.data() + addr;
}

static float halfBits(uint16_t h, bool bf16)
{
    if (bf16)
    {
        uint32_t u = static_cast<uint32_t>(h) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    __half x;
    std::memcpy(&x, &h, 2);
    return __half2float(x);
}

static void doCopy(Fiber::Copy const& c)
{
    unsigned char* d = smemAt(c.dst, 16, 16);
    if (c.valid)
    {
        std::memcpy(d, c.src, 16);
    }
    else
    {
        std::memset(d, 0, 16);
    }
}
} // namespace emu

namespace trtglm
{
namespace attn
{
inline int min(int a, int b)
{
    return a < b ? a : b;
}

inline uint32_t smemAddress(void const* p)
{
    return static_cast<uint32_t>(static_cast<unsigned char const*>(p) - emu::g_smem.data());
}

inline void cpAsync16(uint32_t dst, void const* src, bool valid)
{
    std::memset(emu::smemAt(dst, 16, 16), 0xff, 16); // NaN until the wait
    if (reinterpret_cast<uintptr_t>(src) % 16)
    {
        emu::fail("cp.async global source not 16-byte aligned");
    }
    emu::g_cur->pending.push_back({dst, src, valid, -1});
}

inline void cpAsyncCommit()
{
    for (auto& c : emu::g_cur->pending)
    {
        if (c.group < 0)
        {
            c.group = emu::g_cur->next_group;
        }
    }
    ++emu::g_cur->next_group;
}

template <int N>
inline void cpAsyncWait()
{
    auto& p = emu::g_cur->pending;
    long const keep_from = emu::g_cur->next_group - N; // groups >= keep_from may stay in flight
    std::vector<emu::Fiber::Copy> rest;
    for (auto& c : p)
    {
        if (c.group >= 0 && c.group < keep_from)
        {
            emu::doCopy(c);
        }
        else
        {
            rest.push_back(c);
        }
    }
    p.swap(rest);
}

inline void ldmatrixImpl(uint32_t (&r)[4], uint32_t addr, bool trans)
{
    auto& x = emu::wx();
    x.u[emu::lane()][0] = addr;
    emu::warpArrive(trans ? 2 : 1);
    int const l = emu::lane();
    int const g = l >> 2;
    int const t = l & 3;
    for (int i = 0; i < 4; ++i)
    {
        for (int rr = 0; rr < 8; ++rr)
        {
            emu::smemAt(x.u[8 * i + rr][0], 16, 16);
        }
        if (!trans)
        {
            std::memcpy(&r[i], emu::smemAt(x.u[8 * i + g][0] + 4 * t, 4, 4), 4);
        }
        else
        {
            uint16_t lo, hi;
            std::memcpy(&lo, emu::smemAt(x.u[8 * i + 2 * t][0] + 2 * g, 2, 2), 2);
            std::memcpy(&hi, emu::smemAt(x.u[8 * i + 2 * t + 1][0] + 2 * g, 2, 2), 2);
            r[i] = lo | (static_cast<uint32_t>(hi) << 16);
        }
    }
    emu::warpLeave();
}

inline void ldmatrixX4(uint32_t (&r)[4], uint32_t addr)
{
    ldmatrixImpl(r, addr, false);
}
inline void ldmatrixX4Trans(uint32_t (&r)[4], uint32_t addr)
{
    ldmatrixImpl(r, addr, true);
}

inline void syncBlock()
{
    emu::arrive(emu::g_block);
}
inline void syncWarp()
{
    emu::warpArrive(3);
    emu::warpLeave();
}
inline float shflXor(float v, int mask)
{
    auto& x = emu::wx();
    x.f[emu::lane()] = v;
    emu::warpArrive(4 + mask);
    float const r = x.f[emu::lane() ^ mask];
    emu::warpLeave();
    return r;
}
inline float exp2Fast(float x)
{
    return exp2f(x);
}

template <bool BF16>
inline void mmaImpl(float (&c)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
{
    auto& x = emu::wx();
    int const l = emu::lane();
    for (int i = 0; i < 4; ++i)
    {
        x.u[l][i] = a[i];
    }
    x.u[l][4] = b0;
    x.u[l][5] = b1;
    emu::warpArrive(BF16 ? 11 : 10);
    float A[16][16], B[16][8];
    for (int L = 0; L < 32; ++L)
    {
        int const g = L >> 2;
        int const t = L & 3;
        auto lo = [&](uint32_t w) { return emu::halfBits(w & 0xffff, BF16); };
        auto hi = [&](uint32_t w) { return emu::halfBits(w >> 16, BF16); };
        A[g][2 * t] = lo(x.u[L][0]);
        A[g][2 * t + 1] = hi(x.u[L][0]);
        A[g + 8][2 * t] = lo(x.u[L][1]);
        A[g + 8][2 * t + 1] = hi(x.u[L][1]);
        A[g][2 * t + 8] = lo(x.u[L][2]);
        A[g][2 * t + 9] = hi(x.u[L][2]);
        A[g + 8][2 * t + 8] = lo(x.u[L][3]);
        A[g + 8][2 * t + 9] = hi(x.u[L][3]);
        B[2 * t][g] = lo(x.u[L][4]);
        B[2 * t + 1][g] = hi(x.u[L][4]);
        B[2 * t + 8][g] = lo(x.u[L][5]);
        B[2 * t + 9][g] = hi(x.u[L][5]);
    }
    int const g = l >> 2;
    int const t = l & 3;
    for (int e = 0; e < 4; ++e)
    {
        int const row = g + ((e >> 1) << 3);
        int const col = 2 * t + (e & 1);
        float acc = c[e];
        for (int kk = 0; kk < 16; ++kk)
        {
            acc += A[row][kk] * B[kk][col];
        }
        c[e] = acc;
    }
    emu::warpLeave();
}

template <typename T>
struct Mma;
template <>
struct Mma<__half>
{
    static void run(float (&c)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
    {
        mmaImpl<false>(c, a, b0, b1);
    }
    static uint32_t pack(float lo, float hi)
    {
        __half2 const h = __floats2half2_rn(lo, hi);
        uint32_t u;
        std::memcpy(&u, &h, 4);
        return u;
    }
};
template <>
struct Mma<__nv_bfloat16>
{
    static void run(float (&c)[4], uint32_t const (&a)[4], uint32_t b0, uint32_t b1)
    {
        mmaImpl<true>(c, a, b0, b1);
    }
    static uint32_t pack(float lo, float hi)
    {
        __nv_bfloat162 const h = __floats2bfloat162_rn(lo, hi);
        uint32_t u;
        std::memcpy(&u, &h, 4);
        return u;
    }
};
} // namespace attn
} // namespace trtglm

#include "attention/attention_decode.cuh"
#include "attention/attention_prefill.cuh"

using namespace trtglm::attn;

// The block loops mirror the extern "C" wrappers in attention.cu (grid decoding, guards).
template <int D, typename T>
static int prefill(int gx, int gy, void const* q, void const* k, void const* v, void* out, int batch, int q_heads,
    int kv_heads, int q_len, int kv_len, float scale, int causal)
{
    using Cfg = PrefillConfig<D>;
    for (int by = 0; by < gy; ++by)
    {
        for (int bx = 0; bx < gx; ++bx)
        {
            if (static_cast<int64_t>(bx) >= static_cast<int64_t>(batch) * q_heads)
            {
                continue;
            }
            int const m_block = gy - 1 - by;
            emu::runBlock(Cfg::kThreads, Cfg::kSmemBytes,
                [&](int tid)
                {
                    prefillAttention<D, T>(static_cast<T const*>(q), static_cast<T const*>(k),
                        static_cast<T const*>(v), static_cast<T*>(out), q_heads, kv_heads, q_len, kv_len, scale,
                        causal != 0, reinterpret_cast<T*>(emu::g_smem.data()), tid, bx, m_block);
                });
        }
    }
    return emu::g_errors;
}

template <int D, typename T>
static int decode(int gx, int gy, void const* q, void const* k, void const* v, float* partial, void* out, int batch,
    int q_heads, int kv_heads, int kv_len, float scale, int num_splits)
{
    using Cfg = DecodeConfig<D>;
    for (int by = 0; by < gy; ++by)
    {
        for (int bx = 0; bx < gx; ++bx)
        {
            emu::runBlock(Cfg::kThreads, Cfg::kSmemBytes,
                [&](int tid)
                {
                    decodeAttention<D, T>(static_cast<T const*>(q), static_cast<T const*>(k),
                        static_cast<T const*>(v), partial, static_cast<T*>(out), batch, q_heads, kv_heads, kv_len,
                        scale, num_splits, reinterpret_cast<T*>(emu::g_smem.data()), tid, bx, by);
                });
        }
    }
    return emu::g_errors;
}

template <int D, typename T>
static int combine(int gx, float const* partial, void* out, int batch, int q_heads, int num_splits)
{
    int64_t const rows = static_cast<int64_t>(batch) * q_heads;
    for (int bx = 0; bx < gx; ++bx)
    {
        emu::runBlock(32 * kCombineWarps, 0,
            [&](int tid) { combineAttention<D, T>(partial, static_cast<T*>(out), rows, num_splits, tid, bx); });
    }
    return emu::g_errors;
}

#define DISPATCH(fn, ...)                                                                                              \
    emu::g_errors = 0;                                                                                                 \
    if (d == 64)                                                                                                       \
        return bf16 ? fn<64, __nv_bfloat16>(__VA_ARGS__) : fn<64, __half>(__VA_ARGS__);                               \
    return bf16 ? fn<128, __nv_bfloat16>(__VA_ARGS__) : fn<128, __half>(__VA_ARGS__);

extern "C" int emu_prefill(int d, int bf16, int gx, int gy, void const* q, void const* k, void const* v, void* out,
    int batch, int q_heads, int kv_heads, int q_len, int kv_len, float scale, int causal)
{
    DISPATCH(prefill, gx, gy, q, k, v, out, batch, q_heads, kv_heads, q_len, kv_len, scale, causal)
}

extern "C" int emu_decode(int d, int bf16, int gx, int gy, void const* q, void const* k, void const* v,
    float* partial, void* out, int batch, int q_heads, int kv_heads, int kv_len, float scale, int num_splits)
{
    DISPATCH(decode, gx, gy, q, k, v, partial, out, batch, q_heads, kv_heads, kv_len, scale, num_splits)
}

extern "C" int emu_combine(int d, int bf16, int gx, float const* partial, void* out, int batch, int q_heads,
    int num_splits)
{
    DISPATCH(combine, gx, partial, out, batch, q_heads, num_splits)
}

extern "C" int emu_smem(int kind, int d)
{
    if (kind == 0)
        return d == 64 ? PrefillConfig<64>::kSmemBytes : PrefillConfig<128>::kSmemBytes;
    return d == 64 ? DecodeConfig<64>::kSmemBytes : DecodeConfig<128>::kSmemBytes;
}
