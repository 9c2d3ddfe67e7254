// The executor's CUDA kernels: everything in the forward pass but the
// matrix products (cuBLAS does those). Compiled at run time with NVRTC, so
// this file includes no headers and uses only built-in functions.
//
// Layouts, all row-major f32 unless said otherwise:
//   x, xn           rows x d              the residual stream and its norm
//   qkv             rows x (d + 2 kv)     q heads, then k heads, then v heads
//   gate_up         rows x 2 ff           gate, then up
//   k/v cache       slot, layer, kv head, position, head_dim
//   rot             rows x half x 2       each row's rotary (sin, cos) pairs
//
// Reductions use one block per row; block sizes are powers of two, at most
// 1024 (the host launches them so).

#define NEG_INF __int_as_float(0xff800000)

__device__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ unsigned short read_u16(const unsigned char* p) {
    return (unsigned short)(p[0] | (p[1] << 8));
}

// Sum of `v` over the block, returned to every thread. `scratch` holds
// blockDim.x values.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
        __syncthreads();
    }
    T total = scratch[0];
    __syncthreads();
    return total;
}

__device__ float block_max(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) scratch[threadIdx.x] = fmaxf(scratch[threadIdx.x], scratch[threadIdx.x + s]);
        __syncthreads();
    }
    float best = scratch[0];
    __syncthreads();
    return best;
}

// Writes `2 * blocks` to out[i]: the start-up check that a kernel runs.
extern "C" __global__ void probe(int* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 2 * i;
}

// Dequantization, one thread per 32-element block (per element for F16).
// GGUF block layouts: Q4_0 = f16 scale, 16 bytes of nibbles (low nibbles
// are elements 0..16, high nibbles 16..32), value (q - 8) * d; Q4_1 = f16
// scale, f16 minimum, nibbles, value q * d + m; Q8_0 = f16 scale, 32
// signed bytes, value q * d.
extern "C" __global__ void dequant_q4_0(const unsigned char* src, float* dst, long long blocks) {
    long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const unsigned char* p = src + b * 18;
    float d = half_to_float(read_u16(p));
    float* out = dst + b * 32;
    for (int j = 0; j < 16; j++) {
        out[j] = ((int)(p[2 + j] & 0x0f) - 8) * d;
        out[j + 16] = ((int)(p[2 + j] >> 4) - 8) * d;
    }
}

extern "C" __global__ void dequant_q4_1(const unsigned char* src, float* dst, long long blocks) {
    long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const unsigned char* p = src + b * 20;
    float d = half_to_float(read_u16(p));
    float m = half_to_float(read_u16(p + 2));
    float* out = dst + b * 32;
    for (int j = 0; j < 16; j++) {
        out[j] = (p[4 + j] & 0x0f) * d + m;
        out[j + 16] = (p[4 + j] >> 4) * d + m;
    }
}

extern "C" __global__ void dequant_q8_0(const unsigned char* src, float* dst, long long blocks) {
    long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const unsigned char* p = src + b * 34;
    float d = half_to_float(read_u16(p));
    float* out = dst + b * 32;
    for (int j = 0; j < 32; j++) out[j] = (float)(signed char)p[2 + j] * d;
}

extern "C" __global__ void dequant_f16(const unsigned char* src, float* dst, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = half_to_float(read_u16(src + 2 * i));
}

// x[i] = table[token[i]], a token past the table reading its last row.
extern "C" __global__ void embed(const float* table, const int* tokens, float* x, int d, int vocab) {
    int i = blockIdx.x;
    // Ids arrive as int: one past i32's range reads as negative.
    int t = tokens[i];
    if (t < 0 || t >= vocab) t = vocab - 1;
    for (int j = threadIdx.x; j < d; j += blockDim.x) x[(long long)i * d + j] = table[(long long)t * d + j];
}

// out[i] = x[rows[i]] / rms(x[rows[i]]) * w, or of x[i] when `rows` is
// 0 (a null pointer).
extern "C" __global__ void rms_norm(const float* x, const int* rows, const float* w, float* out, int d, float eps) {
    __shared__ float scratch[1024];
    int i = blockIdx.x;
    int src = rows ? rows[i] : i;
    const float* xr = x + (long long)src * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(ss / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(long long)i * d + j] = xr[j] * inv * w[j];
}

// Rotates each row's q and k heads by its position (adjacent pairs), then
// writes its k and v heads into its sequence's cache slot at its position.
extern "C" __global__ void rope_store(
    float* qkv, const float* rot, const int* pos, const int* slot,
    float* kcache, float* vcache,
    int n_head, int n_head_kv, int head_dim, int n_layer, int layer, int context) {
    int i = blockIdx.x;
    int half = head_dim / 2;
    int d = n_head * head_dim, kv = n_head_kv * head_dim;
    float* row = qkv + (long long)i * (d + 2 * kv);
    const float* turns = rot + (long long)i * half * 2;
    long long seq_base = ((long long)slot[i] * n_layer + layer) * n_head_kv;
    int p = pos[i];
    for (int idx = threadIdx.x; idx < (n_head + n_head_kv) * half; idx += blockDim.x) {
        int head = idx / half, k = idx % half;
        float s = turns[2 * k], c = turns[2 * k + 1];
        float* h = head < n_head ? row + head * head_dim : row + d + (head - n_head) * head_dim;
        float a = h[2 * k], b = h[2 * k + 1];
        float ra = a * c - b * s, rb = a * s + b * c;
        h[2 * k] = ra;
        h[2 * k + 1] = rb;
        if (head >= n_head) {
            int g = head - n_head;
            float* to = kcache + ((seq_base + g) * context + p) * head_dim;
            to[2 * k] = ra;
            to[2 * k + 1] = rb;
        }
    }
    for (int idx = threadIdx.x; idx < kv; idx += blockDim.x) {
        int g = idx / head_dim, j = idx % head_dim;
        vcache[((seq_base + g) * context + p) * head_dim + j] = row[d + kv + idx];
    }
}

// Causal attention of one row's query head (block (i, h)) over its
// sequence's cache, positions 0..=pos[i]. Dynamic shared memory:
// head_dim + context + blockDim.x floats.
extern "C" __global__ void attention(
    const float* qkv, const float* kcache, const float* vcache,
    const int* pos, const int* slot, float* out,
    int n_head, int n_head_kv, int head_dim, int n_layer, int layer, int context, float scale) {
    extern __shared__ float shared[];
    float* q = shared;
    float* p = shared + head_dim;
    float* scratch = p + context;
    int i = blockIdx.x, h = blockIdx.y;
    int d = n_head * head_dim, kv = n_head_kv * head_dim;
    int g = h / (n_head / n_head_kv);
    const float* qrow = qkv + (long long)i * (d + 2 * kv) + h * head_dim;
    for (int j = threadIdx.x; j < head_dim; j += blockDim.x) q[j] = qrow[j];
    __syncthreads();

    int len = pos[i] + 1;
    long long base = (((long long)slot[i] * n_layer + layer) * n_head_kv + g) * context * head_dim;
    const float* keys = kcache + base;
    const float* values = vcache + base;
    float best = NEG_INF;
    for (int t = threadIdx.x; t < len; t += blockDim.x) {
        const float* key = keys + (long long)t * head_dim;
        float s = 0.0f;
        for (int j = 0; j < head_dim; j++) s += q[j] * key[j];
        s *= scale;
        p[t] = s;
        best = fmaxf(best, s);
    }
    best = block_max(best, scratch);
    float sum = 0.0f;
    for (int t = threadIdx.x; t < len; t += blockDim.x) {
        float e = expf(p[t] - best);
        p[t] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < head_dim; j += blockDim.x) {
        float acc = 0.0f;
        for (int t = 0; t < len; t++) acc += p[t] * values[(long long)t * head_dim + j];
        out[(long long)i * d + h * head_dim + j] = acc * inv;
    }
}

// h[i] = silu(gate[i]) * up[i] for each of n rows of ff.
extern "C" __global__ void silu_mul(const float* gate_up, float* h, int n, int ff) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * ff) return;
    long long i = idx / ff, j = idx % ff;
    float g = gate_up[i * 2 * ff + j];
    float u = gate_up[i * 2 * ff + ff + j];
    h[idx] = g / (1.0f + expf(-g)) * u;
}

// For each row of logits: the best token (the lowest index on a tie), its
// logit, and the log-softmax normaliser, as three floats.
extern "C" __global__ void __launch_bounds__(1024) logit_summary(const float* logits, float* out, int vocab) {
    __shared__ float scratch[1024];
    __shared__ int at[1024];
    __shared__ double sums[1024];
    const float* row = logits + (long long)blockIdx.x * vocab;
    float best = NEG_INF;
    int best_at = 0x7fffffff;
    for (int t = threadIdx.x; t < vocab; t += blockDim.x) {
        if (row[t] > best) {
            best = row[t];
            best_at = t;
        }
    }
    scratch[threadIdx.x] = best;
    at[threadIdx.x] = best_at;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float o = scratch[threadIdx.x + s];
            int oa = at[threadIdx.x + s];
            if (o > scratch[threadIdx.x] || (o == scratch[threadIdx.x] && oa < at[threadIdx.x])) {
                scratch[threadIdx.x] = o;
                at[threadIdx.x] = oa;
            }
        }
        __syncthreads();
    }
    float max = scratch[0];
    // A row with no number above -inf (all NaN, say) picks token 0, as
    // the CPU's argmax does.
    int arg = at[0] == 0x7fffffff ? 0 : at[0];
    __syncthreads();
    double sum = 0.0;
    for (int t = threadIdx.x; t < vocab; t += blockDim.x) sum += exp((double)(row[t] - max));
    sum = block_sum(sum, sums);
    if (threadIdx.x == 0) {
        out[blockIdx.x * 3] = (float)arg;
        out[blockIdx.x * 3 + 1] = max;
        out[blockIdx.x * 3 + 2] = max + (float)log(sum);
    }
}
