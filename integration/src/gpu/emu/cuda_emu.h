// A CPU stand-in for the CUDA runtime features that kernels.cu uses, so that the kernels
// themselves (not a re-implementation) can be checked on a machine without a GPU: one OS thread
// per CUDA thread, one block at a time, real barriers for __syncthreads and for every warp
// shuffle or ballot, atomics through std::atomic_ref, and __shared__ variables as function
// statics (shared by the threads of the block in flight). Slow, and only as faithful as the
// kernels' own synchronisation: a missing __syncthreads can go unnoticed here.
#pragma once

#include <math.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
    unsigned x, y, z, w;
};
struct float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

namespace emu {

// The block in flight: its barrier, one barrier per warp, and a mailbox per warp for shuffles.
struct Block {
    explicit Block(unsigned n) : bar(n) {
        for (unsigned w = 0; w * 32 < n; w++) {
            lanes.push_back(std::min(32u, n - w * 32));
            warps.emplace_back(std::make_unique<std::barrier<>>(lanes.back()));
        }
        mail.resize(warps.size());
    }
    std::barrier<> bar;
    std::vector<unsigned> lanes;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<std::array<uint64_t, 32>> mail;
    // Per warp and lane, the six fragment registers of a tensor-core product (a[4], b[2]).
    std::vector<std::array<std::array<unsigned, 6>, 32>> frags = std::vector<std::array<std::array<unsigned, 6>, 32>>(32);
};

inline thread_local dim3 t_idx, b_idx;
inline dim3 b_dim, g_dim;
inline Block* block = nullptr;

// Every lane of the warp posts `v`; each returns the value posted by lane `src`.
template <class T>
T exchange(T v, unsigned src) {
    unsigned w = t_idx.x / 32, lane = t_idx.x % 32;
    auto& box = block->mail[w];
    uint64_t raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    box[lane] = raw;
    block->warps[w]->arrive_and_wait();
    uint64_t got = box[src % block->lanes[w]];
    block->warps[w]->arrive_and_wait();
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}

// Runs `kernel()` for every thread of every block of the grid (blocks one after another).
template <class F>
void launch(dim3 grid, dim3 blk, F kernel) {
    g_dim = grid;
    b_dim = blk;
    unsigned n = blk.x;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                Block b(n);
                block = &b;
                std::vector<std::thread> threads;
                threads.reserve(n);
                for (unsigned t = 0; t < n; t++)
                    threads.emplace_back([&, t] {
                        t_idx = {t, 0, 0};
                        b_idx = {x, y, z};
                        kernel();
                    });
                for (auto& th : threads) th.join();
                block = nullptr;
            }
}

}  // namespace emu

#define threadIdx emu::t_idx
#define blockIdx emu::b_idx
#define blockDim emu::b_dim
#define gridDim emu::g_dim
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu::exchange(v, (emu::t_idx.x % 32) ^ (unsigned)o); }
inline float __shfl_sync(unsigned, float v, int src) { return emu::exchange(v, (unsigned)src); }
inline unsigned __ballot_sync(unsigned, bool pred) {
    unsigned w = emu::t_idx.x / 32, lane = emu::t_idx.x % 32;
    auto& box = emu::block->mail[w];
    box[lane] = pred ? 1 : 0;
    emu::block->warps[w]->arrive_and_wait();
    unsigned bits = 0;
    for (unsigned i = 0; i < emu::block->lanes[w]; i++) bits |= (box[i] ? 1u : 0u) << i;
    emu::block->warps[w]->arrive_and_wait();
    return bits;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline int atomicSub(int* p, int v) { return std::atomic_ref<int>(*p).fetch_sub(v); }
inline int atomicExch(int* p, int v) { return std::atomic_ref<int>(*p).exchange(v); }
using std::max;
using std::min;

// Asynchronous global-to-shared copies (cp.async): queued per thread and performed only when the
// thread waits for their group, so a kernel that reads a stage before waiting for it (or before
// the barrier after the wait) reads stale data here and fails the check.
#define DMS_CUDA_EMU 1
namespace emu {
struct Copy {
    void* dst;
    const void* src;
};
inline thread_local std::vector<std::vector<Copy>> t_groups;
inline thread_local std::vector<Copy> t_open;
}  // namespace emu
inline void cp_async16(void* smem, const void* gmem) { emu::t_open.push_back({smem, gmem}); }
inline void cp_async_commit() {
    emu::t_groups.push_back(std::move(emu::t_open));
    emu::t_open.clear();
}
// mma.sync m16n8k16 (bf16 in, f32 accumulate) for the calling lane's warp, from the fragment
// layout documented beside the kernels' own definition: every lane posts its A and B registers,
// then computes its four outputs from everyone's (in f32, summing k in order).
inline void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b, const float* c) {
    unsigned w = emu::t_idx.x / 32, lane = emu::t_idx.x % 32;
    auto& box = emu::block->frags[w];
    for (int i = 0; i < 4; i++) box[lane][i] = a[i];
    box[lane][4] = b[0];
    box[lane][5] = b[1];
    emu::block->warps[w]->arrive_and_wait();
    auto half = [](unsigned reg, int hi) {
        unsigned bits = (reg >> (16 * hi)) & 0xffffu;
        unsigned u = bits << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    };
    auto A = [&](int row, int col) { return half(box[(row % 8) * 4 + (col % 8) / 2][(row >= 8) + 2 * (col >= 8)], col % 2); };
    auto B = [&](int k, int col) { return half(box[col * 4 + (k % 8) / 2][4 + (k >= 8)], k % 2); };
    int g = lane / 4, t = lane % 4;
    float out[4];
    for (int i = 0; i < 4; i++) {
        int row = g + (i >= 2 ? 8 : 0), col = 2 * t + i % 2;
        float x = c[i];
        for (int k = 0; k < 16; k++) x += A(row, k) * B(k, col);
        out[i] = x;
    }
    emu::block->warps[w]->arrive_and_wait();
    for (int i = 0; i < 4; i++) d[i] = out[i];
}

template <int N>
inline void cp_async_wait() {
    while (emu::t_groups.size() > (size_t)N) {
        for (const auto& c : emu::t_groups.front()) std::memcpy(c.dst, c.src, 16);
        emu::t_groups.erase(emu::t_groups.begin());
    }
}
