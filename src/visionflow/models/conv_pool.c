/* A 3x3 convolution ('valid', stride 1), a 2x2 max-pool (stride 2, floor) and a ReLU, in one pass.

   Why: in seed-cnn's first block the convolution's output (26x26x32 per MNIST image) is written to memory,
   read back by the max-pool, and in training zero-filled again for the pool's gradient. That traffic, not
   arithmetic, was about half of a training step (torch.profiler, batch 64). Here each pooled pixel's four
   convolution outputs live in registers, and only the result (fp32 or bf16) and which of the four won are
   stored: one byte per output, 0..3 for the offset, row-major in the window, the first maximum winning ties
   as in ATen's max_pool2d, and 4 where the ReLU cut the value to zero (no gradient flows there).

   Layouts (all contiguous): x is N x H x W x C (channels-last), wt is C x 3 x 3 x O (the Conv2d weight,
   transposed so the O outputs of one tap are adjacent), out, grad and idx are N x PH x PW x O. O is a multiple
   of 16. Built by visionflow/models/conv_pool.py with the system C compiler. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64

typedef float vfloat __attribute__((vector_size(64)));  /* 16 lanes: one AVX-512 register, or two AVX ones */
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef uint16_t vhalf __attribute__((vector_size(32)));
typedef uint8_t vbyte __attribute__((vector_size(16)));
#define LANES 16

typedef struct {
    const float *x, *wt, *b;
    const void *in;  /* pool_relu's input; in the backward passes, the gradient of the output */
    void *out;
    float *gw, *gb;
    uint8_t *idx;    /* written by the forward passes (unless NULL), read by the backward ones */
    long n0, n1;
    long tiles;      /* Winograd passes: the batch's tile count, P (the 16 components are P x C or P x O apart) */
    int h, w, c, o, in_bf16, out_bf16;
} Job;

static inline vfloat load(const float *p) { vfloat v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vfloat v) { memcpy(p, &v, sizeof v); }
/* fp32 to bf16, rounding to nearest even as torch does; NaN stays a (quiet) NaN. */
static inline vhalf to_bf16(vfloat v) {
    const vuint u = (vuint)v;
    const vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vuint nan = (vuint)(v != v);
    return __builtin_convertvector((nan & 0x7fc0u) | (~nan & rounded), vhalf);
}

/* LANES values at element `at` of an fp32 or bf16 array, as fp32; and back. */
static inline vfloat load_any(const void *p, long at, int bf16) {
    if (!bf16) return load((const float *)p + at);
    vhalf half;
    memcpy(&half, (const uint16_t *)p + at, sizeof half);
    return (vfloat)(__builtin_convertvector(half, vuint) << 16);
}

static inline void store_any(void *p, long at, vfloat v, int bf16) {
    if (!bf16) {
        store((float *)p + at, v);
        return;
    }
    const vhalf half = to_bf16(v);
    memcpy((uint16_t *)p + at, &half, sizeof half);
}

static inline vfloat pick(vint mask, vfloat yes, vfloat no) { return (vfloat)((mask & (vint)yes) | (~mask & (vint)no)); }

/* The maximum of a 2x2 window's four values (row-major) and which one it was: the first maximum wins ties and
   NaN wins, as in ATen's max_pool2d. */
static inline vfloat window_max(const vfloat v[4], vint *which) {
    vfloat m = v[0];
    vint best = {0};
    for (int q = 1; q < 4; q++) {
        const vint better = (v[q] > m) | (v[q] != v[q]);
        m = pick(better, v[q], m);
        best = (better & q) | (~better & best);
    }
    *which = best;
    return m;
}

/* The ReLU (NaN passes, as torch.relu lets it), then the value into j->out and the winner into j->idx, 4 where
   the ReLU cut the value (no gradient flows there). */
static inline void relu_and_store(const Job *j, long at, vfloat m, vint best) {
    const vint positive = (m > 0) | (m != m);
    store_any(j->out, at, pick(positive, m, (vfloat){0}), j->out_bf16);
    if (j->idx) {
        const vbyte bytes = __builtin_convertvector((positive & best) | (~positive & 4), vbyte);
        memcpy(j->idx + at, &bytes, sizeof bytes);
    }
}

/* One block of LANES outputs (starting at k) for this job's images. Its 9 x C filter taps stay in registers
   over all pixels; each pooled pixel gets four accumulators, one per offset in its 2x2 window. Inlined with a
   constant C, so that for one or three input channels the loops over taps unroll completely. */
static inline __attribute__((always_inline)) void forward_block(const Job *j, int k, const int c) {
    const int h = j->h, w = j->w, o = j->o, ph = (h - 2) / 2, pw = (w - 2) / 2;
    vfloat taps[9 * c];
    for (int t = 0; t < 9 * c; t++) taps[t] = load(j->wt + t * o + k);
    const vfloat bias = load(j->b + k);
    for (long n = j->n0; n < j->n1; n++) {
        const float *xn = j->x + n * (long)h * w * c;
        for (int py = 0; py < ph; py++) {
            for (int px = 0; px < pw; px++) {
                vfloat acc[4] = {bias, bias, bias, bias};
                for (int ky = 0; ky < 3; ky++)
                    for (int kx = 0; kx < 3; kx++)
                        for (int ci = 0; ci < c; ci++) {
                            const vfloat tap = taps[ci * 9 + ky * 3 + kx];  /* wt is C x 3 x 3 x O */
                            const float *xp = xn + ((long)(2 * py + ky) * w + (2 * px + kx)) * c + ci;
                            acc[0] += xp[0] * tap;
                            acc[1] += xp[c] * tap;
                            acc[2] += xp[(long)w * c] * tap;
                            acc[3] += xp[(long)w * c + c] * tap;
                        }
                vint best;
                const vfloat m = window_max(acc, &best);
                const long at = ((n * ph + py) * (long)pw + px) * o + k;
                relu_and_store(j, at, m, best);
            }
        }
    }
}

/* Weight and bias gradients of one block of LANES outputs over this job's images, summed in registers and then
   written to the job's own j->gw (C x 3 x 3 x O) and j->gb (O). Each pooled gradient goes to the one convolution
   output that won; masking it per offset keeps every lane busy. */
static inline __attribute__((always_inline)) void backward_block(const Job *j, int k, const int c) {
    const int h = j->h, w = j->w, o = j->o, ph = (h - 2) / 2, pw = (w - 2) / 2;
    const vfloat zero = {0};
    vfloat sums[9 * c], bias_sum = zero;
    for (int t = 0; t < 9 * c; t++) sums[t] = zero;
    for (long n = j->n0; n < j->n1; n++) {
        const float *xn = j->x + n * (long)h * w * c;
        for (int py = 0; py < ph; py++) {
            for (int px = 0; px < pw; px++) {
                const long at = ((n * ph + py) * (long)pw + px) * o + k;
                const vfloat g = load_any(j->in, at, j->in_bf16);
                vbyte bytes;
                memcpy(&bytes, j->idx + at, sizeof bytes);
                const vint winner = __builtin_convertvector(bytes, vint);
                const vfloat g0 = pick(winner == 0, g, zero), g1 = pick(winner == 1, g, zero);
                const vfloat g2 = pick(winner == 2, g, zero), g3 = pick(winner == 3, g, zero);
                bias_sum += g0 + g1 + g2 + g3; /* zero where the ReLU cut */
                for (int ky = 0; ky < 3; ky++)
                    for (int kx = 0; kx < 3; kx++)
                        for (int ci = 0; ci < c; ci++) {
                            const float *xp = xn + ((long)(2 * py + ky) * w + (2 * px + kx)) * c + ci;
                            sums[ci * 9 + ky * 3 + kx] += xp[0] * g0 + xp[c] * g1 + xp[(long)w * c] * g2
                                                            + xp[(long)w * c + c] * g3;
                        }
            }
        }
    }
    for (int t = 0; t < 9 * c; t++) store(j->gw + t * o + k, sums[t]);
    store(j->gb + k, bias_sum);
}

static void *forward_job(void *arg) {
    const Job *j = arg;
    for (int k = 0; k < j->o; k += LANES) {
        if (j->c == 1) forward_block(j, k, 1);
        else if (j->c == 3) forward_block(j, k, 3);
        else forward_block(j, k, j->c);
    }
    return NULL;
}

static void *backward_job(void *arg) {
    const Job *j = arg;
    for (int k = 0; k < j->o; k += LANES) {
        if (j->c == 1) backward_block(j, k, 1);
        else if (j->c == 3) backward_block(j, k, 3);
        else backward_block(j, k, j->c);
    }
    return NULL;
}

/* 2x2 max-pool and ReLU on its own (seed-cnn's second block, after a convolution PyTorch runs): input N x H x W x C
   in j->in, output N x H/2 x W/2 x C in j->out, fp32 or bf16 alike. */
static void *pool_forward_job(void *arg) {
    const Job *j = arg;
    const int h = j->h, w = j->w, c = j->c, ph = h / 2, pw = w / 2;
    for (long n = j->n0; n < j->n1; n++)
        for (int py = 0; py < ph; py++)
            for (int px = 0; px < pw; px++)
                for (int k = 0; k < c; k += LANES) {
                    const long corner = ((n * h + 2 * py) * (long)w + 2 * px) * c + k, row = (long)w * c;
                    const vfloat v[4] = {load_any(j->in, corner, j->in_bf16), load_any(j->in, corner + c, j->in_bf16),
                                         load_any(j->in, corner + row, j->in_bf16),
                                         load_any(j->in, corner + row + c, j->in_bf16)};
                    vint best;
                    const vfloat m = window_max(v, &best);
                    relu_and_store(j, ((n * ph + py) * (long)pw + px) * c + k, m, best);
                }
    return NULL;
}

/* Its input gradient, N x H x W x C into j->out: each window's winner gets the output's gradient (j->in), the
   other three, a last odd row or column, and values the ReLU cut get zero. */
static void *pool_backward_job(void *arg) {
    const Job *j = arg;
    const int h = j->h, w = j->w, c = j->c, ph = h / 2, pw = w / 2, size = j->in_bf16 ? 2 : 4;
    const vfloat zero = {0};
    for (long n = j->n0; n < j->n1; n++) {
        char *image = (char *)j->out + n * (long)h * w * c * size;
        if (h & 1) memset(image + (long)(h - 1) * w * c * size, 0, (size_t)w * c * size);
        for (int y = 0; (w & 1) && y < 2 * ph; y++) memset(image + ((long)y * w + w - 1) * c * size, 0, (size_t)c * size);
        for (int py = 0; py < ph; py++)
            for (int px = 0; px < pw; px++)
                for (int k = 0; k < c; k += LANES) {
                    const long at = ((n * ph + py) * (long)pw + px) * c + k;
                    const vfloat g = load_any(j->in, at, j->in_bf16);
                    vbyte bytes;
                    memcpy(&bytes, j->idx + at, sizeof bytes);
                    const vint winner = __builtin_convertvector(bytes, vint);
                    const long corner = ((n * h + 2 * py) * (long)w + 2 * px) * c + k, row = (long)w * c;
                    store_any(j->out, corner, pick(winner == 0, g, zero), j->in_bf16);
                    store_any(j->out, corner + c, pick(winner == 1, g, zero), j->in_bf16);
                    store_any(j->out, corner + row, pick(winner == 2, g, zero), j->in_bf16);
                    store_any(j->out, corner + row + c, pick(winner == 3, g, zero), j->in_bf16);
                }
    }
    return NULL;
}

/* Winograd F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) for a 3x3
   'valid' convolution of C to O channels followed by the 2x2 max-pool and ReLU: seed-cnn's second block, 87% of
   its arithmetic. Each 2x2 block of outputs is one 4x4 input tile, taken at a stride of 2; in the transformed
   domain the convolution is 16 independent matrix products (P tiles x C) @ (C x O), which PyTorch computes
   (torch.bmm in conv_pool.py), with 16 multiplications per tile and channel pair instead of 36. Only the
   transforms are here: B^T d B of the input tiles, A^T m A of the products, and their transposes for the
   gradients. Their coefficients are 0 and +-1, so they add no rounding of their own beyond the storage type.
   A 2x2 output block is exactly one pooling window when the output side is even, so the pool and ReLU are
   taken straight from the four values, and only the pooled result and the winner are stored.

   Layouts: x and the input gradient N x H x W x C, the pooled output and its gradient N x TH x TW x O with
   TH = (H - 2) / 2, the transformed input v and its gradient 16 x P x C, the products m and their gradient
   16 x P x O, P = N x TH x TW tiles in image, row, column order. C and O are multiples of LANES. */

static void *winograd_input_job(void *arg) {
    const Job *j = arg;
    const int h = j->h, w = j->w, c = j->c, th = (h - 2) / 2, tw = (w - 2) / 2;
    const long apart = j->tiles * c;
    for (long n = j->n0; n < j->n1; n++)
        for (int ty = 0; ty < th; ty++)
            for (int tx = 0; tx < tw; tx++) {
                const long p = (n * th + ty) * (long)tw + tx;
                for (int k = 0; k < c; k += LANES) {
                    vfloat d[4][4], t[4][4];
                    for (int r = 0; r < 4; r++)
                        for (int s = 0; s < 4; s++)
                            d[r][s] = load_any(j->in, ((n * h + 2 * ty + r) * (long)w + 2 * tx + s) * c + k, j->in_bf16);
                    for (int s = 0; s < 4; s++) {  /* B^T d */
                        t[0][s] = d[0][s] - d[2][s];
                        t[1][s] = d[1][s] + d[2][s];
                        t[2][s] = d[2][s] - d[1][s];
                        t[3][s] = d[1][s] - d[3][s];
                    }
                    for (int r = 0; r < 4; r++) {  /* (B^T d) B */
                        const vfloat v[4] = {t[r][0] - t[r][2], t[r][1] + t[r][2], t[r][2] - t[r][1], t[r][1] - t[r][3]};
                        for (int s = 0; s < 4; s++) store_any(j->out, (r * 4 + s) * apart + p * c + k, v[s], j->out_bf16);
                    }
                }
            }
    return NULL;
}

/* A^T m A plus the bias: the tile's 2x2 outputs, then their max-pool and ReLU (j->h, j->w: TH, TW). */
static void *winograd_output_job(void *arg) {
    const Job *j = arg;
    const int o = j->o;
    const long apart = j->tiles * o;
    for (long p = j->n0 * j->h * j->w; p < j->n1 * j->h * j->w; p++)
        for (int k = 0; k < o; k += LANES) {
            vfloat r[2][4];
            for (int s = 0; s < 4; s++) {  /* A^T m */
                const vfloat m0 = load_any(j->in, (0 + s) * apart + p * o + k, j->in_bf16);
                const vfloat m1 = load_any(j->in, (4 + s) * apart + p * o + k, j->in_bf16);
                const vfloat m2 = load_any(j->in, (8 + s) * apart + p * o + k, j->in_bf16);
                const vfloat m3 = load_any(j->in, (12 + s) * apart + p * o + k, j->in_bf16);
                r[0][s] = m0 + m1 + m2;
                r[1][s] = m1 - m2 - m3;
            }
            const vfloat bias = load(j->b + k);
            const vfloat y[4] = {r[0][0] + r[0][1] + r[0][2] + bias, r[0][1] - r[0][2] - r[0][3] + bias,
                                 r[1][0] + r[1][1] + r[1][2] + bias, r[1][1] - r[1][2] - r[1][3] + bias};
            vint best;
            const vfloat m = window_max(y, &best);
            relu_and_store(j, p * o + k, m, best);
        }
    return NULL;
}

/* The products' gradient A dy A^T, where dy is the pooled gradient at the window's winner and zero elsewhere;
   and the bias gradient, summed into this job's own j->gb. */
static void *winograd_output_grad_job(void *arg) {
    const Job *j = arg;
    const int o = j->o;
    const long apart = j->tiles * o;
    const vfloat zero = {0};
    for (int k = 0; k < o; k += LANES) store(j->gb + k, zero);
    for (long p = j->n0 * j->h * j->w; p < j->n1 * j->h * j->w; p++)
        for (int k = 0; k < o; k += LANES) {
            const vfloat g = load_any(j->in, p * o + k, j->in_bf16);
            vbyte bytes;
            memcpy(&bytes, j->idx + p * o + k, sizeof bytes);
            const vint winner = __builtin_convertvector(bytes, vint);
            const vfloat dy[2][2] = {{pick(winner == 0, g, zero), pick(winner == 1, g, zero)},
                                     {pick(winner == 2, g, zero), pick(winner == 3, g, zero)}};
            store(j->gb + k, load(j->gb + k) + dy[0][0] + dy[0][1] + dy[1][0] + dy[1][1]);
            vfloat r[4][2];  /* A dy */
            for (int s = 0; s < 2; s++) {
                r[0][s] = dy[0][s];
                r[1][s] = dy[0][s] + dy[1][s];
                r[2][s] = dy[0][s] - dy[1][s];
                r[3][s] = -dy[1][s];
            }
            for (int a = 0; a < 4; a++) {  /* (A dy) A^T */
                const vfloat dm[4] = {r[a][0], r[a][0] + r[a][1], r[a][0] - r[a][1], -r[a][1]};
                for (int b = 0; b < 4; b++) store_any(j->out, (a * 4 + b) * apart + p * o + k, dm[b], j->out_bf16);
            }
        }
    return NULL;
}

/* The input's gradient: B dv B^T of every tile, added where the tile came from (neighbouring tiles overlap by
   two rows or columns), in fp32 in this job's j->gw (H x W x C) and then stored once per image. */
static void *winograd_input_grad_job(void *arg) {
    const Job *j = arg;
    const int h = j->h, w = j->w, c = j->c, th = (h - 2) / 2, tw = (w - 2) / 2;
    const long apart = j->tiles * c, size = (long)h * w * c;
    float *sum = j->gw;
    for (long n = j->n0; n < j->n1; n++) {
        memset(sum, 0, sizeof(float) * size);
        for (int ty = 0; ty < th; ty++)
            for (int tx = 0; tx < tw; tx++) {
                const long p = (n * th + ty) * (long)tw + tx;
                for (int k = 0; k < c; k += LANES) {
                    vfloat q[4][4];
                    for (int s = 0; s < 4; s++) {  /* B dv */
                        const vfloat v0 = load_any(j->in, (0 + s) * apart + p * c + k, j->in_bf16);
                        const vfloat v1 = load_any(j->in, (4 + s) * apart + p * c + k, j->in_bf16);
                        const vfloat v2 = load_any(j->in, (8 + s) * apart + p * c + k, j->in_bf16);
                        const vfloat v3 = load_any(j->in, (12 + s) * apart + p * c + k, j->in_bf16);
                        q[0][s] = v0;
                        q[1][s] = v1 - v2 + v3;
                        q[2][s] = v1 + v2 - v0;
                        q[3][s] = -v3;
                    }
                    for (int r = 0; r < 4; r++) {  /* (B dv) B^T, added into the tile's place */
                        const vfloat dd[4] = {q[r][0], q[r][1] - q[r][2] + q[r][3], q[r][1] + q[r][2] - q[r][0], -q[r][3]};
                        float *row = sum + ((long)(2 * ty + r) * w + 2 * tx) * c + k;
                        for (int s = 0; s < 4; s++) store(row + s * c, load(row + s * c) + dd[s]);
                    }
                }
            }
        for (long i = 0; i < size; i += LANES) store_any(j->out, n * size + i, load(sum + i), j->out_bf16);
    }
    return NULL;
}

/* The weights' transform G g G^T, G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1], for each of the O x C filters of w
   (O x C x 3 x 3, PyTorch's layout) into u (16 x O x C, fp32 or bf16); and the gradient's way back, G^T du G, from
   du (16 x C x O) into gw (O x C x 3 x 3, fp32).
   A few thousand filters: one thread, well under the cost of a call into PyTorch for the same. */
static const float winograd_g[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};

void winograd_weights(const float *w, void *u, int u_bf16, int o, int c) {
    const long filters = (long)o * c;
    for (long f0 = 0; f0 < filters; f0 += LANES) {  /* O x C is a multiple of LANES: C comes in blocks of 16 */
        float out[16][LANES];
        for (int lane = 0; lane < LANES; lane++) {
            const float *g = w + (f0 + lane) * 9;
            float t[4][3];  /* G g */
            for (int i = 0; i < 4; i++)
                for (int k = 0; k < 3; k++)
                    t[i][k] = winograd_g[i][0] * g[k] + winograd_g[i][1] * g[3 + k] + winograd_g[i][2] * g[6 + k];
            for (int i = 0; i < 4; i++)  /* (G g) G^T */
                for (int l = 0; l < 4; l++)
                    out[i * 4 + l][lane] = t[i][0] * winograd_g[l][0] + t[i][1] * winograd_g[l][1] + t[i][2] * winograd_g[l][2];
        }
        for (int q = 0; q < 16; q++) store_any(u, q * filters + f0, load(out[q]), u_bf16);
    }
}

void winograd_weight_grad(const void *du, int du_bf16, float *gw, int o, int c) {
    /* du is 16 x C x O here (the layout torch.bmm gives it fastest), so LANES outputs are adjacent */
    const long filters = (long)o * c;
    for (int ci = 0; ci < c; ci++)
        for (int o0 = 0; o0 < o; o0 += LANES) {
            vfloat d[16], t[3][4];
            for (int q = 0; q < 16; q++) d[q] = load_any(du, q * filters + (long)ci * o + o0, du_bf16);
            for (int j = 0; j < 3; j++)  /* G^T du */
                for (int l = 0; l < 4; l++)
                    t[j][l] = winograd_g[0][j] * d[l] + winograd_g[1][j] * d[4 + l] + winograd_g[2][j] * d[8 + l]
                              + winograd_g[3][j] * d[12 + l];
            float g[9][LANES];
            for (int j = 0; j < 3; j++)  /* (G^T du) G */
                for (int k = 0; k < 3; k++)
                    store(g[j * 3 + k], t[j][0] * winograd_g[0][k] + t[j][1] * winograd_g[1][k]
                                        + t[j][2] * winograd_g[2][k] + t[j][3] * winograd_g[3][k]);
            for (int lane = 0; lane < LANES; lane++)
                for (int tap = 0; tap < 9; tap++) gw[((long)(o0 + lane) * c + ci) * 9 + tap] = g[tap][lane];
        }
}

/* Copies `base` into one job per slice of the batch; returns how many slices there are. */
static int split(Job *jobs, const Job *base, long n, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)(n > 0 ? n : 1);
    for (int t = 0; t < threads; t++) {
        jobs[t] = *base;
        jobs[t].n0 = n * t / threads;
        jobs[t].n1 = n * (t + 1) / threads;
    }
    return threads;
}

/* Runs `fn` on each job in OpenMP threads. In a process with torch, libgomp.so.1 is torch's own, already
   loaded, so these are torch's intra-op threads: with a separate pool, torch's threads would still be spinning
   on the cores after their last op (measured: the kernel ran 3x slower inside the model than alone). */
static void run(void *(*fn)(void *), Job *jobs, int count) {
#pragma omp parallel for num_threads(count) schedule(static, 1)
    for (int t = 0; t < count; t++) fn(&jobs[t]);
}

/* dst[i] = the sum over `count` job buffers of n floats each, the first at `first`, each `stride` after the last:
   the per-job sums of a backward pass, added in job order (so the result does not depend on timing). */
static void sum_job_buffers(float *dst, const float *first, int count, size_t stride, size_t n) {
    memcpy(dst, first, sizeof(float) * n);
    for (int t = 1; t < count; t++)
        for (size_t i = 0; i < n; i++) dst[i] += first[t * stride + i];
}

/* out is fp32, or bf16 when out_bf16; idx may be NULL (no gradient wanted). */
void conv_pool_relu_forward(const float *x, const float *wt, const float *b, void *out, int out_bf16, uint8_t *idx,
                            long n, int h, int w, int c, int o, int threads) {
    Job jobs[MAX_THREADS];
    const Job base = {.x = x, .wt = wt, .b = b, .out = out, .out_bf16 = out_bf16, .idx = idx,
                      .h = h, .w = w, .c = c, .o = o};
    run(forward_job, jobs, split(jobs, &base, n, threads));
}

/* grad (the output's gradient) is fp32, or bf16 when grad_bf16; gw (C x 3 x 3 x O) and gb (O) are overwritten.
   Returns 0, or -1 when scratch memory ran out. */
int conv_pool_relu_backward(const float *x, const void *grad, int grad_bf16, const uint8_t *idx, float *gw,
                            float *gb, long n, int h, int w, int c, int o, int threads) {
    Job jobs[MAX_THREADS];
    const Job base = {.x = x, .in = grad, .in_bf16 = grad_bf16, .idx = (uint8_t *)idx, .h = h, .w = w, .c = c, .o = o};
    const int count = split(jobs, &base, n, threads);
    const size_t nw = (size_t)c * 9 * o, per = nw + o;
    float *scratch = malloc((size_t)count * per * sizeof(float));
    if (!scratch) return -1;
    for (int t = 0; t < count; t++) {  /* each slice sums into its own buffers; they are added at the end */
        jobs[t].gw = scratch + t * per;
        jobs[t].gb = scratch + t * per + nw;
    }
    run(backward_job, jobs, count);
    sum_job_buffers(gw, scratch, count, per, nw);
    sum_job_buffers(gb, scratch + nw, count, per, o);
    free(scratch);
    return 0;
}

/* x and out are fp32, or both bf16 when bf16; idx may be NULL (no gradient wanted). */
void pool_relu_forward(const void *x, void *out, int bf16, uint8_t *idx, long n, int h, int w, int c, int threads) {
    Job jobs[MAX_THREADS];
    const Job base = {.in = x, .in_bf16 = bf16, .out = out, .out_bf16 = bf16, .idx = idx, .h = h, .w = w, .c = c};
    run(pool_forward_job, jobs, split(jobs, &base, n, threads));
}

/* grad (N x H/2 x W/2 x C) and grad_x (N x H x W x C) are fp32, or both bf16 when bf16. */
void pool_relu_backward(const void *grad, const uint8_t *idx, void *grad_x, int bf16, long n, int h, int w, int c,
                        int threads) {
    Job jobs[MAX_THREADS];
    const Job base = {.in = grad, .in_bf16 = bf16, .idx = (uint8_t *)idx, .out = grad_x, .h = h, .w = w, .c = c};
    run(pool_backward_job, jobs, split(jobs, &base, n, threads));
}

/* x (N x H x W x C) to v (16 x P x C); each fp32, or bf16 where its flag says so. */
void winograd_input(const void *x, int x_bf16, void *v, int v_bf16, long n, int h, int w, int c, int threads) {
    Job jobs[MAX_THREADS];
    const Job base = {.in = x, .in_bf16 = x_bf16, .out = v, .out_bf16 = v_bf16, .tiles = n * ((h - 2) / 2) * ((w - 2) / 2),
                      .h = h, .w = w, .c = c};
    run(winograd_input_job, jobs, split(jobs, &base, n, threads));
}

/* m (16 x P x O) and the bias to the pooled output (N x TH x TW x O) and its winners; idx may be NULL. */
void winograd_output_pool_relu(const void *m, int m_bf16, const float *b, void *out, int out_bf16, uint8_t *idx,
                               long n, int th, int tw, int o, int threads) {
    Job jobs[MAX_THREADS];
    const Job base = {.in = m, .in_bf16 = m_bf16, .b = b, .out = out, .out_bf16 = out_bf16, .idx = idx,
                      .tiles = n * th * tw, .h = th, .w = tw, .o = o};
    run(winograd_output_job, jobs, split(jobs, &base, n, threads));
}

/* The pooled output's gradient (N x TH x TW x O) to the products' gradient dm (16 x P x O) and the bias gradient
   gb (O, overwritten). Returns 0, or -1 when scratch memory ran out. */
int winograd_output_grad(const void *grad, int grad_bf16, const uint8_t *idx, void *dm, int dm_bf16, float *gb,
                         long n, int th, int tw, int o, int threads) {
    Job jobs[MAX_THREADS];
    const Job base = {.in = grad, .in_bf16 = grad_bf16, .idx = (uint8_t *)idx, .out = dm, .out_bf16 = dm_bf16,
                      .tiles = n * th * tw, .h = th, .w = tw, .o = o};
    const int count = split(jobs, &base, n, threads);
    float *scratch = malloc((size_t)count * o * sizeof(float));
    if (!scratch) return -1;
    for (int t = 0; t < count; t++) jobs[t].gb = scratch + (size_t)t * o;
    run(winograd_output_grad_job, jobs, count);
    sum_job_buffers(gb, scratch, count, o, o);
    free(scratch);
    return 0;
}

/* dv (16 x P x C) to the input's gradient dx (N x H x W x C). Returns 0, or -1 when scratch memory ran out. */
int winograd_input_grad(const void *dv, int dv_bf16, void *dx, int dx_bf16, long n, int h, int w, int c, int threads) {
    Job jobs[MAX_THREADS];
    const Job base = {.in = dv, .in_bf16 = dv_bf16, .out = dx, .out_bf16 = dx_bf16,
                      .tiles = n * ((h - 2) / 2) * ((w - 2) / 2), .h = h, .w = w, .c = c};
    const int count = split(jobs, &base, n, threads);
    const size_t size = (size_t)h * w * c;
    float *scratch = malloc((size_t)count * size * sizeof(float));
    if (!scratch) return -1;
    for (int t = 0; t < count; t++) jobs[t].gw = scratch + t * size;
    run(winograd_input_grad_job, jobs, count);
    free(scratch);
    return 0;
}
