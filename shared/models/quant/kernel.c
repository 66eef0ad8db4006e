/* y = x @ W^T + b with W kept in GGUF's block formats Q4_0, Q4_1 and Q8_0 (32 weights a block),
 * or in the grouped Q4_1G and Q8_0G (one scale per group of G weights, stored after the row's values).
 *
 * Built on demand by splitlm.shared.models.quant.build with the system compiler and
 * -march=native, loaded with ctypes: no torch headers, a one-second compile.
 *
 * Deterministic by row: every output element y[r][o] is reduced in one fixed order (two vector
 * accumulators over the blocks of row o, then one horizontal sum, then + b[o]), whichever other
 * rows share the call and however many threads run it. Threads split the output features only.
 * Rows are handled in groups (up to ROWS_MAX) so a dequantised block is used by several rows while
 * it sits in registers; a row's sequence of operations is the same in every group size.
 *
 * A weight is q * d + c with q the stored integer, d the block's (group's) scale and c = -8d
 * (Q4_0), m (Q4_1, Q4_1G) or 0 (Q8_0, Q8_0G). One fused multiply-add gives GGUF's dequantised value bit for bit: q * d is
 * exact in float32 (an 11-bit mantissa times at most 8 bits), so the only rounding is the add,
 * as in gguf.quants.dequantize.
 *
 * Both kinds run one loop: over groups (a GGUF block is a group of one block), loading the
 * group's scale once, then over the group's blocks of 32. The format is a compile-time constant in
 * each copy of the loop, so a GGUF format's inner loop of one block folds away.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define QK 32
#define FMT_Q4_0 0
#define FMT_Q4_1 1
#define FMT_Q8_0 2
#define FMT_Q4_1G 3
#define FMT_Q8_0G 4
#define NFMT 5

/* bytes of one block of 32 weights per format, as GGUF writes them; a grouped format's values only */
static const int64_t BLOCK_BYTES[NFMT] = {18, 20, 34, 16, 32};
/* where a block's values start within it */
static const int64_t VALUES_AT[NFMT] = {2, 4, 2, 0, 0};

static inline int is_grouped(int fmt) { return fmt == FMT_Q4_1G || fmt == FMT_Q8_0G; }
static inline int is_q8(int fmt) { return fmt == FMT_Q8_0 || fmt == FMT_Q8_0G; }

/* output features a thread takes at a time: the rows of x are walked once per tile */
#define TILE 16

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t mant = h & 0x3FF;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal half: normalise */
            exp = 127 - 15 + 1;
            while ((mant & 0x400) == 0) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3FF;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

static inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* scale d and offset c of group g of a row of nblocks blocks (a GGUF format: block g) */
static inline void group_scale(int fmt, const uint8_t *w, int64_t nblocks, int64_t g, float *d,
                               float *c) {
    if (is_grouped(fmt)) {
        const uint8_t *s = w + nblocks * BLOCK_BYTES[fmt] + g * (fmt == FMT_Q4_1G ? 4 : 2);
        *d = half_to_float(load_u16(s));
        *c = fmt == FMT_Q4_1G ? half_to_float(load_u16(s + 2)) : 0.0f;
        return;
    }
    const uint8_t *b = w + g * BLOCK_BYTES[fmt];
    *d = half_to_float(load_u16(b));
    if (fmt == FMT_Q4_0) {
        *c = -8.0f * *d;
    } else if (fmt == FMT_Q4_1) {
        *c = half_to_float(load_u16(b + 2));
    } else {
        *c = 0.0f;
    }
}

/* the values of block i of a row */
static inline const uint8_t *block_values(int fmt, const uint8_t *w, int64_t i) {
    return w + i * BLOCK_BYTES[fmt] + VALUES_AT[fmt];
}

/* blocks a group holds: 1 in GGUF's formats (a constant once fmt is), gb in a grouped one */
#define GROUP_BLOCKS(fmt, gb) (is_grouped(fmt) ? (gb) : 1)

#if defined(__AVX512F__)
/* ------------------------------------------------------------------ AVX-512: 16 lanes */
#define ISA_NAME "avx512"
#define ROWS_MAX 8

/* what a group's scale turns into once: d in every lane (Q8), or the 16 values a nibble can
 * stand for (Q4), so that each weight is one lookup: vpermps reads only the low 4 bits of each
 * index, so the nibbles need no masking */
static inline __attribute__((always_inline)) __m512 group_table(int fmt, float d, float c) {
    const __m512 vd = _mm512_set1_ps(d);
    if (is_q8(fmt)) return vd;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_fmadd_ps(iota, vd, _mm512_set1_ps(c));
}

/* the 32 weights of a block from its values qs: elements 0..15 in *lo, 16..31 in *hi */
static inline __attribute__((always_inline)) void dequant_block(int fmt, const uint8_t *qs,
                                                                __m512 table, __m512 *lo,
                                                                __m512 *hi) {
    if (is_q8(fmt)) {
        const __m128i q0 = _mm_loadu_si128((const __m128i *)qs);
        const __m128i q1 = _mm_loadu_si128((const __m128i *)(qs + 16));
        *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), table);
        *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), table);
    } else {
        const __m128i q = _mm_loadu_si128((const __m128i *)qs);
        *lo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(q), table);
        *hi = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_srli_epi16(q, 4)), table);
    }
}

/* R rows of x against one weight row; R is a constant after inlining */
static inline __attribute__((always_inline)) void dot_rows(int fmt, int R, const uint8_t *w,
                                                           int64_t nblocks, int64_t gb,
                                                           const float *x, int64_t xs, float bias,
                                                           float *y, int64_t ys) {
    const int64_t step = GROUP_BLOCKS(fmt, gb);
    __m512 acc_lo[ROWS_MAX], acc_hi[ROWS_MAX];
    for (int r = 0; r < R; r++) {
        acc_lo[r] = _mm512_setzero_ps();
        acc_hi[r] = _mm512_setzero_ps();
    }
#define ACC_BLOCK(i, table)                                                                      \
    do {                                                                                         \
        __m512 lo, hi;                                                                           \
        dequant_block(fmt, block_values(fmt, w, i), table, &lo, &hi);                            \
        const float *xb = x + (i) * QK;                                                          \
        for (int r = 0; r < R; r++) {                                                            \
            acc_lo[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + r * xs), acc_lo[r]);            \
            acc_hi[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + r * xs + 16), acc_hi[r]);       \
        }                                                                                        \
    } while (0)
    if (step == 1) { /* GGUF's formats: one loop over blocks, as before groups existed */
        for (int64_t i = 0; i < nblocks; i++) {
            float d, c;
            group_scale(fmt, w, nblocks, i, &d, &c);
            ACC_BLOCK(i, group_table(fmt, d, c));
        }
    } else {
        for (int64_t i0 = 0, g = 0; i0 < nblocks; i0 += step, g++) {
            float d, c;
            group_scale(fmt, w, nblocks, g, &d, &c);
            const __m512 table = group_table(fmt, d, c);
            const int64_t i1 = i0 + step < nblocks ? i0 + step : nblocks;
            for (int64_t i = i0; i < i1; i++) ACC_BLOCK(i, table);
        }
    }
#undef ACC_BLOCK
    for (int r = 0; r < R; r++) {
        y[r * ys] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[r], acc_hi[r])) + bias;
    }
}

#elif defined(__AVX2__) && defined(__FMA__)
/* ------------------------------------------------------------------ AVX2: 8 lanes */
#define ISA_NAME "avx2"
#define ROWS_MAX 4

static inline __m256 widen8(__m128i q8, int is_signed) {
    return _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(q8) : _mm256_cvtepu8_epi32(q8));
}

/* the 32 weights of a block from its values qs, 8 per vector, in order */
static inline __attribute__((always_inline)) void dequant_block(int fmt, const uint8_t *b,
                                                                __m256 vd, __m256 vc,
                                                                __m256 v[4]) {
    __m128i q0, q1;
    int is_signed = is_q8(fmt);
    if (is_signed) {
        q0 = _mm_loadu_si128((const __m128i *)b);
        q1 = _mm_loadu_si128((const __m128i *)(b + 16));
    } else {
        const __m128i qs = _mm_loadu_si128((const __m128i *)b);
        const __m128i mask = _mm_set1_epi8(0x0F);
        q0 = _mm_and_si128(qs, mask);
        q1 = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
    }
    v[0] = _mm256_fmadd_ps(widen8(q0, is_signed), vd, vc);
    v[1] = _mm256_fmadd_ps(widen8(_mm_srli_si128(q0, 8), is_signed), vd, vc);
    v[2] = _mm256_fmadd_ps(widen8(q1, is_signed), vd, vc);
    v[3] = _mm256_fmadd_ps(widen8(_mm_srli_si128(q1, 8), is_signed), vd, vc);
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __attribute__((always_inline)) void dot_rows(int fmt, int R, const uint8_t *w,
                                                           int64_t nblocks, int64_t gb,
                                                           const float *x, int64_t xs, float bias,
                                                           float *y, int64_t ys) {
    const int64_t step = GROUP_BLOCKS(fmt, gb);
    __m256 acc_a[ROWS_MAX], acc_b[ROWS_MAX];
    for (int r = 0; r < R; r++) {
        acc_a[r] = _mm256_setzero_ps();
        acc_b[r] = _mm256_setzero_ps();
    }
#define ACC_BLOCK(i, vd, vc)                                                                     \
    do {                                                                                         \
        __m256 v[4];                                                                             \
        dequant_block(fmt, block_values(fmt, w, i), vd, vc, v);                                  \
        const float *xb = x + (i) * QK;                                                          \
        for (int r = 0; r < R; r++) {                                                            \
            const float *xr = xb + r * xs;                                                       \
            acc_a[r] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xr), acc_a[r]);                     \
            acc_b[r] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xr + 8), acc_b[r]);                 \
            acc_a[r] = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xr + 16), acc_a[r]);                \
            acc_b[r] = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xr + 24), acc_b[r]);                \
        }                                                                                        \
    } while (0)
    if (step == 1) { /* GGUF's formats: one loop over blocks, as before groups existed */
        for (int64_t i = 0; i < nblocks; i++) {
            float d, c;
            group_scale(fmt, w, nblocks, i, &d, &c);
            ACC_BLOCK(i, _mm256_set1_ps(d), _mm256_set1_ps(c));
        }
    } else {
        for (int64_t i0 = 0, g = 0; i0 < nblocks; i0 += step, g++) {
            float d, c;
            group_scale(fmt, w, nblocks, g, &d, &c);
            const __m256 vd = _mm256_set1_ps(d);
            const __m256 vc = _mm256_set1_ps(c);
            const int64_t i1 = i0 + step < nblocks ? i0 + step : nblocks;
            for (int64_t i = i0; i < i1; i++) ACC_BLOCK(i, vd, vc);
        }
    }
#undef ACC_BLOCK
    for (int r = 0; r < R; r++) {
        y[r * ys] = hsum256(_mm256_add_ps(acc_a[r], acc_b[r])) + bias;
    }
}

#else
/* ------------------------------------------------------------------ portable C */
#define ISA_NAME "scalar"
#define ROWS_MAX 4

/* the 32 weights of a block from its values qs */
static inline void dequant_block(int fmt, const uint8_t *qs, float d, float c, float v[QK]) {
    if (is_q8(fmt)) {
        for (int j = 0; j < QK; j++) v[j] = (float)(int8_t)qs[j] * d;
    } else {
        for (int j = 0; j < QK / 2; j++) {
            v[j] = __builtin_fmaf((float)(qs[j] & 0x0F), d, c);
            v[j + QK / 2] = __builtin_fmaf((float)(qs[j] >> 4), d, c);
        }
    }
}

static inline void dot_rows(int fmt, int R, const uint8_t *w, int64_t nblocks, int64_t gb,
                            const float *x, int64_t xs, float bias, float *y, int64_t ys) {
    const int64_t step = GROUP_BLOCKS(fmt, gb);
    float acc[ROWS_MAX][8];
    for (int r = 0; r < R; r++)
        for (int l = 0; l < 8; l++) acc[r][l] = 0.0f;
    for (int64_t i0 = 0, g = 0; i0 < nblocks; i0 += step, g++) {
        float d, c;
        group_scale(fmt, w, nblocks, g, &d, &c);
        const int64_t i1 = i0 + step < nblocks ? i0 + step : nblocks;
        for (int64_t i = i0; i < i1; i++) {
            float v[QK];
            dequant_block(fmt, block_values(fmt, w, i), d, c, v);
            const float *xb = x + i * QK;
            for (int r = 0; r < R; r++)
                for (int j = 0; j < QK; j++)
                    acc[r][j % 8] = __builtin_fmaf(v[j], xb[r * xs + j], acc[r][j % 8]);
        }
    }
    for (int r = 0; r < R; r++) {
        float s = 0.0f;
        for (int l = 0; l < 8; l++) s += acc[r][l];
        y[r * ys] = s + bias;
    }
}
#endif

/* rows [r0, r0 + R) against weight rows [o0, o1): the R rows of x stay in L1 across the tile */
#define GROUP(R)                                                                                 \
    for (int64_t o = o0; o < o1; o++)                                                            \
        dot_rows(fmt, R, w + o * wstride, nb, gb, x + r0 * xs, xs, bias ? bias[o] : 0.0f,         \
                 y + r0 * ys + o, ys)

/* one tile of weight rows against all rows of x, in groups of ROWS_MAX (the last group smaller) */
static inline __attribute__((always_inline)) void tile_rows(int fmt, const uint8_t *w,
                                                            int64_t wstride, int64_t o0,
                                                            int64_t o1, int64_t nb, int64_t gb,
                                                            const float *x, int64_t rows,
                                                            int64_t xs, const float *bias,
                                                            float *y, int64_t ys) {
    int64_t r0 = 0;
    for (; r0 + ROWS_MAX <= rows; r0 += ROWS_MAX) GROUP(ROWS_MAX);
    switch (rows - r0) {
#if ROWS_MAX > 4
        case 7: GROUP(7); break;
        case 6: GROUP(6); break;
        case 5: GROUP(5); break;
        case 4: GROUP(4); break;
#endif
        case 3: GROUP(3); break;
        case 2: GROUP(2); break;
        case 1: GROUP(1); break;
        default: break;
    }
}

/* the format is a compile-time constant inside each copy, so the branches on it fold away */
#define TILE_FN(name, FMT)                                                                        \
    static void name(const uint8_t *w, int64_t wstride, int64_t o0, int64_t o1, int64_t nb,      \
                     int64_t gb, const float *x, int64_t rows, int64_t xs, const float *bias,    \
                     float *y, int64_t ys) {                                                     \
        tile_rows(FMT, w, wstride, o0, o1, nb, gb, x, rows, xs, bias, y, ys);                    \
    }
TILE_FN(tile_q4_0, FMT_Q4_0)
TILE_FN(tile_q4_1, FMT_Q4_1)
TILE_FN(tile_q8_0, FMT_Q8_0)
TILE_FN(tile_q4_1g, FMT_Q4_1G)
TILE_FN(tile_q8_0g, FMT_Q8_0G)

const char *splitlm_quant_isa(void) { return ISA_NAME; }

/* y[r][o] = sum_k x[r][k] * W[o][k] + bias[o] for r < rows, o < out.
 *
 * w: out rows of nblocks blocks each, wstride bytes apart (a grouped format's row: the values of
 * its nblocks blocks, then one scale per group of group_blocks blocks, the last group possibly
 * shorter; group_blocks is ignored for GGUF's formats); x: rows of nblocks * 32 floats, xs floats
 * apart; bias: out floats or NULL; y: rows of out floats, ys apart. Returns 0, or -1 for an
 * unknown format or a group of no blocks.
 */
int splitlm_quant_linear(int fmt, const uint8_t *w, int64_t wstride, int64_t out, int64_t nblocks,
                         int64_t group_blocks, const float *x, int64_t rows, int64_t xs,
                         const float *bias, float *y, int64_t ys, int nthreads) {
    void (*tile)(const uint8_t *, int64_t, int64_t, int64_t, int64_t, int64_t, const float *,
                 int64_t, int64_t, const float *, float *, int64_t);
    switch (fmt) {
        case FMT_Q4_0: tile = tile_q4_0; break;
        case FMT_Q4_1: tile = tile_q4_1; break;
        case FMT_Q8_0: tile = tile_q8_0; break;
        case FMT_Q4_1G: tile = tile_q4_1g; break;
        case FMT_Q8_0G: tile = tile_q8_0g; break;
        default: return -1;
    }
    if (group_blocks < 1) return -1;
    const int64_t ntiles = (out + TILE - 1) / TILE;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t t = 0; t < ntiles; t++) {
        const int64_t o0 = t * TILE;
        const int64_t o1 = o0 + TILE < out ? o0 + TILE : out;
        tile(w, wstride, o0, o1, nblocks, group_blocks, x, rows, xs, bias, y, ys);
    }
    return 0;
}

/* The fixed arguments of one layer, built once by the caller: a call then passes five values
 * (ctypes converts each argument at a cost of about 0.15 us; a layer runs ~7 times a token). */
struct splitlm_quant_layer {
    int64_t fmt;
    const uint8_t *w;
    int64_t wstride;
    int64_t out;
    int64_t nblocks;
    const float *bias;
    int64_t group_blocks;
};

/* splitlm_quant_linear for contiguous x (rows of nblocks * 32 floats) and y (rows of out) */
int splitlm_quant_layer_run(const struct splitlm_quant_layer *l, const float *x, int64_t rows,
                            float *y, int nthreads) {
    return splitlm_quant_linear((int)l->fmt, l->w, l->wstride, l->out, l->nblocks,
                                l->group_blocks, x, rows, l->nblocks * QK, l->bias, y, l->out,
                                nthreads);
}
