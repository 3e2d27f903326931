// CUDA kernels of the DMS engine: device-side delayed-eviction bookkeeping fused with the K/V
// write, and split-K paged decode attention over per-(sequence, KV head) rows of different
// lengths (no padding to the longest row). Compiled to PTX by build.rs with nvcc.
//
// Element type T is float or bf16 (stored as unsigned short, converted by hand so that no
// toolkit header is needed).

typedef unsigned short bf16_t;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16_t x) { return __uint_as_float(((unsigned int)x) << 16); }
__device__ __forceinline__ void from_f(float v, float* out) { *out = v; }
__device__ __forceinline__ void from_f(float v, bf16_t* out) {
    unsigned int u = __float_as_uint(v);
    u += 0x7FFFu + ((u >> 16) & 1u);
    *out = (bf16_t)(u >> 16);
}

// Same mixing as dms-policy's `hash_unit` (random decisions at a set rate): (seed, layer, head, pos).
__device__ double hash_unit(unsigned long long seed, unsigned long long layer, unsigned long long head,
                            unsigned long long pos) {
    unsigned long long x = seed ^ 0x9E3779B97F4A7C15ull;
    unsigned long long v[3] = {layer, head, pos};
    for (int i = 0; i < 3; i++) {
        x = (x ^ v[i]) * 0xBF58476D1CE4E5B9ull;
        x ^= x >> 31;
        x = x * 0x94D049BB133111EBull;
        x ^= x >> 29;
    }
    return (double)(x >> 11) / 9007199254740992.0;
}

// What one sequence of the cache executes (its policy's device program): the decision mode (0
// none, 1 random at `rate` with `seed`, 2 learned: score * scale - offset > 0, 3 every token: a
// sliding window), its ring of the
// last W + 1 tokens (`wc`, at most the cache's ring capacity) and its attention sinks (positions
// below `sinks` are never flagged). Sequences of one batch may differ. The host writes the same
// 40-byte layout (`gpu::cache::program_bytes`).
struct SeqProgram {
    int mode;
    int wc;
    unsigned long long seed;
    double rate;
    float scale;
    float offset;
    int sinks;
    int unused;
};

// One decode token per row: decide by its sequence's program, evict the flagged token leaving
// the window of W+1 (reusing its slot) or append (taking a block from the free list when needed),
// then write K and V. Rings are `cap` entries apart. grid = rows of this layer, block = D.
// Latent rows (MLA) pass the key pool as v_pool: the values are part of the key row.
template <typename T>
__device__ void decode_update(int kv_heads, int d_head, int bs, int cap, int max_blocks, int layer,
                              const T* k_new, const T* v_new, T* k_pool, T* v_pool,
                              int* block_table, int* row_len, int* row_pos, int* ring_slot,
                              unsigned char* ring_flag, int* pool_pos, const int* free_list,
                              int* free_top, int* err, const SeqProgram* progs, const float* scores) {
    int r = blockIdx.x;
    __shared__ long long s_addr;
    if (threadIdx.x == 0) {
        int pos = row_pos[r];
        int len = row_len[r];
        int head = r % kv_heads;
        const SeqProgram prog = progs[r / kv_heads];
        int wc = prog.wc;
        bool d = false;
        if (prog.mode == 1) {
            d = pos > 0 && hash_unit(prog.seed, layer, head, pos - 1) < prog.rate;
        } else if (prog.mode == 2) {
            d = scores[r] * prog.scale - prog.offset > 0.0f;
        } else if (prog.mode == 3) {
            d = true;
        }
        unsigned char* flags = ring_flag + (long long)r * cap;
        int* slots = ring_slot + (long long)r * cap;
        if (pos > 0) flags[(pos - 1) % wc] = d && pos - 1 >= prog.sinks ? 1 : 0;
        bool evict = false;
        int slot = len;
        if (pos >= wc && flags[pos % wc]) {
            evict = true;
            slot = slots[pos % wc];
        }
        slots[pos % wc] = slot;
        flags[pos % wc] = 0;
        int* table = block_table + (long long)r * max_blocks;
        bool fail = false;
        if (!evict) {
            if (len % bs == 0) {
                // A full table takes no block; an empty free list gives its pop back, so the
                // free list stays exact after a failed step.
                if (len / bs >= max_blocks) {
                    atomicExch(err, 1);
                    fail = true;
                } else {
                    int top = atomicSub(free_top, 1) - 1;
                    if (top < 0) {
                        atomicAdd(free_top, 1);
                        atomicExch(err, 1);
                        fail = true;
                    } else {
                        table[len / bs] = free_list[top];
                    }
                }
            }
            len += 1;
        }
        if (fail) {
            s_addr = -1;
        } else {
            s_addr = (long long)table[slot / bs] * bs + slot % bs;
            pool_pos[s_addr] = pos;
            row_len[r] = len;
            row_pos[r] = pos + 1;
        }
    }
    __syncthreads();
    if (s_addr < 0) return;
    for (int i = threadIdx.x; i < d_head; i += blockDim.x) {
        k_pool[s_addr * d_head + i] = k_new[(long long)r * d_head + i];
        if (v_pool != k_pool) v_pool[s_addr * d_head + i] = v_new[(long long)r * d_head + i];
    }
}

#define TILE 128
#define MAXG 8
#define MAXD 256
#define THREADS 128

// 16-byte vector loads converted to floats.
template <typename T> struct VecOf;
template <> struct VecOf<float> { static const int N = 4; };
template <> struct VecOf<bf16_t> { static const int N = 8; };
__device__ __forceinline__ uint4 ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void unpack(uint4 v, float* o, float) {
    o[0] = __uint_as_float(v.x); o[1] = __uint_as_float(v.y); o[2] = __uint_as_float(v.z); o[3] = __uint_as_float(v.w);
}
__device__ __forceinline__ void unpack(uint4 v, float* o, bf16_t) {
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; i++) {
        o[2 * i] = __uint_as_float(w[i] << 16);
        o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* o) { unpack(ld16(p), o, T()); }

// Keys [start, end) of split `split` of `splits` over a row of `len` keys (even chunks; the
// last splits may be empty).
__device__ __forceinline__ void split_range(int len, int split, int splits, int& start, int& end) {
    int chunk = (len + splits - 1) / splits;
    start = split * chunk;
    end = min(len, start + chunk);
}

// Online softmax over one tile of scores, a warp per head: turns sc[g][0..n) into
// exp(score - new max) and updates the running max s_m, sum s_l and the rescale factor s_alpha
// of the accumulated outputs. Callers put a block barrier before and after.
template <int G, int TW>
__device__ __forceinline__ void tile_softmax(float (*sc)[TW], float* s_alpha, float* s_m, float* s_l, int n, int warp,
                                             int lane, int nwarps) {
    for (int g = warp; g < G; g += nwarps) {
        float mx = -INFINITY;
        for (int j = lane; j < n; j += 32) mx = fmaxf(mx, sc[g][j]);
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float m_old = s_m[g];
        float m_new = fmaxf(m_old, mx);
        float sum = 0.0f;
        for (int j = lane; j < n; j += 32) {
            float p = __expf(sc[g][j] - m_new);
            sc[g][j] = p;
            sum += p;
        }
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) {
            float a = (m_old == -INFINITY) ? 0.0f : __expf(m_old - m_new);
            s_alpha[g] = a;
            s_l[g] = s_l[g] * a + sum;
            s_m[g] = m_new;
        }
    }
}

// End of the value phase of the tiled kernels: thread (key group, vector v) holds dims
// [v*VEC, v*VEC+VEC) of each of the G heads for its keys; sums the key groups through shared
// `gsum` and writes head g's `width` floats to out[g * width ..]. Whole block, barriers inside.
template <int G, int VEC>
__device__ __forceinline__ void write_group_sums(float (*acc)[8], float* gsum, int width, bool active, int v_vec,
                                                 int tid, float* out) {
    for (int g = 0; g < G; g++) {
        for (int i = tid; i < width; i += THREADS) gsum[i] = 0.0f;
        __syncthreads();
        if (active)
            for (int e = 0; e < VEC; e++) atomicAdd(&gsum[v_vec * VEC + e], acc[g][e]);
        __syncthreads();
        for (int i = tid; i < width; i += THREADS) out[(long long)g * width + i] = gsum[i];
        __syncthreads();
    }
}

// Split-K paged decode attention, first pass. grid = (rows, splits), block = THREADS.
// Row r = b * kv_heads + h holds the keys of KV head h of sequence b; its G query heads are
// q[b, h*G .. h*G+G). Scores: LPK lanes share one key (16-byte loads, log2(LPK) shuffles per
// head), so a warp scores 32/LPK keys at once. Values: each thread owns one 16-byte vector of
// dimensions for a subset of keys; the key groups are summed at the end. Writes per
// (row, split, head) the running max, sum and unnormalised output.
template <typename T, int G>
__device__ void decode_partial_g(int kv_heads, int d_head, int bs, int max_blocks, float scale,
                               const T* q, const T* k_pool, const T* v_pool, const int* block_table,
                               const int* row_len, float* part_acc, float* part_m, float* part_l) {
    const int VEC = VecOf<T>::N;
    int r = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nwarps = THREADS / 32;
    __shared__ float qs[MAXG][MAXD];
    __shared__ float sc[MAXG][TILE];
    __shared__ float s_alpha[MAXG], s_m[MAXG], s_l[MAXG];
    int b = r / kv_heads, h = r % kv_heads;
    int n_heads = kv_heads * G;
    int nvec = d_head / VEC;                  // 16-byte vectors per key
    int lpk = nvec < 4 ? nvec : 4;            // lanes per key when scoring
    int vpl = nvec / lpk;                     // vectors per lane when scoring
    int kpw = 32 / lpk;                       // keys per warp pass
    int kpb = THREADS / nvec;                 // keys in flight in the value phase
    for (int g = 0; g < G; g++)
        for (int i = tid; i < d_head; i += THREADS)
            qs[g][i] = to_f(q[((long long)b * n_heads + h * G + g) * d_head + i]) * scale;
    if (tid < G) { s_m[tid] = -INFINITY; s_l[tid] = 0.0f; }
    float acc[G][8];
    for (int g = 0; g < G; g++)
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    int start, end;
    split_range(row_len[r], split, splits, start, end);
    const int* table = block_table + (long long)r * max_blocks;
    int my_key = lane / lpk, my_part = lane % lpk;
    int v_key = tid / nvec, v_vec = tid % nvec;
    __syncthreads();
    for (int t0 = start; t0 < end; t0 += TILE) {
        int n = min(TILE, end - t0);
        for (int j0 = warp * kpw; j0 < n; j0 += nwarps * kpw) {
            int j = j0 + my_key;
            float part[G];
#pragma unroll
            for (int g = 0; g < G; g++) part[g] = 0.0f;
            if (my_key < kpw && j < n) {
                int slot = t0 + j;
                const T* kp = k_pool + ((long long)table[slot / bs] * bs + slot % bs) * d_head;
                for (int c = 0; c < vpl; c++) {
                    int v0 = (my_part * vpl + c) * VEC;
                    float kv[8];
                    load_vec(kp + v0, kv);
                    for (int g = 0; g < G; g++)
                        for (int e = 0; e < VEC; e++) part[g] += qs[g][v0 + e] * kv[e];
                }
            }
            for (int g = 0; g < G; g++) {
                float x = part[g];
                for (int o = lpk / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
                if (my_part == 0 && my_key < kpw && j < n) sc[g][j] = x;
            }
        }
        __syncthreads();
        tile_softmax<G, TILE>(sc, s_alpha, s_m, s_l, n, warp, lane, nwarps);
        __syncthreads();
        for (int g = 0; g < G; g++) {
            float a = s_alpha[g];
            for (int e = 0; e < VEC; e++) acc[g][e] *= a;
        }
        if (v_key < kpb) {
            for (int j = v_key; j < n; j += kpb) {
                int slot = t0 + j;
                const T* vp = v_pool + ((long long)table[slot / bs] * bs + slot % bs) * d_head + v_vec * VEC;
                float vv[8];
                load_vec(vp, vv);
                for (int g = 0; g < G; g++) {
                    float p = sc[g][j];
                    for (int e = 0; e < VEC; e++) acc[g][e] += p * vv[e];
                }
            }
        }
        __syncthreads();
    }
    long long o = ((long long)r * splits + split) * G;
    __shared__ float gsum[MAXD];
    write_group_sums<G, VecOf<T>::N>(acc, gsum, d_head, v_key < kpb, v_vec, tid, part_acc + o * d_head);
    if (tid < G) { part_m[o + tid] = s_m[tid]; part_l[o + tid] = s_l[tid]; }
}

// Split-K paged decode attention, first pass, "warps" variant: the warps of a block work
// independently (no block barrier per tile). Each warp takes every nwarps-th pass of KPW keys of
// the split, issues all of a pass's K and V loads (16 bytes each) before using any, and keeps its
// own online softmax; the warps merge once at the end. Scores: LPK lanes per key. Values: lane
// (kh, vv) owns 16-byte vector vv of the keys kh, kh + 32/nvec, ... of the pass. Needs
// nvec = d_head / VEC a power of two <= 16 (bf16 head_dim <= 128, f32 <= 64).
// grid = (rows, splits), block = THREADS.
template <typename T, int G>
__device__ void decode_partial_warps(int kv_heads, int d_head, int bs, int max_blocks, float scale,
                                     const T* q, const T* k_pool, const T* v_pool, const int* block_table,
                                     const int* row_len, float* part_acc, float* part_m, float* part_l) {
    const int VEC = VecOf<T>::N;
    const int NW = THREADS / 32;
    int r = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    __shared__ float qs[G][MAXD];
    __shared__ float s_acc[G][MAXD];
    __shared__ float s_m[NW][G], s_l[NW][G];
    int b = r / kv_heads, h = r % kv_heads, n_heads = kv_heads * G;
    int nvec = d_head / VEC;
    int lpk = nvec < 4 ? nvec : 4;   // lanes per key when scoring
    int vpl = nvec / lpk;            // vectors per lane when scoring (<= 4)
    int kpw = 32 / lpk;              // keys per pass
    int khn = 32 / nvec;             // key lanes in the value phase
    int nv = kpw / khn;              // value loads per lane per pass (<= 4)
    int grp = lane / lpk, part = lane % lpk;
    int kh = lane / nvec, vv = lane % nvec;
    for (int g = 0; g < G; g++)
        for (int i = tid; i < d_head; i += THREADS) {
            qs[g][i] = to_f(q[((long long)b * n_heads + h * G + g) * d_head + i]) * scale;
            s_acc[g][i] = 0.0f;
        }
    __syncthreads();
    int start, end;
    split_range(row_len[r], split, splits, start, end);
    const int* table = block_table + (long long)r * max_blocks;
    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    }
    for (int p0 = start + warp * kpw; p0 < end; p0 += NW * kpw) {
        int j = p0 + grp;
        uint4 kr[4], vr[4];
#pragma unroll
        for (int c = 0; c < 4; c++) kr[c] = vr[c] = make_uint4(0u, 0u, 0u, 0u);
        if (j < end) {
            const T* kp = k_pool + ((long long)table[j / bs] * bs + j % bs) * d_head + part * vpl * VEC;
#pragma unroll
            for (int c = 0; c < 4; c++)
                if (c < vpl) kr[c] = ld16(kp + c * VEC);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int jv = p0 + kh + i * khn;
            if (i < nv && jv < end)
                vr[i] = ld16(v_pool + ((long long)table[jv / bs] * bs + jv % bs) * d_head + vv * VEC);
        }
        float p[G];
#pragma unroll
        for (int g = 0; g < G; g++) p[g] = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            if (c < vpl) {
                float kf[8];
                unpack(kr[c], kf, T());
                int v0 = (part * vpl + c) * VEC;
#pragma unroll
                for (int g = 0; g < G; g++)
#pragma unroll
                    for (int e = 0; e < VEC; e++) p[g] += qs[g][v0 + e] * kf[e];
            }
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            float x = p[g];
            for (int o = lpk / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
            if (j >= end) x = -INFINITY;
            float mx = x;
            for (int o = lpk; o < 32; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float m_new = fmaxf(m[g], mx);
            float a = __expf(m[g] - m_new);
            float e_x = __expf(x - m_new);
            float sum = e_x;
            for (int o = lpk; o < 32; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            l[g] = l[g] * a + sum;
            m[g] = m_new;
            p[g] = e_x;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] *= a;
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (i < nv) {
                int key = kh + i * khn;
                float vf[8];
                unpack(vr[i], vf, T());
#pragma unroll
                for (int g = 0; g < G; g++) {
                    float pi = __shfl_sync(0xffffffffu, p[g], key * lpk);
                    if (p0 + key < end)
#pragma unroll
                        for (int e = 0; e < VEC; e++) acc[g][e] += pi * vf[e];
                }
            }
        }
    }
    // Sum the key lanes (lanes with the same vector), then merge the warps.
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int e = 0; e < 8; e++)
            for (int o = nvec; o < 32; o <<= 1) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
    if (lane == 0)
        for (int g = 0; g < G; g++) { s_m[warp][g] = m[g]; s_l[warp][g] = l[g]; }
    __syncthreads();
    if (lane < nvec) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            float mm = -INFINITY;
            for (int w = 0; w < NW; w++) mm = fmaxf(mm, s_m[w][g]);
            float wgt = (mm == -INFINITY || m[g] == -INFINITY) ? 0.0f : __expf(m[g] - mm);
            for (int e = 0; e < VEC; e++) atomicAdd(&s_acc[g][vv * VEC + e], acc[g][e] * wgt);
        }
    }
    __syncthreads();
    long long o = ((long long)r * splits + split) * G;
    for (int g = 0; g < G; g++)
        for (int i = tid; i < d_head; i += THREADS) part_acc[(o + g) * d_head + i] = s_acc[g][i];
    if (tid < G) {
        float mm = -INFINITY;
        for (int w = 0; w < NW; w++) mm = fmaxf(mm, s_m[w][tid]);
        float ll = 0.0f;
        if (mm != -INFINITY)
            for (int w = 0; w < NW; w++)
                if (s_m[w][tid] != -INFINITY) ll += s_l[w][tid] * __expf(s_m[w][tid] - mm);
        part_m[o + tid] = mm;
        part_l[o + tid] = ll;
    }
}

// Global-to-shared copies of 16 bytes that do not stall the issuing thread (cp.async, sm_80+),
// committed in groups; cp_async_wait<N> returns once at most the newest N groups are pending.
// The CPU emulation (emu/cuda_emu.h) defines its own, which land at the wait.
#ifndef DMS_CUDA_EMU
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif

// Double-buffered tiles of `kt` keys: before the tile at t0 (in stage `buf`) is used, start the
// next tile's copies into the other stage with `issue(t0 + kt, buf ^ 1)`, wait for this tile's own,
// then a block barrier so that every thread's copies have landed.
template <class Issue>
__device__ __forceinline__ void await_stage(int t0, int kt, int end, int buf, Issue& issue) {
    if (t0 + kt < end) {
        issue(t0 + kt, buf ^ 1);
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
    __syncthreads();
}

#define ASYNC_STAGE_BYTES 8192
#define ASYNC_MAXKT 64

// Split-K paged decode attention, first pass, "async" variant: the keys and values of each tile
// stream into shared memory with asynchronous copies, double-buffered, so the next tile's loads
// are in flight while this one is scored and summed (no thread waits on global memory between
// tiles). A tile is as many keys as fill ASYNC_STAGE_BYTES of keys (at most ASYNC_MAXKT); scores,
// softmax and values then run as in decode_partial_g, from shared memory. Same arguments and
// partials as decode_partial_g. grid = (rows, splits), block = THREADS.
template <typename T, int G>
__device__ void decode_partial_async(int kv_heads, int d_head, int bs, int max_blocks, float scale,
                                     const T* q, const T* k_pool, const T* v_pool, const int* block_table,
                                     const int* row_len, float* part_acc, float* part_m, float* part_l) {
    const int VEC = VecOf<T>::N;
    int r = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nwarps = THREADS / 32;
    __shared__ __align__(16) unsigned char stage[2][2][ASYNC_STAGE_BYTES];
    __shared__ float qs[G][MAXD];
    __shared__ float sc[G][ASYNC_MAXKT];
    __shared__ float s_alpha[MAXG], s_m[MAXG], s_l[MAXG];
    int b = r / kv_heads, h = r % kv_heads;
    int n_heads = kv_heads * G;
    int nvec = d_head / VEC;
    int lpk = nvec < 4 ? nvec : 4;
    int vpl = nvec / lpk;
    int kpw = 32 / lpk;
    int kpb = THREADS / nvec;
    int kt = min(ASYNC_MAXKT, ASYNC_STAGE_BYTES / (d_head * (int)sizeof(T)));
    for (int g = 0; g < G; g++)
        for (int i = tid; i < d_head; i += THREADS)
            qs[g][i] = to_f(q[((long long)b * n_heads + h * G + g) * d_head + i]) * scale;
    if (tid < G) { s_m[tid] = -INFINITY; s_l[tid] = 0.0f; }
    float acc[G][8];
    for (int g = 0; g < G; g++)
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    int start, end;
    split_range(row_len[r], split, splits, start, end);
    const int* table = block_table + (long long)r * max_blocks;
    int my_key = lane / lpk, my_part = lane % lpk;
    int v_key = tid / nvec, v_vec = tid % nvec;
    // Issues the copies of the tile at t0 into stage `buf` (one 16-byte vector of K and of V per
    // thread and pass) and commits them as one group.
    auto issue = [&](int t0, int buf) {
        int n = min(kt, end - t0);
        T* ks = reinterpret_cast<T*>(stage[buf][0]);
        T* vs = reinterpret_cast<T*>(stage[buf][1]);
        for (int c = tid; c < n * nvec; c += THREADS) {
            int j = c / nvec, v = c % nvec, slot = t0 + j;
            long long at = ((long long)table[slot / bs] * bs + slot % bs) * d_head + v * VEC;
            cp_async16(ks + j * d_head + v * VEC, k_pool + at);
            cp_async16(vs + j * d_head + v * VEC, v_pool + at);
        }
        cp_async_commit();
    };
    if (start < end) issue(start, 0);
    __syncthreads();
    int buf = 0;
    for (int t0 = start; t0 < end; t0 += kt, buf ^= 1) {
        int n = min(kt, end - t0);
        await_stage(t0, kt, end, buf, issue);
        const T* ks = reinterpret_cast<const T*>(stage[buf][0]);
        const T* vs = reinterpret_cast<const T*>(stage[buf][1]);
        for (int j0 = warp * kpw; j0 < n; j0 += nwarps * kpw) {
            int j = j0 + my_key;
            float part[G];
#pragma unroll
            for (int g = 0; g < G; g++) part[g] = 0.0f;
            if (j < n) {
                for (int c = 0; c < vpl; c++) {
                    int v0 = (my_part * vpl + c) * VEC;
                    float kv[8];
                    load_vec(ks + j * d_head + v0, kv);
                    for (int g = 0; g < G; g++)
                        for (int e = 0; e < VEC; e++) part[g] += qs[g][v0 + e] * kv[e];
                }
            }
            for (int g = 0; g < G; g++) {
                float x = part[g];
                for (int o = lpk / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
                if (my_part == 0 && j < n) sc[g][j] = x;
            }
        }
        __syncthreads();
        tile_softmax<G, ASYNC_MAXKT>(sc, s_alpha, s_m, s_l, n, warp, lane, nwarps);
        __syncthreads();
        for (int g = 0; g < G; g++) {
            float a = s_alpha[g];
            for (int e = 0; e < VEC; e++) acc[g][e] *= a;
        }
        if (v_key < kpb) {
            for (int j = v_key; j < n; j += kpb) {
                float vv[8];
                load_vec(vs + j * d_head + v_vec * VEC, vv);
                for (int g = 0; g < G; g++) {
                    float p = sc[g][j];
                    for (int e = 0; e < VEC; e++) acc[g][e] += p * vv[e];
                }
            }
        }
        // Every thread is done with this stage before the next pass copies into it.
        __syncthreads();
    }
    long long o = ((long long)r * splits + split) * G;
    __shared__ float gsum[MAXD];
    write_group_sums<G, VecOf<T>::N>(acc, gsum, d_head, v_key < kpb, v_vec, tid, part_acc + o * d_head);
    if (tid < G) { part_m[o + tid] = s_m[tid]; part_l[o + tid] = s_l[tid]; }
}

// Second pass: merge the splits of each (row, query head). grid = (rows, g_heads), block = D.
template <typename T>
__device__ void decode_reduce(int kv_heads, int g_heads, int d_head, int splits, const float* part_acc,
                              const float* part_m, const float* part_l, T* out) {
    int r = blockIdx.x, g = blockIdx.y, tid = threadIdx.x;
    int b = r / kv_heads, h = r % kv_heads, n_heads = kv_heads * g_heads;
    if (tid >= d_head) return;
    long long o0 = (long long)r * splits * g_heads + g;  // (r, split 0, g); splits are g_heads apart
    float mx = -INFINITY;
#pragma unroll 8
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, part_m[o0 + (long long)s * g_heads]);
    float l = 0.0f, a = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll 8
        for (int s = 0; s < splits; s++) {
            long long o = o0 + (long long)s * g_heads;
            float m = part_m[o];
            float w = (m == -INFINITY) ? 0.0f : __expf(m - mx);
            l += part_l[o] * w;
            a += part_acc[o * d_head + tid] * w;
        }
    }
    float v = (l > 0.0f) ? a / l : 0.0f;
    from_f(v, &out[((long long)b * n_heads + h * g_heads + g) * d_head + tid]);
}

// A prompt of T tokens into the empty rows of one sequence (rule 4.2): every unflagged token and
// the last W+1 tokens are kept, in prompt order; the last W+1 enter the ring with their flags so
// that their delayed evictions happen during decoding. Takes the row's blocks from the free list,
// sets lengths, positions and pool positions, and writes each token's pool address (-1 if
// dropped) to dst[h * T + t] for dms_prefill_write. grid = kv_heads, block = 256 (whole warps).
// `flags` is f32 [T, kv_heads] (1 = flagged); pointers are already offset to the layer.
extern "C" __global__ void dms_prefill_plan(int kv_heads, int bs, int wc, int cap, int max_blocks, int seq, int T,
                                            const float* flags, int* block_table, int* row_len, int* row_pos,
                                            int* ring_slot, unsigned char* ring_flag, int* pool_pos,
                                            const int* free_list, int* free_top, int* err, long long* dst) {
    int h = blockIdx.x, r = seq * kv_heads + h;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    __shared__ int s_count, s_ok, s_base;
    __shared__ int s_warp[32];
    int ring_start = T - wc;
    if (tid == 0) {
        s_ok = (row_len[r] == 0 && row_pos[r] == 0);
        if (!s_ok) atomicExch(err, 2);
        s_count = 0;
        s_base = 0;
    }
    __syncthreads();
    if (!s_ok) {  // nothing of this row is written
        for (int t = tid; t < T; t += blockDim.x) dst[(long long)h * T + t] = -1;
        return;
    }
    int mine = 0;
    for (int t = tid; t < T; t += blockDim.x) mine += (t >= ring_start || flags[(long long)t * kv_heads + h] == 0.0f);
    atomicAdd(&s_count, mine);
    __syncthreads();
    int* table = block_table + (long long)r * max_blocks;
    if (tid == 0) {
        int n = s_count, nb = (n + bs - 1) / bs;
        int top = atomicSub(free_top, nb) - nb;
        if (nb > max_blocks || top < 0) {
            atomicAdd(free_top, nb);  // give the blocks back
            atomicExch(err, 1);
            s_ok = 0;
        } else {
            for (int b = 0; b < nb; b++) table[b] = free_list[top + b];
            row_len[r] = n;
            row_pos[r] = T;
        }
    }
    __syncthreads();
    if (!s_ok) {  // nothing of this row is written
        for (int t = tid; t < T; t += blockDim.x) dst[(long long)h * T + t] = -1;
        return;
    }
    for (int t0 = 0; t0 < T; t0 += blockDim.x) {
        int t = t0 + tid;
        bool flagged = t < T && flags[(long long)t * kv_heads + h] != 0.0f;
        bool keep = t < T && (t >= ring_start || !flagged);
        unsigned int m = __ballot_sync(0xffffffffu, keep);
        if (lane == 0) s_warp[warp] = __popc(m);
        __syncthreads();
        if (keep) {
            int slot = s_base + __popc(m & ((1u << lane) - 1u));
            for (int w = 0; w < warp; w++) slot += s_warp[w];
            long long addr = (long long)table[slot / bs] * bs + slot % bs;
            pool_pos[addr] = t;
            dst[(long long)h * T + t] = addr;
            if (t >= ring_start) {
                ring_slot[(long long)r * cap + t % wc] = slot;
                ring_flag[(long long)r * cap + t % wc] = flagged ? 1 : 0;
            }
        } else if (t < T) {
            dst[(long long)h * T + t] = -1;
        }
        __syncthreads();
        if (tid == 0)
            for (int w = 0; w < nwarps; w++) s_base += s_warp[w];
        __syncthreads();
    }
}

// Sequence slots. A device batch keeps its sequences in slots 0..n of the cache so that decode
// launches cover rows 0..n*kv_heads of each layer; a sequence leaving a middle slot is replaced by
// the last one (dms_move_rows). `rows` is the cache's rows per layer (slots * kv_heads); pointers
// are to the whole cache (every layer). grid = layers, block = 32.

// Returns every block of slot `seq`'s rows (all layers) to the free list and empties the rows
// (length, position, ring flags), ready for a new prompt.
extern "C" __global__ void dms_release_rows(int rows, int kv_heads, int bs, int cap, int max_blocks, int seq,
                                            const int* block_table, int* row_len, int* row_pos,
                                            unsigned char* ring_flag, int* free_list, int* free_top) {
    for (int h = threadIdx.x; h < kv_heads; h += blockDim.x) {
        long long r = (long long)blockIdx.x * rows + (long long)seq * kv_heads + h;
        int nb = (row_len[r] + bs - 1) / bs;
        int base = atomicAdd(free_top, nb);
        for (int b = 0; b < nb; b++) free_list[base + b] = block_table[r * max_blocks + b];
        row_len[r] = 0;
        row_pos[r] = 0;
        for (int i = 0; i < cap; i++) ring_flag[r * cap + i] = 0;
    }
}

// Moves slot `from`'s rows (block tables, lengths, positions, rings; the pooled K/V stay where
// they are) into the empty slot `to`, and empties `from` without freeing its blocks (they now
// belong to `to`).
extern "C" __global__ void dms_move_rows(int rows, int kv_heads, int cap, int max_blocks, int from, int to,
                                         int* block_table, int* row_len, int* row_pos, int* ring_slot,
                                         unsigned char* ring_flag) {
    for (int h = threadIdx.x; h < kv_heads; h += blockDim.x) {
        long long base = (long long)blockIdx.x * rows;
        long long src = base + (long long)from * kv_heads + h, dst = base + (long long)to * kv_heads + h;
        for (int b = 0; b < max_blocks; b++) block_table[dst * max_blocks + b] = block_table[src * max_blocks + b];
        for (int i = 0; i < cap; i++) {
            ring_slot[dst * cap + i] = ring_slot[src * cap + i];
            ring_flag[dst * cap + i] = ring_flag[src * cap + i];
            ring_flag[src * cap + i] = 0;
        }
        row_len[dst] = row_len[src];
        row_pos[dst] = row_pos[src];
        row_len[src] = 0;
        row_pos[src] = 0;
    }
}

// Forks slot `src`'s rows into the empty slot `dst` (a copy-on-admission fork: one prompt pass
// shared by sequences with the same prompt and policy): each row takes as many blocks from the
// free list as its source holds and copies its length, position and ring (ring entries are row
// slots, so they stay valid); dms_fork_copy then copies the stored K/V and pool positions. A row
// that finds too few free blocks gives its pop back, stays empty and sets the error flag.
extern "C" __global__ void dms_fork_rows(int rows, int kv_heads, int bs, int cap, int max_blocks, int src, int dst,
                                         int* block_table, int* row_len, int* row_pos, int* ring_slot,
                                         unsigned char* ring_flag, const int* free_list, int* free_top, int* err) {
    for (int h = threadIdx.x; h < kv_heads; h += blockDim.x) {
        long long base = (long long)blockIdx.x * rows;
        long long s = base + (long long)src * kv_heads + h, d = base + (long long)dst * kv_heads + h;
        int nb = (row_len[s] + bs - 1) / bs;
        int top = atomicSub(free_top, nb) - nb;
        if (top < 0) {
            atomicAdd(free_top, nb);
            atomicExch(err, 1);
            row_len[d] = 0;
            row_pos[d] = 0;
            continue;
        }
        for (int b = 0; b < nb; b++) block_table[d * max_blocks + b] = free_list[top + b];
        for (int i = 0; i < cap; i++) {
            ring_slot[d * cap + i] = ring_slot[s * cap + i];
            ring_flag[d * cap + i] = ring_flag[s * cap + i];
        }
        row_len[d] = row_len[s];
        row_pos[d] = row_pos[s];
    }
}

// The stored K/V (only K for latent rows) and pool positions of block `blockIdx.y` of each row of
// a fork (after dms_fork_rows). grid = (layers * kv_heads, max_blocks), block = 128.
template <typename T>
__device__ void fork_copy(int rows, int kv_heads, int d_head, int bs, int max_blocks, int src, int dst,
                          const int* block_table, const int* row_len, int* pool_pos, T* k_pool, T* v_pool) {
    int layer = blockIdx.x / kv_heads, h = blockIdx.x % kv_heads, b = blockIdx.y;
    long long base = (long long)layer * rows;
    long long s = base + (long long)src * kv_heads + h, d = base + (long long)dst * kv_heads + h;
    int len = row_len[d];
    if (b * bs >= len) return;
    int used = min(bs, len - b * bs);
    long long from = (long long)block_table[s * max_blocks + b] * bs;
    long long to = (long long)block_table[d * max_blocks + b] * bs;
    for (long long i = threadIdx.x; i < (long long)used * d_head; i += blockDim.x) {
        k_pool[to * d_head + i] = k_pool[from * d_head + i];
        if (v_pool != k_pool) v_pool[to * d_head + i] = v_pool[from * d_head + i];
    }
    for (int i = threadIdx.x; i < used; i += blockDim.x) pool_pos[to + i] = pool_pos[from + i];
}

// Copies the kept prompt tokens' K and V ([T, kv_heads, D]) to their pool addresses (only K
// when v_pool is k_pool: latent rows).
// grid = (T, kv_heads), block = min(D, 256).
template <typename T>
__device__ void prefill_write(int kv_heads, int d_head, int n_tok, const long long* dst, const T* k, const T* v,
                              T* k_pool, T* v_pool) {
    int t = blockIdx.x, h = blockIdx.y;
    long long a = dst[(long long)h * n_tok + t];
    if (a < 0) return;
    long long src = ((long long)t * kv_heads + h) * d_head;
    for (int i = threadIdx.x; i < d_head; i += blockDim.x) {
        k_pool[a * d_head + i] = k[src + i];
        if (v_pool != k_pool) v_pool[a * d_head + i] = v[src + i];
    }
}

#define INSTANTIATE(T, SUF)                                                                          \
extern "C" __global__ void dms_decode_update_##SUF(                                                  \
    int kv_heads, int d_head, int bs, int cap, int max_blocks, int layer, const T* k_new,            \
    const T* v_new, T* k_pool, T* v_pool, int* block_table, int* row_len, int* row_pos,              \
    int* ring_slot, unsigned char* ring_flag, int* pool_pos, const int* free_list, int* free_top,    \
    int* err, const SeqProgram* progs, const float* scores) {                                        \
    decode_update<T>(kv_heads, d_head, bs, cap, max_blocks, layer, k_new, v_new, k_pool, v_pool,     \
                     block_table, row_len, row_pos, ring_slot, ring_flag, pool_pos, free_list,       \
                     free_top, err, progs, scores);                                                  \
}                                                                                                    \
extern "C" __global__ void dms_decode_reduce_##SUF(                                                  \
    int kv_heads, int g_heads, int d_head, int splits, const float* part_acc, const float* part_m,   \
    const float* part_l, T* out) {                                                                   \
    decode_reduce<T>(kv_heads, g_heads, d_head, splits, part_acc, part_m, part_l, out);              \
}                                                                                                    \
extern "C" __global__ void dms_prefill_write_##SUF(int kv_heads, int d_head, int n_tok,              \
    const long long* dst, const T* k, const T* v, T* k_pool, T* v_pool) {                            \
    prefill_write<T>(kv_heads, d_head, n_tok, dst, k, v, k_pool, v_pool);                            \
}                                                                                                    \
extern "C" __global__ void dms_fork_copy_##SUF(int rows, int kv_heads, int d_head, int bs,           \
    int max_blocks, int src, int dst, const int* block_table, const int* row_len, int* pool_pos,     \
    T* k_pool, T* v_pool) {                                                                          \
    fork_copy<T>(rows, kv_heads, d_head, bs, max_blocks, src, dst, block_table, row_len, pool_pos,   \
                 k_pool, v_pool);                                                                    \
}

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)

// One decode-attention kernel per GQA group size, so that per-head arrays stay in registers.
#define PARTIAL(T, SUF, N)                                                                           \
extern "C" __global__ void __launch_bounds__(THREADS) dms_decode_partial_##SUF##_g##N(              \
    int kv_heads, int d_head, int bs, int max_blocks, float scale, const T* q, const T* k_pool,      \
    const T* v_pool, const int* block_table, const int* row_len, float* part_acc, float* part_m,     \
    float* part_l) {                                                                                 \
    decode_partial_g<T, N>(kv_heads, d_head, bs, max_blocks, scale, q, k_pool, v_pool, block_table,  \
                           row_len, part_acc, part_m, part_l);                                       \
}                                                                                                    \
extern "C" __global__ void __launch_bounds__(THREADS) dms_decode_warps_##SUF##_g##N(                \
    int kv_heads, int d_head, int bs, int max_blocks, float scale, const T* q, const T* k_pool,      \
    const T* v_pool, const int* block_table, const int* row_len, float* part_acc, float* part_m,     \
    float* part_l) {                                                                                 \
    decode_partial_warps<T, N>(kv_heads, d_head, bs, max_blocks, scale, q, k_pool, v_pool,           \
                               block_table, row_len, part_acc, part_m, part_l);                      \
}                                                                                                    \
extern "C" __global__ void __launch_bounds__(THREADS) dms_decode_async_##SUF##_g##N(                \
    int kv_heads, int d_head, int bs, int max_blocks, float scale, const T* q, const T* k_pool,      \
    const T* v_pool, const int* block_table, const int* row_len, float* part_acc, float* part_m,     \
    float* part_l) {                                                                                 \
    decode_partial_async<T, N>(kv_heads, d_head, bs, max_blocks, scale, q, k_pool, v_pool,           \
                               block_table, row_len, part_acc, part_m, part_l);                      \
}
#define PARTIALS(T, SUF) PARTIAL(T, SUF, 1) PARTIAL(T, SUF, 2) PARTIAL(T, SUF, 3) PARTIAL(T, SUF, 4) \
    PARTIAL(T, SUF, 5) PARTIAL(T, SUF, 6) PARTIAL(T, SUF, 7) PARTIAL(T, SUF, 8)
PARTIALS(float, f32)
PARTIALS(bf16_t, bf16)

#define MLA_TILE 64
#define MLA_MAXDK 1024
#define MLA_MAXHG 8
#define MLA_KU 4

// Split-K paged decode attention over latent rows (MLA, absorbed form): one row per sequence
// holds c_kv (the first dv floats, the values) then the rotated k_pe, dk floats in all; every
// query head scores the whole row and reads its first dv floats as the value. Block z handles
// query heads [z*HG, z*HG+HG). Scores: a warp per key, lanes over the key's 16-byte vectors (one
// coalesced read of the row). Values: thread (key group, vector) as in decode_partial_g.
// Writes the same partials as decode_partial_g with G = heads, so decode_reduce merges them with
// kv_heads = 1, g_heads = heads, d_head = dv. Needs dk <= MLA_MAXDK and dv / VEC <= THREADS.
// grid = (batch, splits, heads / HG), block = THREADS.
template <typename T, int HG>
__device__ void mla_partial(int heads, int dk, int dv, int bs, int max_blocks, float scale, const T* q,
                            const T* pool, const int* block_table, const int* row_len, float* part_acc,
                            float* part_m, float* part_l) {
    const int VEC = VecOf<T>::N;
    const int NW = THREADS / 32;
    int r = blockIdx.x, split = blockIdx.y, splits = gridDim.y, h0 = blockIdx.z * HG;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    __shared__ float qs[HG][MLA_MAXDK];
    __shared__ float sc[HG][MLA_TILE];
    __shared__ float s_alpha[HG], s_m[HG], s_l[HG];
    __shared__ float gsum[MLA_MAXDK];
    int nvk = dk / VEC, nvv = dv / VEC;
    int kpb = THREADS / nvv;  // keys in flight in the value phase
    for (int g = 0; g < HG; g++)
        for (int i = tid; i < dk; i += THREADS)
            qs[g][i] = to_f(q[((long long)r * heads + h0 + g) * dk + i]) * scale;
    if (tid < HG) { s_m[tid] = -INFINITY; s_l[tid] = 0.0f; }
    float acc[HG][8];
#pragma unroll
    for (int g = 0; g < HG; g++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.0f;
    int start, end;
    split_range(row_len[r], split, splits, start, end);
    const int* table = block_table + (long long)r * max_blocks;
    int v_key = tid / nvv, v_vec = tid % nvv;
    __syncthreads();
    for (int t0 = start; t0 < end; t0 += MLA_TILE) {
        int n = min(MLA_TILE, end - t0);
        // MLA_KU keys per warp at once, so that their loads are in flight together.
        for (int j0 = warp; j0 < n; j0 += NW * MLA_KU) {
            const T* kp[MLA_KU];
            float part[MLA_KU][HG];
#pragma unroll
            for (int u = 0; u < MLA_KU; u++) {
                int j = min(j0 + u * NW, n - 1);  // past the tile: a valid row, result unused
                int slot = t0 + j;
                kp[u] = pool + ((long long)table[slot / bs] * bs + slot % bs) * dk;
#pragma unroll
                for (int g = 0; g < HG; g++) part[u][g] = 0.0f;
            }
            for (int c = lane; c < nvk; c += 32) {
                float kv[MLA_KU][8];
#pragma unroll
                for (int u = 0; u < MLA_KU; u++) load_vec(kp[u] + c * VEC, kv[u]);
#pragma unroll
                for (int u = 0; u < MLA_KU; u++)
#pragma unroll
                    for (int g = 0; g < HG; g++)
                        for (int e = 0; e < VEC; e++) part[u][g] += qs[g][c * VEC + e] * kv[u][e];
            }
#pragma unroll
            for (int u = 0; u < MLA_KU; u++) {
                int j = j0 + u * NW;
#pragma unroll
                for (int g = 0; g < HG; g++) {
                    float x = part[u][g];
                    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
                    if (lane == 0 && j < n) sc[g][j] = x;
                }
            }
        }
        __syncthreads();
        tile_softmax<HG, MLA_TILE>(sc, s_alpha, s_m, s_l, n, warp, lane, NW);
        __syncthreads();
#pragma unroll
        for (int g = 0; g < HG; g++) {
            float a = s_alpha[g];
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] *= a;
        }
        if (v_key < kpb) {
#pragma unroll 4
            for (int j = v_key; j < n; j += kpb) {
                int slot = t0 + j;
                float vv[8];
                load_vec(pool + ((long long)table[slot / bs] * bs + slot % bs) * dk + v_vec * VEC, vv);
#pragma unroll
                for (int g = 0; g < HG; g++) {
                    float p = sc[g][j];
                    for (int e = 0; e < VEC; e++) acc[g][e] += p * vv[e];
                }
            }
        }
        __syncthreads();
    }
    long long o = ((long long)r * splits + split) * heads + h0;
    write_group_sums<HG, VecOf<T>::N>(acc, gsum, dv, v_key < kpb, v_vec, tid, part_acc + o * dv);
    if (tid < HG) { part_m[o + tid] = s_m[tid]; part_l[o + tid] = s_l[tid]; }
}

// One warp-wide tensor-core product, D = A B + C, of a 16x16 bf16 A (row-major), a 16x8 bf16 B
// (column-major) and 16x8 f32 C/D (mma.sync m16n8k16, sm_80+). With g = lane / 4, t = lane % 4
// a lane holds: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] =
// A[g+8][2t+8..]; b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]; c, d = C[g][2t..2t+1] then
// C[g+8][2t..2t+1] (two bf16 per register, the lower index in the low half). The CPU emulation
// defines its own from this layout.
#ifndef DMS_CUDA_EMU
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned* a, const unsigned* b, const float* c) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}
#endif

// Two bf16 in one register, `lo` in the low half.
__device__ __forceinline__ unsigned pack_bf16(bf16_t lo, bf16_t hi) { return (unsigned)lo | ((unsigned)hi << 16); }

#define MMA_HEADS 16
#define MMA_KT 16
#define MMA_MAXDK 576
#define MMA_MAXDV 512

// Latent (MLA) decode attention on tensor cores, bf16 rows: a block takes 16 query heads of one
// sequence (all of DeepSeek-V2-Lite's), so each latent row is read once for all of them, not once
// per group of 8 as in mla_partial. Tiles of 16 keys stream into shared memory with asynchronous
// copies, double-buffered. Scores: S[16 heads x 16 keys] = Q K^T as m16n8k16 products, the
// dk / 16 k-steps dealt round-robin to the 4 warps (each keeps its share of Q's fragments in
// registers) and summed through shared memory; then the online softmax per head in f32, and P
// rounded to bf16 for O[16 x dv] += P V, each warp owning every 4th 8-wide column tile of O.
// Heads past `heads` (a last partial block) score zero queries and are not written. Writes the
// same partials as mla_partial, merged by decode_reduce. Needs dk <= MMA_MAXDK, dk % 8 == 0,
// dv <= MMA_MAXDV, dv % 8 == 0. grid = (batch, splits, ceil(heads / 16)), block = THREADS.
__device__ void mla_mma(int heads, int dk, int dv, int bs, int max_blocks, float scale, const bf16_t* q,
                        const bf16_t* pool, const int* block_table, const int* row_len, float* part_acc,
                        float* part_m, float* part_l) {
    const int NW = THREADS / 32;
    const int KS_W = (MMA_MAXDK / 16 + NW - 1) / NW;  // k-steps per warp, at most
    const int NT_W = MMA_MAXDV / 8 / NW;              // output column tiles per warp, at most
    int r = blockIdx.x, split = blockIdx.y, splits = gridDim.y, h0 = blockIdx.z * MMA_HEADS;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    __shared__ __align__(16) bf16_t stage[2][MMA_KT * MMA_MAXDK];
    __shared__ float red[NW][MMA_HEADS][MMA_KT];
    __shared__ float sp[MMA_HEADS][MMA_KT];
    __shared__ bf16_t pb[MMA_HEADS][MMA_KT];
    __shared__ float s_alpha[MMA_HEADS], s_m[MMA_HEADS], s_l[MMA_HEADS];
    int ksteps = (dk + 15) / 16, nvk = dk / 8;
    // This warp's fragments of Q (unscaled bf16; the scale is applied to the f32 scores).
    unsigned qa[KS_W][4];
    auto q_at = [&](int h, int col) -> bf16_t {
        return (h0 + h < heads && col < dk) ? q[((long long)r * heads + h0 + h) * dk + col] : (bf16_t)0;
    };
#pragma unroll
    for (int i = 0; i < KS_W; i++) {
        int k0 = (warp + i * NW) * 16;
        qa[i][0] = pack_bf16(q_at(gq, k0 + 2 * tq), q_at(gq, k0 + 2 * tq + 1));
        qa[i][1] = pack_bf16(q_at(gq + 8, k0 + 2 * tq), q_at(gq + 8, k0 + 2 * tq + 1));
        qa[i][2] = pack_bf16(q_at(gq, k0 + 2 * tq + 8), q_at(gq, k0 + 2 * tq + 9));
        qa[i][3] = pack_bf16(q_at(gq + 8, k0 + 2 * tq + 8), q_at(gq + 8, k0 + 2 * tq + 9));
    }
    if (tid < MMA_HEADS) { s_m[tid] = -INFINITY; s_l[tid] = 0.0f; }
    float acc[NT_W][4];
#pragma unroll
    for (int i = 0; i < NT_W; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[i][e] = 0.0f;
    int start, end;
    split_range(row_len[r], split, splits, start, end);
    const int* table = block_table + (long long)r * max_blocks;
    auto issue = [&](int t0, int buf) {
        int n = min(MMA_KT, end - t0);
        for (int c = tid; c < n * nvk; c += THREADS) {
            int j = c / nvk, v = c % nvk, slot = t0 + j;
            cp_async16(&stage[buf][j * dk + v * 8], pool + ((long long)table[slot / bs] * bs + slot % bs) * dk + v * 8);
        }
        cp_async_commit();
    };
    if (start < end) issue(start, 0);
    __syncthreads();
    int buf = 0;
    for (int t0 = start; t0 < end; t0 += MMA_KT, buf ^= 1) {
        int n = min(MMA_KT, end - t0);
        await_stage(t0, MMA_KT, end, buf, issue);
        const bf16_t* ks = stage[buf];
        // Key `j`'s element `col` (zero past the tile's keys or the row's width).
        auto k_at = [&](int j, int col) -> bf16_t { return (j < n && col < dk) ? ks[j * dk + col] : (bf16_t)0; };
        float sc[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) sc[nt][e] = 0.0f;
#pragma unroll
        for (int i = 0; i < KS_W; i++) {
            int kstep = warp + i * NW;
            if (kstep < ksteps) {
                int k0 = kstep * 16;
#pragma unroll
                for (int nt = 0; nt < 2; nt++) {
                    int j = nt * 8 + gq;
                    unsigned b[2] = {pack_bf16(k_at(j, k0 + 2 * tq), k_at(j, k0 + 2 * tq + 1)),
                                     pack_bf16(k_at(j, k0 + 2 * tq + 8), k_at(j, k0 + 2 * tq + 9))};
                    mma_bf16_16816(sc[nt], qa[i], b, sc[nt]);
                }
            }
        }
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            red[warp][gq][nt * 8 + 2 * tq] = sc[nt][0];
            red[warp][gq][nt * 8 + 2 * tq + 1] = sc[nt][1];
            red[warp][gq + 8][nt * 8 + 2 * tq] = sc[nt][2];
            red[warp][gq + 8][nt * 8 + 2 * tq + 1] = sc[nt][3];
        }
        __syncthreads();
        for (int i = tid; i < MMA_HEADS * MMA_KT; i += THREADS) {
            int h = i / MMA_KT, j = i % MMA_KT;
            float x = 0.0f;
            for (int w = 0; w < NW; w++) x += red[w][h][j];
            sp[h][j] = j < n ? x * scale : -INFINITY;
        }
        __syncthreads();
        // Online softmax: a warp per 4 heads, lanes 0-15 over the keys of one head.
        for (int h = warp * 4 + (lane >> 4); h < warp * 4 + 4; h += 2) {
            int j = lane & 15;
            float x = sp[h][j], mx = x;
            for (int o = 8; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float m_old = s_m[h], m_new = fmaxf(m_old, mx);
            float p = (x == -INFINITY) ? 0.0f : __expf(x - m_new);
            bf16_t pbv;
            from_f(p, &pbv);
            pb[h][j] = pbv;
            float sum = to_f(pbv);
            for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (j == 0) {
                float a = (m_old == -INFINITY) ? 0.0f : __expf(m_old - m_new);
                s_alpha[h] = a;
                s_l[h] = s_l[h] * a + sum;
                s_m[h] = m_new;
            }
        }
        __syncthreads();
        unsigned pa[4] = {pack_bf16(pb[gq][2 * tq], pb[gq][2 * tq + 1]), pack_bf16(pb[gq + 8][2 * tq], pb[gq + 8][2 * tq + 1]),
                          pack_bf16(pb[gq][2 * tq + 8], pb[gq][2 * tq + 9]),
                          pack_bf16(pb[gq + 8][2 * tq + 8], pb[gq + 8][2 * tq + 9])};
        float a_lo = s_alpha[gq], a_hi = s_alpha[gq + 8];
#pragma unroll
        for (int i = 0; i < NT_W; i++) {
            int c0 = (warp + i * NW) * 8;
            if (c0 < dv) {
                acc[i][0] *= a_lo; acc[i][1] *= a_lo; acc[i][2] *= a_hi; acc[i][3] *= a_hi;
                unsigned b[2] = {pack_bf16(k_at(2 * tq, c0 + gq), k_at(2 * tq + 1, c0 + gq)),
                                 pack_bf16(k_at(2 * tq + 8, c0 + gq), k_at(2 * tq + 9, c0 + gq))};
                mma_bf16_16816(acc[i], pa, b, acc[i]);
            }
        }
        // Every thread is done with this stage before the next pass copies into it.
        __syncthreads();
    }
    long long o = ((long long)r * splits + split) * heads;
#pragma unroll
    for (int i = 0; i < NT_W; i++) {
        int c0 = (warp + i * NW) * 8;
        if (c0 >= dv) continue;
        int col = c0 + 2 * tq;
        if (h0 + gq < heads) {
            part_acc[(o + h0 + gq) * dv + col] = acc[i][0];
            part_acc[(o + h0 + gq) * dv + col + 1] = acc[i][1];
        }
        if (h0 + gq + 8 < heads) {
            part_acc[(o + h0 + gq + 8) * dv + col] = acc[i][2];
            part_acc[(o + h0 + gq + 8) * dv + col + 1] = acc[i][3];
        }
    }
    if (tid < MMA_HEADS && h0 + tid < heads) { part_m[o + h0 + tid] = s_m[tid]; part_l[o + h0 + tid] = s_l[tid]; }
}

extern "C" __global__ void __launch_bounds__(THREADS) dms_mla_mma_bf16(
    int heads, int dk, int dv, int bs, int max_blocks, float scale, const bf16_t* q, const bf16_t* pool,
    const int* block_table, const int* row_len, float* part_acc, float* part_m, float* part_l) {
    mla_mma(heads, dk, dv, bs, max_blocks, scale, q, pool, block_table, row_len, part_acc, part_m, part_l);
}

#define MLA(T, SUF, N)                                                                               \
extern "C" __global__ void __launch_bounds__(THREADS) dms_mla_partial_##SUF##_h##N(                 \
    int heads, int dk, int dv, int bs, int max_blocks, float scale, const T* q, const T* pool,       \
    const int* block_table, const int* row_len, float* part_acc, float* part_m, float* part_l) {     \
    mla_partial<T, N>(heads, dk, dv, bs, max_blocks, scale, q, pool, block_table, row_len, part_acc, \
                      part_m, part_l);                                                               \
}
#define MLAS(T, SUF) MLA(T, SUF, 1) MLA(T, SUF, 2) MLA(T, SUF, 4) MLA(T, SUF, 8)
MLAS(float, f32)
MLAS(bf16_t, bf16)

// Fills a buffer with deterministic pseudo-random values in [-1, 1) (benchmark caches are never
// timed on zeros).
template <typename T>
__device__ void fill_random(T* p, long long n, unsigned int seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        unsigned int x = (unsigned int)i * 2654435761u ^ seed;
        x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
        from_f((float)x / 2147483648.0f - 1.0f, &p[i]);
    }
}
extern "C" __global__ void dms_fill_f32(float* p, long long n, unsigned int seed) { fill_random<float>(p, n, seed); }
extern "C" __global__ void dms_fill_bf16(bf16_t* p, long long n, unsigned int seed) { fill_random<bf16_t>(p, n, seed); }
