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

// One decode token per row: decide (mode 0 none, 1 random at `rate`, 2 scores*scale-offset>0),
// evict the flagged token leaving the window of W+1 (reusing its slot) or append (taking a block
// from the free list when needed), then write K and V. grid = rows of this layer, block = D.
template <typename T>
__device__ void decode_update(int kv_heads, int d_head, int bs, int wc, int max_blocks, int layer,
                              const T* k_new, const T* v_new, T* k_pool, T* v_pool,
                              int* block_table, int* row_len, int* row_pos, int* ring_slot,
                              unsigned char* ring_flag, int* pool_pos, const int* free_list,
                              int* free_top, int* err, int mode, unsigned long long seed, double rate,
                              const float* scores, float scale, float offset) {
    int r = blockIdx.x;
    __shared__ long long s_addr;
    if (threadIdx.x == 0) {
        int pos = row_pos[r];
        int len = row_len[r];
        int head = r % kv_heads;
        bool d = false;
        if (mode == 1) {
            d = pos > 0 && hash_unit(seed, layer, head, pos - 1) < rate;
        } else if (mode == 2) {
            d = scores[r] * scale - offset > 0.0f;
        }
        unsigned char* flags = ring_flag + (long long)r * wc;
        int* slots = ring_slot + (long long)r * wc;
        if (pos > 0) flags[(pos - 1) % wc] = d ? 1 : 0;
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
                int top = atomicSub(free_top, 1) - 1;
                if (top < 0 || len / bs >= max_blocks) {
                    atomicExch(err, 1);
                    fail = true;
                } else {
                    table[len / bs] = free_list[top];
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
        v_pool[s_addr * d_head + i] = v_new[(long long)r * d_head + i];
    }
}

#define TILE 64
#define MAXG 8

// Split-K paged decode attention, first pass. grid = (rows, splits), block = D threads (D/32 warps).
// Row r = b * kv_heads + h holds the keys of KV head h of sequence b; its G query heads are
// q[b, h*G .. h*G+G). Writes per (row, split, head) the running max, sum and unnormalised output.
template <typename T>
__device__ void decode_partial(int kv_heads, int g_heads, int d_head, int bs, int max_blocks, float scale,
                               const T* q, const T* k_pool, const T* v_pool, const int* block_table,
                               const int* row_len, float* part_acc, float* part_m, float* part_l) {
    int r = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    __shared__ float qs[MAXG][256];
    __shared__ float sc[MAXG][TILE];
    __shared__ float s_alpha[MAXG];
    __shared__ float s_m[MAXG];
    __shared__ float s_l[MAXG];
    int b = r / kv_heads, h = r % kv_heads;
    int n_heads = kv_heads * g_heads;
    for (int g = 0; g < g_heads; g++)
        for (int i = tid; i < d_head; i += blockDim.x)
            qs[g][i] = to_f(q[((long long)b * n_heads + h * g_heads + g) * d_head + i]) * scale;
    if (tid < g_heads) { s_m[tid] = -INFINITY; s_l[tid] = 0.0f; }
    float acc[MAXG];
    for (int g = 0; g < MAXG; g++) acc[g] = 0.0f;
    int len = row_len[r];
    int chunk = (len + splits - 1) / splits;
    int start = split * chunk;
    int end = min(len, start + chunk);
    const int* table = block_table + (long long)r * max_blocks;
    __syncthreads();
    for (int t0 = start; t0 < end; t0 += TILE) {
        int n = min(TILE, end - t0);
        // Scores: each warp takes keys j = warp, warp + nwarps, ...; lanes split the head dimension.
        for (int j = warp; j < n; j += nwarps) {
            int slot = t0 + j;
            long long base = ((long long)table[slot / bs] * bs + slot % bs) * d_head;
            float part[MAXG];
            for (int g = 0; g < g_heads; g++) part[g] = 0.0f;
            for (int i = lane; i < d_head; i += 32) {
                float kv = to_f(k_pool[base + i]);
                for (int g = 0; g < g_heads; g++) part[g] += qs[g][i] * kv;
            }
            for (int g = 0; g < g_heads; g++) {
                float x = part[g];
                for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
                if (lane == 0) sc[g][j] = x;
            }
        }
        __syncthreads();
        // Online softmax: one warp per head.
        for (int g = warp; g < g_heads; g += nwarps) {
            float mx = -INFINITY;
            for (int j = lane; j < n; j += 32) mx = fmaxf(mx, sc[g][j]);
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
            float m_old = s_m[g];
            float m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
            for (int j = lane; j < n; j += 32) {
                float p = __expf(sc[g][j] - m_new);
                sc[g][j] = p;
                sum += p;
            }
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
            if (lane == 0) {
                float a = (m_old == -INFINITY) ? 0.0f : __expf(m_old - m_new);
                s_alpha[g] = a;
                s_l[g] = s_l[g] * a + sum;
                s_m[g] = m_new;
            }
        }
        __syncthreads();
        // Values: thread tid owns output dimension tid.
        for (int g = 0; g < g_heads; g++) acc[g] *= s_alpha[g];
        for (int j = 0; j < n; j++) {
            int slot = t0 + j;
            long long base = ((long long)table[slot / bs] * bs + slot % bs) * d_head;
            float vv = (tid < d_head) ? to_f(v_pool[base + tid]) : 0.0f;
            for (int g = 0; g < g_heads; g++) acc[g] += sc[g][j] * vv;
        }
        __syncthreads();
    }
    long long o = ((long long)r * splits + split) * g_heads;
    for (int g = 0; g < g_heads; g++) {
        if (tid < d_head) part_acc[(o + g) * d_head + tid] = acc[g];
    }
    if (tid < g_heads) { part_m[o + tid] = s_m[tid]; part_l[o + tid] = s_l[tid]; }
}

// Second pass: merge the splits of each row. grid = rows, block = D.
template <typename T>
__device__ void decode_reduce(int kv_heads, int g_heads, int d_head, int splits, const float* part_acc,
                              const float* part_m, const float* part_l, T* out) {
    int r = blockIdx.x, tid = threadIdx.x;
    int b = r / kv_heads, h = r % kv_heads, n_heads = kv_heads * g_heads;
    if (tid >= d_head) return;
    for (int g = 0; g < g_heads; g++) {
        float mx = -INFINITY;
        for (int s = 0; s < splits; s++) mx = fmaxf(mx, part_m[((long long)r * splits + s) * g_heads + g]);
        float l = 0.0f, a = 0.0f;
        if (mx != -INFINITY) {
            for (int s = 0; s < splits; s++) {
                long long o = ((long long)r * splits + s) * g_heads + g;
                if (part_m[o] == -INFINITY) continue;
                float w = __expf(part_m[o] - mx);
                l += part_l[o] * w;
                a += part_acc[o * d_head + tid] * w;
            }
        }
        float v = (l > 0.0f) ? a / l : 0.0f;
        from_f(v, &out[((long long)b * n_heads + h * g_heads + g) * d_head + tid]);
    }
}

#define INSTANTIATE(T, SUF)                                                                          \
extern "C" __global__ void dms_decode_update_##SUF(                                                  \
    int kv_heads, int d_head, int bs, int wc, int max_blocks, int layer, const T* k_new,             \
    const T* v_new, T* k_pool, T* v_pool, int* block_table, int* row_len, int* row_pos,              \
    int* ring_slot, unsigned char* ring_flag, int* pool_pos, const int* free_list, int* free_top,    \
    int* err, int mode, unsigned long long seed, double rate, const float* scores, float scale,      \
    float offset) {                                                                                  \
    decode_update<T>(kv_heads, d_head, bs, wc, max_blocks, layer, k_new, v_new, k_pool, v_pool,      \
                     block_table, row_len, row_pos, ring_slot, ring_flag, pool_pos, free_list,       \
                     free_top, err, mode, seed, rate, scores, scale, offset);                        \
}                                                                                                    \
extern "C" __global__ void dms_decode_partial_##SUF(                                                 \
    int kv_heads, int g_heads, int d_head, int bs, int max_blocks, float scale, const T* q,          \
    const T* k_pool, const T* v_pool, const int* block_table, const int* row_len, float* part_acc,   \
    float* part_m, float* part_l) {                                                                  \
    decode_partial<T>(kv_heads, g_heads, d_head, bs, max_blocks, scale, q, k_pool, v_pool,           \
                      block_table, row_len, part_acc, part_m, part_l);                               \
}                                                                                                    \
extern "C" __global__ void dms_decode_reduce_##SUF(                                                  \
    int kv_heads, int g_heads, int d_head, int splits, const float* part_acc, const float* part_m,   \
    const float* part_l, T* out) {                                                                   \
    decode_reduce<T>(kv_heads, g_heads, d_head, splits, part_acc, part_m, part_l, out);              \
}

INSTANTIATE(float, f32)
INSTANTIATE(bf16_t, bf16)

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
