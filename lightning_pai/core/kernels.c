/* lightning_pai sparse inference kernels (see lightning_pai/core/kernels.py for what each computes).
   Built at first use with the system C compiler; loaded through ctypes. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64

/* Per-thread scratch memory, grown on demand and kept: no allocation (and no page faults for fresh memory)
   on the calls after the first. */
static __thread float *lp_scratch_buf = NULL;
static __thread size_t lp_scratch_cap = 0;

static float *lp_scratch(size_t floats) {
    if (floats > lp_scratch_cap) {
        free(lp_scratch_buf);
        const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
        lp_scratch_buf = (float *)aligned_alloc(64, bytes);
        lp_scratch_cap = lp_scratch_buf ? floats : 0;
    }
    return lp_scratch_buf;
}

static inline float lp_act(float v, int act) { return (act == 1 && v < 0.0f) ? 0.0f : v; }

/* y[r, t0:t0+TILE] for one row r, accumulated in SIMD registers. The vector width is the widest of the build's
   instruction set (LP_VEC floats: 16 with AVX-512, 8 with AVX/AVX2, 4 otherwise); a generic vector wider than the
   hardware's would be split by the compiler into pieces that overflow the register file (AVX2 has 16 ymm
   registers, AVX-512 32 zmm) and go through the stack. A pass over the row's kept weights keeps LP_SPAN
   vectors of the tile in accumulators (at most half the registers: the rest hold the broadcast weight and the
   loads), with LP_SETS sets for alternating k, so that 8 multiply-adds are in flight (an FMA's latency times
   the FMAs issued per cycle); a tile wider than LP_SPAN vectors takes several passes. */
#ifndef LP_VEC
#if defined(__AVX512F__)
#define LP_VEC 16
#define LP_REGS 32
#elif defined(__AVX__)
#define LP_VEC 8
#define LP_REGS 16
#elif defined(__aarch64__)
#define LP_VEC 4
#define LP_REGS 32
#else
#define LP_VEC 4
#define LP_REGS 16
#endif
#endif
#define LP_NV (TILE / LP_VEC)
#ifndef LP_SPAN
#define LP_SPAN (LP_NV < LP_REGS / 2 ? LP_NV : LP_REGS / 2)
#endif
#ifndef LP_SETS
#define LP_SETS (LP_SPAN < 8 ? 8 / LP_SPAN : 1)
#endif
typedef float lp_vec __attribute__((vector_size(LP_VEC * 4), aligned(4)));

static inline void lp_row_tile(const int32_t *restrict col, const float *restrict val, int64_t k0, int64_t k1,
                               const float *restrict x, int64_t ldx, float bias, int act, float *restrict y) {
    for (int v0 = 0; v0 < LP_NV; v0 += LP_SPAN) {
        lp_vec a[LP_SETS][LP_SPAN];
#pragma GCC unroll 16
        for (int s = 0; s < LP_SETS; s++)
#pragma GCC unroll 16
            for (int i = 0; i < LP_SPAN; i++) a[s][i] = (lp_vec){0};
        int64_t k = k0;
        for (; k + LP_SETS - 1 < k1; k += LP_SETS) {
#pragma GCC unroll 16
            for (int s = 0; s < LP_SETS; s++) {
                const float v = val[k + s];
                const lp_vec *p = (const lp_vec *)(x + (int64_t)col[k + s] * ldx) + v0;
#pragma GCC unroll 16
                for (int i = 0; i < LP_SPAN; i++) a[s][i] += v * p[i];
            }
        }
        for (; k < k1; k++) {
            const float v = val[k];
            const lp_vec *p = (const lp_vec *)(x + (int64_t)col[k] * ldx) + v0;
#pragma GCC unroll 16
            for (int i = 0; i < LP_SPAN; i++) a[0][i] += v * p[i];
        }
        lp_vec *out = (lp_vec *)y + v0;
#pragma GCC unroll 16
        for (int i = 0; i < LP_SPAN; i++) {
            lp_vec sum = a[0][i] + bias;
#pragma GCC unroll 16
            for (int s = 1; s < LP_SETS; s++) sum += a[s][i];
            out[i] = sum;
        }
    }
    if (act == 1)
        for (int j = 0; j < TILE; j++) y[j] = y[j] < 0.0f ? 0.0f : y[j];
}

static inline void lp_row_part(const int32_t *restrict col, const float *restrict val, int64_t k0, int64_t k1,
                               const float *restrict x, int64_t ldx, float bias, int act, float *restrict y,
                               int64_t width) {
    if (width == 1) {  /* a matrix-vector product: a gathered dot product, four partial sums */
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        int64_t k = k0;
        for (; k + 3 < k1; k += 4) {
            s0 += val[k] * x[(int64_t)col[k] * ldx];
            s1 += val[k + 1] * x[(int64_t)col[k + 1] * ldx];
            s2 += val[k + 2] * x[(int64_t)col[k + 2] * ldx];
            s3 += val[k + 3] * x[(int64_t)col[k + 3] * ldx];
        }
        for (; k < k1; k++) s0 += val[k] * x[(int64_t)col[k] * ldx];
        y[0] = lp_act(bias + ((s0 + s1) + (s2 + s3)), act);
        return;
    }
    float a[TILE];
    for (int64_t j = 0; j < width; j++) a[j] = bias;
    for (int64_t k = k0; k < k1; k++) {
        const float v = val[k];
        const float *restrict p = x + (int64_t)col[k] * ldx;
        for (int64_t j = 0; j < width; j++) a[j] += v * p[j];
    }
    for (int64_t j = 0; j < width; j++) y[j] = lp_act(a[j], act);
}

/* Y^T[r, t] = act(bias[r] + sum_k val[k] X^T[col[k], t]) for r < rows, t < n; X^T is (in, n), row stride ldx.
   A full tile of a wide input is first copied to a contiguous (in, TILE) buffer: its rows are then adjacent
   in memory instead of ldx apart (a power-of-two stride maps them onto a few cache sets). */
static int lp_csr_matmul_t(int64_t rows, int64_t in, int64_t n, const int32_t *crow, const int32_t *col,
                    const float *val, const float *bias, const float *x, int64_t ldx, float *y, int64_t ldy,
                    int act, int threads) {
    const int64_t tiles = (n + TILE - 1) / TILE;
    int64_t blocks = 1;
    if (tiles < 4 * threads) blocks = (4 * threads + tiles - 1) / tiles;
    if (blocks > rows) blocks = rows > 0 ? rows : 1;
    const int64_t items = tiles * blocks;
    const int64_t per_block = (rows + blocks - 1) / blocks;
    const int pack = ldx != TILE && in > 0 && n >= TILE;  /* only full tiles are packed */
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *buf = pack ? lp_scratch((size_t)in * TILE) : NULL; /* NULL (out of memory): read unpacked */
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            const int64_t tile = item / blocks, block = item % blocks;
            const int64_t t0 = tile * TILE, width = (n - t0 < TILE) ? n - t0 : TILE;
            const int64_t r0 = block * per_block, r1 = (r0 + per_block < rows) ? r0 + per_block : rows;
            const float *src = x + t0;
            int64_t ld = ldx;
            if (buf && width == TILE) {
                for (int64_t i = 0; i < in; i++) memcpy(buf + i * TILE, x + i * ldx + t0, TILE * sizeof(float));
                src = buf;
                ld = TILE;
            }
            for (int64_t r = r0; r < r1; r++) {
                const float b = bias ? bias[r] : 0.0f;
                if (width == TILE)
                    lp_row_tile(col, val, crow[r], crow[r + 1], src, ld, b, act, y + r * ldy + t0);
                else
                    lp_row_part(col, val, crow[r], crow[r + 1], src, ld, b, act, y + r * ldy + t0, width);
            }
        }
    }
    return 0;
}

/* A CSR weight prepared once per layer (see CsrPlan in Python): one small call per product. */
typedef struct {
    int64_t rows, in, nnz;
    const int32_t *crow, *col;
    const float *val, *bias;
    int act;
} lp_csr;

int lp_csr_apply(const lp_csr *w, int64_t n, const float *x, int64_t ldx, float *y, int threads) {
    return lp_csr_matmul_t(w->rows, w->in, n, w->crow, w->col, w->val, w->bias, x, ldx, y, n, w->act, threads);
}

/* The same product without a prepared plan (the sparse training layers' forward and input-gradient products). */
int lp_csr_matmul(int64_t rows, int64_t in, int64_t n, const int32_t *crow, const int32_t *col, const float *val,
                  const float *bias, const float *x, int64_t ldx, float *y, int64_t ldy, int act, int threads) {
    return lp_csr_matmul_t(rows, in, n, crow, col, val, bias, x, ldx, y, ldy, act, threads);
}

static inline float lp_hsum(lp_vec v) {
    float s = 0.0f;
#pragma GCC unroll 16
    for (int i = 0; i < LP_VEC; i++) s += v[i];
    return s;
}

/* out[k] = sum_t a[r, t] b[col[k], t] for every kept k in row r (crow[r] <= k < crow[r + 1]): the product A B^T
   sampled at the CSR's positions (an SDDMM; the weight gradient dW = dY^T X at the kept weights, with a = dY^T and
   b = X^T). a is (rows, n) with row stride lda, b (cols, n) with row stride ldb. Four kept entries at a time share
   the loads of a's row, each with two vector accumulators (8 multiply-adds in flight). */
int lp_csr_sddmm(int64_t rows, int64_t n, const int32_t *crow, const int32_t *col, const float *a, int64_t lda,
                 const float *b, int64_t ldb, float *out, int threads) {
    const int64_t nv = n / LP_VEC * LP_VEC;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict ar = a + r * lda;
        int64_t k = crow[r];
        const int64_t k1 = crow[r + 1];
        for (; k + 3 < k1; k += 4) {
            const float *restrict p[4];
            lp_vec acc[4][2];
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                p[j] = b + (int64_t)col[k + j] * ldb;
                acc[j][0] = acc[j][1] = (lp_vec){0};
            }
            int64_t t = 0;
            for (; t + 2 * LP_VEC <= nv; t += 2 * LP_VEC) {
                const lp_vec a0 = *(const lp_vec *)(ar + t), a1 = *(const lp_vec *)(ar + t + LP_VEC);
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    acc[j][0] += a0 * *(const lp_vec *)(p[j] + t);
                    acc[j][1] += a1 * *(const lp_vec *)(p[j] + t + LP_VEC);
                }
            }
            for (; t < nv; t += LP_VEC) {
                const lp_vec a0 = *(const lp_vec *)(ar + t);
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) acc[j][0] += a0 * *(const lp_vec *)(p[j] + t);
            }
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                float s = lp_hsum(acc[j][0] + acc[j][1]);
                for (int64_t u = nv; u < n; u++) s += ar[u] * p[j][u];
                out[k + j] = s;
            }
        }
        for (; k < k1; k++) {
            const float *restrict q = b + (int64_t)col[k] * ldb;
            lp_vec acc = (lp_vec){0};
            for (int64_t t = 0; t < nv; t += LP_VEC) acc += *(const lp_vec *)(ar + t) * *(const lp_vec *)(q + t);
            float s = lp_hsum(acc);
            for (int64_t u = nv; u < n; u++) s += ar[u] * q[u];
            out[k] = s;
        }
    }
    return 0;
}

/* Keep-mask enforcement: data[i] keeps its bits where mask[i] == 1 and becomes all-zero bits (+0.0) where
   mask[i] == 0, whatever it held (NaN, Inf): torch.where(mask, data, 0) in place, one pass reading 1 byte of
   mask per element. elsize is the element's size in bytes (2, 4 or 8); returns -1 for another size. */
int lp_mask_bits(int64_t n, void *data, int elsize, const uint8_t *mask, int threads) {
    if (elsize == 4) {
        uint32_t *restrict d = (uint32_t *)data;
#pragma omp parallel for simd schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t i = 0; i < n; i++) d[i] &= -(uint32_t)mask[i];
    } else if (elsize == 2) {
        uint16_t *restrict d = (uint16_t *)data;
#pragma omp parallel for simd schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t i = 0; i < n; i++) d[i] &= (uint16_t)-(uint16_t)mask[i];
    } else if (elsize == 8) {
        uint64_t *restrict d = (uint64_t *)data;
#pragma omp parallel for simd schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t i = 0; i < n; i++) d[i] &= -(uint64_t)mask[i];
    } else {
        return -1;
    }
    return 0;
}

/* Direct sparse convolution (Park et al. 2017) over a batch of images laid out as "phase planes" (see
   SparseConv2d in Python): on the output grid t = i * grid_w + j (i < out_h, j < grid_w), every output channel r is
   g[r, t] = act(bias[r] + sum_k val[k] x[img, off[k] + t]); the columns j < out_w of it are written, compactly,
   to y[img, r, i, j] (y_img floats per image, out_h * out_w per channel). */
int lp_sparse_conv(int64_t batch, int64_t rows, int64_t out_h, int64_t out_w, int64_t grid_w, const int32_t *crow,
                   const int32_t *off, const float *val, const float *bias, const float *x, int64_t x_img, float *y,
                   int64_t y_img, int act, int threads) {
    const int64_t L = (out_h - 1) * grid_w + out_w, tiles = (L + TILE - 1) / TILE, work = batch * tiles;
    const int64_t ldy = out_h * out_w;
    const int compact = grid_w == out_w;
    int64_t blocks = 1;
    if (work < 4 * threads) blocks = (4 * threads + work - 1) / work;
    if (blocks > rows) blocks = rows > 0 ? rows : 1;
    const int64_t items = work * blocks, per_block = (rows + blocks - 1) / blocks;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t item = 0; item < items; item++) {
        const int64_t img = item / (tiles * blocks), tile = (item / blocks) % tiles, block = item % blocks;
        const int64_t t0 = tile * TILE, width = (L - t0 < TILE) ? L - t0 : TILE;
        const int64_t r0 = block * per_block, r1 = (r0 + per_block < rows) ? r0 + per_block : rows;
        const float *src = x + img * x_img + t0;
        float *dst = y + img * y_img;
        float part[TILE] __attribute__((aligned(64)));
        for (int64_t r = r0; r < r1; r++) {
            const float b = bias ? bias[r] : 0.0f;
            float *out = dst + r * ldy;
            if (compact && width == TILE) {
                lp_row_tile(off, val, crow[r], crow[r + 1], src, 1, b, act, out + t0);
                continue;
            }
            /* reads up to TILE floats past the tile: the caller's buffer has that slack */
            lp_row_tile(off, val, crow[r], crow[r + 1], src, 1, b, act, part);
            if (compact) {
                memcpy(out + t0, part, (size_t)width * sizeof(float));
                continue;
            }
            /* keep the grid columns j < out_w of every grid row the tile crosses */
            for (int64_t t = t0; t < t0 + width;) {
                const int64_t i = t / grid_w, j = t % grid_w;
                int64_t run = (j < out_w ? out_w : grid_w) - j;
                if (run > t0 + width - t) run = t0 + width - t;
                if (j < out_w) memcpy(out + i * out_w + j, part + (t - t0), (size_t)run * sizeof(float));
                t += run;
            }
        }
    }
    return 0;
}

/* Zero-padded, strided phase planes of a batch of planes:
   out[p, a, b, i, j] = x[p, step_h i + a - top, step_w j + b - left] (0 outside the h x w input), for a < qh,
   b < qw, i < ph, j < pw; x's planes are ld_plane floats apart, its rows ld_row apart (columns contiguous). */
int lp_phase_planes(int64_t planes, int64_t h, int64_t w, const float *x, int64_t ld_plane, int64_t ld_row,
                    int64_t top, int64_t left, int64_t step_h, int64_t step_w, int64_t qh, int64_t qw, int64_t ph,
                    int64_t pw, float *out, int threads) {
    const int64_t rows_out = planes * qh * qw * ph;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t row = 0; row < rows_out; row++) {
        const int64_t i = row % ph, b = (row / ph) % qw, a = (row / (ph * qw)) % qh, p = row / (ph * qw * qh);
        float *o = out + row * pw;
        const int64_t r = step_h * i + a - top;
        if (r < 0 || r >= h) {
            memset(o, 0, (size_t)pw * sizeof(float));
            continue;
        }
        const float *src = x + p * ld_plane + r * ld_row;
        /* columns j with 0 <= step_w j + b - left < w */
        int64_t j0 = left - b > 0 ? (left - b + step_w - 1) / step_w : 0;
        int64_t j1 = (w - 1 + left - b) >= 0 ? (w - 1 + left - b) / step_w + 1 : 0;
        if (j0 > pw) j0 = pw;
        if (j1 > pw) j1 = pw;
        if (j1 < j0) j1 = j0;
        for (int64_t j = 0; j < j0; j++) o[j] = 0.0f;
        if (step_w == 1) {
            if (j1 > j0) memcpy(o + j0, src + j0 + b - left, (size_t)(j1 - j0) * sizeof(float));
        } else {
            for (int64_t j = j0; j < j1; j++) o[j] = src[step_w * j + b - left];
        }
        for (int64_t j = j1; j < pw; j++) o[j] = 0.0f;
    }
    return 0;
}

/* dst[j, i] = src[i, j] for a rows x cols src (row stride lds) into dst (row stride ldd), 32x32 blocks. */
int lp_transpose(int64_t rows, int64_t cols, const float *src, int64_t lds, float *dst, int64_t ldd,
                 int threads) {
    const int64_t B = 32, bi = (rows + B - 1) / B, bj = (cols + B - 1) / B;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t blk = 0; blk < bi * bj; blk++) {
        const int64_t i0 = (blk / bj) * B, j0 = (blk % bj) * B;
        const int64_t i1 = (i0 + B < rows) ? i0 + B : rows, j1 = (j0 + B < cols) ? j0 + B : cols;
        for (int64_t j = j0; j < j1; j++)
            for (int64_t i = i0; i < i1; i++) dst[j * ldd + i] = src[i * lds + j];
    }
    return 0;
}

/* LayerNorm of every column t of a (features, n) matrix x (row stride ldx) over its `features` entries. */
int lp_layer_norm_t(int64_t features, int64_t n, const float *x, int64_t ldx, const float *w, const float *b,
                    float eps, float *y, int64_t ldy, int threads) {
    const int64_t tiles = (n + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t t0 = tile * TILE, width = (n - t0 < TILE) ? n - t0 : TILE;
        float mean[TILE], scale[TILE];
        for (int64_t j = 0; j < width; j++) { mean[j] = 0.0f; scale[j] = 0.0f; }
        for (int64_t f = 0; f < features; f++) {
            const float *p = x + f * ldx + t0;
            for (int64_t j = 0; j < width; j++) mean[j] += p[j];
        }
        for (int64_t j = 0; j < width; j++) mean[j] /= (float)features;
        for (int64_t f = 0; f < features; f++) {
            const float *p = x + f * ldx + t0;
            for (int64_t j = 0; j < width; j++) { const float d = p[j] - mean[j]; scale[j] += d * d; }
        }
        for (int64_t j = 0; j < width; j++) scale[j] = 1.0f / sqrtf(scale[j] / (float)features + eps);
        for (int64_t f = 0; f < features; f++) {
            const float *p = x + f * ldx + t0;
            float *q = y + f * ldy + t0;
            const float wf = w ? w[f] : 1.0f, bf = b ? b[f] : 0.0f;
            for (int64_t j = 0; j < width; j++) q[j] = (p[j] - mean[j]) * scale[j] * wf + bf;
        }
    }
    return 0;
}
