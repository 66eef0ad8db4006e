/* y = x @ W^T + b with W kept in GGUF's block formats Q4_0, Q4_1 and Q8_0 (32 weights a block).
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
 * A weight is q * d + c with q the stored integer, d the block's scale and c = -8d (Q4_0), m
 * (Q4_1) or 0 (Q8_0). One fused multiply-add gives GGUF's dequantised value bit for bit: q * d is
 * exact in float32 (an 11-bit mantissa times at most 8 bits), so the only rounding is the add,
 * as in gguf.quants.dequantize.
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

/* bytes of one block per format, as GGUF writes them */
static const int64_t BLOCK_BYTES[3] = {18, 20, 34};

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

/* scale d and offset c of a block */
static inline void block_scale(int fmt, const uint8_t *b, float *d, float *c) {
    *d = half_to_float(load_u16(b));
    if (fmt == FMT_Q4_0) {
        *c = -8.0f * *d;
    } else if (fmt == FMT_Q4_1) {
        *c = half_to_float(load_u16(b + 2));
    } else {
        *c = 0.0f;
    }
}

#if defined(__AVX512F__)
/* ------------------------------------------------------------------ AVX-512: 16 lanes */
#define ISA_NAME "avx512"
#define ROWS_MAX 8

/* the 32 weights of a block: elements 0..15 in *lo, 16..31 in *hi */
static inline __attribute__((always_inline)) void dequant_block(int fmt, const uint8_t *b,
                                                                __m512 *lo, __m512 *hi) {
    float d, c;
    block_scale(fmt, b, &d, &c);
    const __m512 vd = _mm512_set1_ps(d);
    if (fmt == FMT_Q8_0) {
        const __m128i q0 = _mm_loadu_si128((const __m128i *)(b + 2));
        const __m128i q1 = _mm_loadu_si128((const __m128i *)(b + 18));
        *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), vd);
        *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), vd);
    } else {
        /* the 16 values a nibble can stand for, then one lookup per weight: vpermps reads only
         * the low 4 bits of each index, so the nibbles need no masking */
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 table = _mm512_fmadd_ps(iota, vd, _mm512_set1_ps(c));
        const __m128i qs = _mm_loadu_si128((const __m128i *)(b + (fmt == FMT_Q4_0 ? 2 : 4)));
        *lo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(qs), table);
        *hi = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_srli_epi16(qs, 4)), table);
    }
}

/* R rows of x against one weight row; R is a constant after inlining */
static inline __attribute__((always_inline)) void dot_rows(int fmt, int R, const uint8_t *w,
                                                           int64_t nblocks, const float *x,
                                                           int64_t xs, float bias, float *y,
                                                           int64_t ys) {
    const int64_t bb = BLOCK_BYTES[fmt];
    __m512 acc_lo[ROWS_MAX], acc_hi[ROWS_MAX];
    for (int r = 0; r < R; r++) {
        acc_lo[r] = _mm512_setzero_ps();
        acc_hi[r] = _mm512_setzero_ps();
    }
    for (int64_t i = 0; i < nblocks; i++) {
        __m512 lo, hi;
        dequant_block(fmt, w + i * bb, &lo, &hi);
        const float *xb = x + i * QK;
        for (int r = 0; r < R; r++) {
            acc_lo[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb + r * xs), acc_lo[r]);
            acc_hi[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + r * xs + 16), acc_hi[r]);
        }
    }
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

/* the 32 weights of a block, 8 per vector, in order */
static inline __attribute__((always_inline)) void dequant_block(int fmt, const uint8_t *b,
                                                                __m256 v[4]) {
    float d, c;
    block_scale(fmt, b, &d, &c);
    const __m256 vd = _mm256_set1_ps(d);
    const __m256 vc = _mm256_set1_ps(c);
    __m128i q0, q1;
    int is_signed = fmt == FMT_Q8_0;
    if (is_signed) {
        q0 = _mm_loadu_si128((const __m128i *)(b + 2));
        q1 = _mm_loadu_si128((const __m128i *)(b + 18));
    } else {
        const __m128i qs = _mm_loadu_si128((const __m128i *)(b + (fmt == FMT_Q4_0 ? 2 : 4)));
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
                                                           int64_t nblocks, const float *x,
                                                           int64_t xs, float bias, float *y,
                                                           int64_t ys) {
    const int64_t bb = BLOCK_BYTES[fmt];
    __m256 acc_a[ROWS_MAX], acc_b[ROWS_MAX];
    for (int r = 0; r < R; r++) {
        acc_a[r] = _mm256_setzero_ps();
        acc_b[r] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < nblocks; i++) {
        __m256 v[4];
        dequant_block(fmt, w + i * bb, v);
        const float *xb = x + i * QK;
        for (int r = 0; r < R; r++) {
            const float *xr = xb + r * xs;
            acc_a[r] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xr), acc_a[r]);
            acc_b[r] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xr + 8), acc_b[r]);
            acc_a[r] = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xr + 16), acc_a[r]);
            acc_b[r] = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xr + 24), acc_b[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        y[r * ys] = hsum256(_mm256_add_ps(acc_a[r], acc_b[r])) + bias;
    }
}

#else
/* ------------------------------------------------------------------ portable C */
#define ISA_NAME "scalar"
#define ROWS_MAX 4

static inline void dequant_block(int fmt, const uint8_t *b, float v[QK]) {
    float d, c;
    block_scale(fmt, b, &d, &c);
    if (fmt == FMT_Q8_0) {
        for (int j = 0; j < QK; j++) v[j] = (float)(int8_t)b[2 + j] * d;
    } else {
        const uint8_t *qs = b + (fmt == FMT_Q4_0 ? 2 : 4);
        for (int j = 0; j < QK / 2; j++) {
            v[j] = __builtin_fmaf((float)(qs[j] & 0x0F), d, c);
            v[j + QK / 2] = __builtin_fmaf((float)(qs[j] >> 4), d, c);
        }
    }
}

static inline void dot_rows(int fmt, int R, const uint8_t *w, int64_t nblocks, const float *x,
                            int64_t xs, float bias, float *y, int64_t ys) {
    const int64_t bb = BLOCK_BYTES[fmt];
    float acc[ROWS_MAX][8];
    for (int r = 0; r < R; r++)
        for (int l = 0; l < 8; l++) acc[r][l] = 0.0f;
    for (int64_t i = 0; i < nblocks; i++) {
        float v[QK];
        dequant_block(fmt, w + i * bb, v);
        const float *xb = x + i * QK;
        for (int r = 0; r < R; r++)
            for (int j = 0; j < QK; j++)
                acc[r][j % 8] = __builtin_fmaf(v[j], xb[r * xs + j], acc[r][j % 8]);
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
        dot_rows(fmt, R, w + o * wstride, nb, x + r0 * xs, xs, bias ? bias[o] : 0.0f,             \
                 y + r0 * ys + o, ys)

/* one tile of weight rows against all rows of x, in groups of ROWS_MAX (the last group smaller) */
static inline __attribute__((always_inline)) void tile_rows(int fmt, const uint8_t *w,
                                                            int64_t wstride, int64_t o0,
                                                            int64_t o1, int64_t nb,
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
static void tile_q4_0(const uint8_t *w, int64_t wstride, int64_t o0, int64_t o1, int64_t nb,
                      const float *x, int64_t rows, int64_t xs, const float *bias, float *y,
                      int64_t ys) {
    tile_rows(FMT_Q4_0, w, wstride, o0, o1, nb, x, rows, xs, bias, y, ys);
}
static void tile_q4_1(const uint8_t *w, int64_t wstride, int64_t o0, int64_t o1, int64_t nb,
                      const float *x, int64_t rows, int64_t xs, const float *bias, float *y,
                      int64_t ys) {
    tile_rows(FMT_Q4_1, w, wstride, o0, o1, nb, x, rows, xs, bias, y, ys);
}
static void tile_q8_0(const uint8_t *w, int64_t wstride, int64_t o0, int64_t o1, int64_t nb,
                      const float *x, int64_t rows, int64_t xs, const float *bias, float *y,
                      int64_t ys) {
    tile_rows(FMT_Q8_0, w, wstride, o0, o1, nb, x, rows, xs, bias, y, ys);
}

const char *splitlm_quant_isa(void) { return ISA_NAME; }

/* y[r][o] = sum_k x[r][k] * W[o][k] + bias[o] for r < rows, o < out.
 *
 * w: out rows of nblocks blocks each, wstride bytes apart; x: rows of nblocks * 32 floats,
 * xs floats apart; bias: out floats or NULL; y: rows of out floats, ys apart. Returns 0, or -1
 * for an unknown format.
 */
int splitlm_quant_linear(int fmt, const uint8_t *w, int64_t wstride, int64_t out, int64_t nblocks,
                         const float *x, int64_t rows, int64_t xs, const float *bias, float *y,
                         int64_t ys, int nthreads) {
    void (*tile)(const uint8_t *, int64_t, int64_t, int64_t, int64_t, const float *, int64_t,
                 int64_t, const float *, float *, int64_t);
    switch (fmt) {
        case FMT_Q4_0: tile = tile_q4_0; break;
        case FMT_Q4_1: tile = tile_q4_1; break;
        case FMT_Q8_0: tile = tile_q8_0; break;
        default: return -1;
    }
    const int64_t ntiles = (out + TILE - 1) / TILE;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t t = 0; t < ntiles; t++) {
        const int64_t o0 = t * TILE;
        const int64_t o1 = o0 + TILE < out ? o0 + TILE : out;
        tile(w, wstride, o0, o1, nblocks, x, rows, xs, bias, y, ys);
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
};

/* splitlm_quant_linear for contiguous x (rows of nblocks * 32 floats) and y (rows of out) */
int splitlm_quant_layer_run(const struct splitlm_quant_layer *l, const float *x, int64_t rows,
                            float *y, int nthreads) {
    return splitlm_quant_linear((int)l->fmt, l->w, l->wstride, l->out, l->nblocks, x, rows,
                                l->nblocks * QK, l->bias, y, l->out, nthreads);
}
