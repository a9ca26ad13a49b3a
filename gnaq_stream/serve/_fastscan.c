/* Exact top-K over 2-bit packed item rows: an 8-bit fast scan bounds every item's score, and only
 * the items whose bound reaches the running K-th best are scored exactly.
 *
 * Scores. With a node's 2-bit code c = lo + 2 hi, its level is exactly
 *     L(c) = L0 + (L1 - L0) lo + (L2 - L0) hi + (L3 - L2 - L1 + L0) lo hi,
 * so an item's score for a user vector u is
 *     L0 U + (L1 - L0) A + (L2 - L0) B + (L3 - L2 - L1 + L0) C,
 * U = sum(u), A = u . lo, B = u . hi, C = u . (lo & hi): three masked sums of u. Over a group of
 * four dimensions a masked sum is one of 16 values (a table per group). The tables are quantized
 * to bytes with one step `delta` for all groups, so a masked sum is known to within
 * groups * delta / 2.
 *
 * Kernels, all in one build, chosen at run time (`kernel()`): "avx512" looks up 64 items per
 * vpshufb, "avx2" 32 (a block as two halves); "portable" is plain C, one lookup per group and item
 * in a 256-entry table holding the group's A, B and C at once. All compute the same integer sums,
 * hence the same bounds and the same answer.
 *
 * Block layout (64 items per block; what `set_rows` writes and `top_k` reads), with G = dim / 4
 * groups and w the level width in bytes:
 *     codes      G x 64 bytes: byte [g][j] = item j's lo bits of group g (low nibble), hi bits above
 *     levels     4 x 4 x 16 x w bytes: [q][k][m] = level k of item (q / 2) * 32 + 2 m + q % 2,
 *                the order in which 16-bit accumulators come out (even, then odd bytes)
 * Per item that is dim / 4 + 4 w bytes: exactly the packed row, rearranged.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64

static int64_t block_bytes(int dim, int level_width) { return 16 * (int64_t)dim + 256 * (int64_t)level_width; }

/* position of item j (0..63) in the level area: (q, m) */
static inline int level_q(int j) { return 2 * (j >> 5) + (j & 1); }
static inline int level_m(int j) { return (j & 31) >> 1; }
static inline int item_of(int q, int m) { return (q >> 1) * 32 + 2 * m + (q & 1); }

/* bits 0, 2, 4, 6 of a byte -> bits 0..3 */
static inline uint8_t compress4(unsigned x) {
    return (uint8_t)((x & 1) | (x >> 1 & 2) | (x >> 2 & 4) | (x >> 3 & 8));
}

/* row byte g holds group g's four codes, code d % 4 at bits 2 (d % 4) */
static void set_row(uint8_t *blocks, int dim, int level_width, int64_t index, const uint8_t *row) {
    const int groups = dim / 4;
    uint8_t *blk = blocks + (index / BLOCK) * block_bytes(dim, level_width);
    const int j = (int)(index % BLOCK);
    for (int g = 0; g < groups; g++)
        blk[64 * g + j] = (uint8_t)(compress4(row[g] & 0x55) | compress4(row[g] >> 1 & 0x55) << 4);
    uint8_t *levels = blk + 16 * dim;
    for (int k = 0; k < 4; k++)
        memcpy(levels + ((level_q(j) * 4 + k) * 16 + level_m(j)) * level_width, row + dim / 4 + k * level_width,
               level_width);
}

/* level k of item (q, m) of a block's level area, decoded through `lut` (fp32 is stored as is) */
static inline float level_at(const uint8_t *area, int q, int k, int m, int level_width, const float *lut) {
    const uint8_t *v = area + ((q * 4 + k) * 16 + m) * level_width;
    float f;
    if (level_width == 4) {
        memcpy(&f, v, 4);
        return f;
    }
    return lut[level_width == 1 ? v[0] : (v[0] | v[1] << 8)];
}

/* the exact score of one item, dimension by dimension */
static float exact_score(const uint8_t *blocks, int dim, int level_width, int64_t index, const float *u,
                         const float *lut) {
    const uint8_t *blk = blocks + (index / BLOCK) * block_bytes(dim, level_width);
    const int j = (int)(index % BLOCK);
    float level[4];
    for (int k = 0; k < 4; k++)
        level[k] = level_at(blk + 16 * dim, level_q(j), k, level_m(j), level_width, lut);
    float s = 0.0f;
    for (int d = 0; d < dim; d++) {
        const unsigned x = blk[64 * (d / 4) + j] >> d % 4;
        s += u[d] * level[(x & 1) + 2 * (x >> 4 & 1)];
    }
    return s;
}

static int is_excluded(const int64_t *exclude, int64_t n_exclude, int64_t index) {
    int64_t lo = 0, hi = n_exclude;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (exclude[mid] < index)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n_exclude && exclude[lo] == index;
}

/* the k best lower bounds seen so far: a min-heap; its root is the running threshold */
typedef struct {
    float *v;
    int size, k;
} Heap;

static void heap_offer(Heap *h, float x) {
    int i;
    if (h->size < h->k) {
        i = h->size++;
        while (i > 0 && h->v[(i - 1) / 2] > x) {
            h->v[i] = h->v[(i - 1) / 2];
            i = (i - 1) / 2;
        }
        h->v[i] = x;
        return;
    }
    if (x <= h->v[0])
        return;
    i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= h->k)
            break;
        if (c + 1 < h->k && h->v[c + 1] < h->v[c])
            c++;
        if (h->v[c] >= x)
            break;
        h->v[i] = h->v[c];
        i = c;
    }
    h->v[i] = x;
}

static float heap_threshold(const Heap *h) { return h->size < h->k ? -INFINITY : h->v[0]; }

typedef struct {
    int64_t *index;
    float *upper;
    int64_t size, capacity;
} Candidates;

static int candidates_push(Candidates *c, int64_t index, float upper) {
    if (c->size == c->capacity) {
        int64_t cap = c->capacity ? 2 * c->capacity : 1024;
        int64_t *ni = realloc(c->index, cap * sizeof(int64_t));
        if (!ni)
            return -1;
        c->index = ni;
        float *nu = realloc(c->upper, cap * sizeof(float));
        if (!nu)
            return -1;
        c->upper = nu;
        c->capacity = cap;
    }
    c->index[c->size] = index;
    c->upper[c->size++] = upper;
    return 0;
}

/* keep the k best (score, index) pairs sorted, best first; ties rank the lower index first */
static int best_insert(int64_t *idx, float *val, int count, int k, int64_t index, float score) {
    if (count == k && !(score > val[k - 1] || (score == val[k - 1] && index < idx[k - 1])))
        return count;
    int j = count < k ? count++ : k - 1;
    while (j > 0 && (val[j - 1] < score || (val[j - 1] == score && idx[j - 1] > index))) {
        val[j] = val[j - 1];
        idx[j] = idx[j - 1];
        j--;
    }
    val[j] = score;
    idx[j] = index;
    return count;
}

/* One request's scan: what every kernel reads (the byte tables and the constants that turn their
   sums into bounds) and what they all feed (candidates and the running threshold). */
typedef struct {
    const uint8_t *blocks;
    int64_t n, n_exclude, stride;
    int dim, groups, level_width;
    const float *u, *lut;
    const int64_t *exclude;
    uint8_t bytes[64][16] __attribute__((aligned(64))); /* [group][4 mask bits]: quantized masked sums */
    float step, lowest, total, error;                    /* byte step, sum of group minima, sum(u), sum error */
    Heap heap;
    Candidates cand;
    float threshold;
} Scan;

static void quantize_tables(Scan *s) {
    const int groups = s->groups;
    const float *u = s->u;
    float table[64][16], minima[64], widest = 0.0f, magnitude = 0.0f;
    s->lowest = s->total = 0.0f;
    for (int d = 0; d < s->dim; d++) {
        s->total += u[d];
        magnitude += fabsf(u[d]);
    }
    for (int g = 0; g < groups; g++) {
        float lo = 0.0f, hi = 0.0f;
        for (int v = 0; v < 16; v++) {
            float sum = 0.0f;
            for (int t = 0; t < 4; t++)
                if (v >> t & 1)
                    sum += u[4 * g + t];
            table[g][v] = sum;
            lo = sum < lo ? sum : lo;
            hi = sum > hi ? sum : hi;
        }
        minima[g] = lo;
        s->lowest += lo;
        widest = hi - lo > widest ? hi - lo : widest;
    }
    s->step = widest > 0.0f ? widest / 255.0f : 1.0f;
    for (int g = 0; g < groups; g++)
        for (int v = 0; v < 16; v++) {
            float q = nearbyintf((table[g][v] - minima[g]) / s->step);
            s->bytes[g][v] = (uint8_t)(q < 0.0f ? 0.0f : q > 255.0f ? 255.0f : q);
        }
    /* each group's byte is within step / 2 of its table value (plus float rounding of the sums) */
    s->error = groups * s->step * 0.5f * 1.001f + 1e-6f * magnitude;
}

/* Float rounding of a bound's own arithmetic, relative to the score: far above float32's 6e-8 per
   operation. A kernel's bounds are score +- (weight * error + |score| * ROUNDING). */
#define ROUNDING 1e-6f

/* An item whose upper bound reaches the threshold is a candidate; its lower bound may raise it. */
static int offer(Scan *s, int64_t index, float upper, float lower) {
    if (index >= s->n || upper < s->threshold || is_excluded(s->exclude, s->n_exclude, index))
        return 0;
    if (candidates_push(&s->cand, index, upper) < 0)
        return -1;
    heap_offer(&s->heap, lower);
    s->threshold = heap_threshold(&s->heap);
    return 0;
}

/* byte i of a uint64 read from memory */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define BYTE_SHIFT(i) (56 - 8 * (i))
#else
#define BYTE_SHIFT(i) (8 * (i))
#endif

/* The portable kernel, plain C: one lookup per group and item. A code byte indexes the group's
   packed[g][byte] = A | B << 16 | C << 32, its three quantized masked sums side by side (a total
   is at most 64 * 255, so the 16-bit fields never carry into each other). The bounds are then
   computed for a whole block in level-area order, a loop the compiler vectorises. */
static int scan_portable(Scan *s) {
    const int groups = s->groups, width = s->level_width;
    uint64_t(*packed)[256] = malloc(groups * sizeof *packed);
    if (!packed)
        return -1;
    for (int g = 0; g < groups; g++)
        for (int x = 0; x < 256; x++)
            packed[g][x] = s->bytes[g][x & 15] | (uint64_t)s->bytes[g][x >> 4] << 16
                           | (uint64_t)s->bytes[g][x & x >> 4] << 32;
    const int64_t n_blocks = (s->n + BLOCK - 1) / BLOCK;
    for (int64_t blk_i = 0; blk_i < n_blocks; blk_i++) {
        const uint8_t *blk = s->blocks + blk_i * s->stride, *area = blk + 64 * groups;
        int32_t a[64], b[64], c[64];            /* [t]: sums of item (q, m) = (t / 16, t % 16) */
        float level[256], upper[64], lower[64]; /* level: the area decoded */
        for (int j0 = 0; j0 < BLOCK; j0 += 8) {
            uint64_t acc[8] = {0};
            for (int g = 0; g < groups; g++) {
                uint64_t x; /* the code bytes of items j0..j0+7: one load, not eight */
                memcpy(&x, blk + 64 * g + j0, 8);
                for (int i = 0; i < 8; i++)
                    acc[i] += packed[g][x >> BYTE_SHIFT(i) & 255];
            }
            for (int i = 0; i < 8; i++) {
                const int t = 16 * level_q(j0 + i) + level_m(j0 + i);
                a[t] = (int32_t)(acc[i] & 0xFFFF);
                b[t] = (int32_t)(acc[i] >> 16 & 0xFFFF);
                c[t] = (int32_t)(acc[i] >> 32);
            }
        }
        if (width == 4)
            memcpy(level, area, sizeof level);
        else
            for (int i = 0; i < 256; i++)
                level[i] = s->lut[width == 1 ? area[i] : (area[2 * i] | area[2 * i + 1] << 8)];
        int any = 0;
        for (int q = 0; q < 4; q++)
            for (int m = 0; m < 16; m++) {
                const float *l = level + 64 * q + m; /* levels k of item (q, m) are l[16 k] */
                const int t = 16 * q + m;
                const float wa = l[16] - l[0], wb = l[32] - l[0], wc = (l[48] + l[0]) - (l[16] + l[32]);
                const float sa = (float)a[t] * s->step + s->lowest, sb = (float)b[t] * s->step + s->lowest;
                const float sc = (float)c[t] * s->step + s->lowest;
                const float score = l[0] * s->total + wa * sa + wb * sb + wc * sc;
                const float e = (fabsf(wa) + fabsf(wb) + fabsf(wc)) * s->error + fabsf(score) * ROUNDING;
                upper[t] = score + e;
                lower[t] = score - e;
                any |= upper[t] >= s->threshold;
            }
        for (int t = 0; any && t < 64; t++)
            if (upper[t] >= s->threshold
                && offer(s, blk_i * BLOCK + item_of(t / 16, t % 16), upper[t], lower[t]) < 0) {
                free(packed);
                return -1;
            }
    }
    free(packed);
    return 0;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86 1
#define AVX512 __attribute__((target("avx512f,avx512bw")))
#define AVX2 __attribute__((target("avx2,fma,f16c")))

/* Add one group's looked-up bytes r (W = 512 or 256 bits) into 16-bit accumulators: `sum` gathers
   even + 256 odd bytes (mod 2^16), `odd` the odd bytes alone, so even = sum - 256 odd. */
#define ACCUMULATE(W, r, sum, odd)                                              \
    do {                                                                        \
        sum = _mm##W##_add_epi16(sum, r);                                       \
        odd = _mm##W##_add_epi16(odd, _mm##W##_srli_epi16(r, 8));               \
    } while (0)

/* a group's code bytes -> its lo nibbles, hi nibbles and their AND, each looked up in its table */
#define LOOKUP(W, x, table, sa, oa, sb, ob, sc, oc)                                               \
    do {                                                                                          \
        __m##W##i lo = _mm##W##_and_si##W(x, nibble);                                             \
        __m##W##i hi = _mm##W##_and_si##W(_mm##W##_srli_epi16(x, 4), nibble);                     \
        ACCUMULATE(W, _mm##W##_shuffle_epi8(table, lo), sa, oa);                                  \
        ACCUMULATE(W, _mm##W##_shuffle_epi8(table, hi), sb, ob);                                  \
        ACCUMULATE(W, _mm##W##_shuffle_epi8(table, _mm##W##_and_si##W(lo, hi)), sc, oc);          \
    } while (0)

/* level k of the 16 items of row q of a block's level area, decoded from its stored dtype */
static inline AVX512 __m512 load_levels16(const uint8_t *area, int q, int k, int width) {
    const uint8_t *at = area + (q * 4 + k) * 16 * width;
    if (width == 4)
        return _mm512_loadu_ps(at);
    if (width == 2)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)at));
    /* fp8 e4m3 -> fp16 with the same bits one exponent bias lower (x 2^-8), undone below; fp16
       subnormals cover e4m3's, and the conversion instruction handles them exactly */
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)at));
    __m512i half = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7F)), 7),
                                   _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 8));
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(half)), _mm512_set1_ps(256.0f));
}

static inline AVX512 __m512 sums16(__m512i sum, __m512i odd, int q, __m512 delta, __m512 base) {
    __m512i v = (q & 1) ? odd : _mm512_sub_epi16(sum, _mm512_slli_epi16(odd, 8));
    __m256i half = q >> 1 ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(half)), delta, base);
}

static AVX512 int scan_avx512(Scan *s) {
    const int groups = s->groups;
    __m512i table[64];
    for (int g = 0; g < groups; g++)
        table[g] = _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *)s->bytes[g]));
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512 delta = _mm512_set1_ps(s->step), base = _mm512_set1_ps(s->lowest), sum_u = _mm512_set1_ps(s->total);
    const __m512 err = _mm512_set1_ps(s->error), rounding = _mm512_set1_ps(ROUNDING);
    const int64_t n_blocks = (s->n + BLOCK - 1) / BLOCK;
    for (int64_t blk_i = 0; blk_i < n_blocks; blk_i++) {
        const uint8_t *blk = s->blocks + blk_i * s->stride, *area = blk + 64 * groups;
        __m512i sa = _mm512_setzero_si512(), oa = sa, sb = sa, ob = sa, sc = sa, oc = sa;
        for (int g = 0; g < groups; g++)
            LOOKUP(512, _mm512_loadu_si512(blk + 64 * g), table[g], sa, oa, sb, ob, sc, oc);
        for (int q = 0; q < 4; q++) {
            __m512 a = sums16(sa, oa, q, delta, base), b = sums16(sb, ob, q, delta, base);
            __m512 c = sums16(sc, oc, q, delta, base);
            __m512 l0 = load_levels16(area, q, 0, s->level_width), l1 = load_levels16(area, q, 1, s->level_width);
            __m512 l2 = load_levels16(area, q, 2, s->level_width), l3 = load_levels16(area, q, 3, s->level_width);
            __m512 wa = _mm512_sub_ps(l1, l0), wb = _mm512_sub_ps(l2, l0);
            __m512 wc = _mm512_sub_ps(_mm512_add_ps(l3, l0), _mm512_add_ps(l1, l2));
            __m512 score = _mm512_fmadd_ps(wa, a, _mm512_mul_ps(l0, sum_u));
            score = _mm512_fmadd_ps(wc, c, _mm512_fmadd_ps(wb, b, score));
            __m512 weight = _mm512_add_ps(_mm512_add_ps(_mm512_abs_ps(wa), _mm512_abs_ps(wb)), _mm512_abs_ps(wc));
            __m512 e = _mm512_fmadd_ps(weight, err, _mm512_mul_ps(_mm512_abs_ps(score), rounding));
            __m512 upper = _mm512_add_ps(score, e);
            __mmask16 pass = _mm512_cmp_ps_mask(upper, _mm512_set1_ps(s->threshold), _CMP_GE_OQ);
            if (!pass)
                continue;
            float ups[16], lows[16];
            _mm512_storeu_ps(ups, upper);
            _mm512_storeu_ps(lows, _mm512_sub_ps(score, e));
            for (int m = 0; m < 16; m++)
                if (pass >> m & 1 && offer(s, blk_i * BLOCK + item_of(q, m), ups[m], lows[m]) < 0)
                    return -1;
        }
    }
    return 0;
}

/* levels k of the 8 items (q, m0..m0+7) of a block's level area (see load_levels16) */
static inline AVX2 __m256 load_levels8(const uint8_t *area, int q, int k, int m0, int width) {
    const uint8_t *at = area + ((q * 4 + k) * 16 + m0) * width;
    if (width == 4)
        return _mm256_loadu_ps((const float *)at);
    if (width == 2)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)at));
    __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)at));
    __m128i half = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7),
                                _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8));
    return _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.0f));
}

/* the sums of 8 items: 16-bit words m0..m0+7 of one parity's accumulator */
static inline AVX2 __m256 sums8(__m256i words, int m0, __m256 delta, __m256 base) {
    __m128i eight = m0 ? _mm256_extracti128_si256(words, 1) : _mm256_castsi256_si128(words);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(eight)), delta, base);
}

/* The AVX2 kernel: vpshufb works on 32 bytes, so each block is scanned as two halves of 32 items;
   half h yields rows q = 2h (even items) and 2h + 1 (odd items) of the level area. */
static AVX2 int scan_avx2(Scan *s) {
    const int groups = s->groups;
    __m256i table[64];
    for (int g = 0; g < groups; g++)
        table[g] = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)s->bytes[g]));
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256 delta = _mm256_set1_ps(s->step), base = _mm256_set1_ps(s->lowest), sum_u = _mm256_set1_ps(s->total);
    const __m256 err = _mm256_set1_ps(s->error), rounding = _mm256_set1_ps(ROUNDING);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const int64_t n_blocks = (s->n + BLOCK - 1) / BLOCK;
    for (int64_t blk_i = 0; blk_i < n_blocks; blk_i++) {
        const uint8_t *blk = s->blocks + blk_i * s->stride, *area = blk + 64 * groups;
        for (int h = 0; h < 2; h++) {
            __m256i sa = _mm256_setzero_si256(), oa = sa, sb = sa, ob = sa, sc = sa, oc = sa;
            for (int g = 0; g < groups; g++)
                LOOKUP(256, _mm256_loadu_si256((const __m256i *)(blk + 64 * g + 32 * h)), table[g], sa, oa, sb, ob,
                       sc, oc);
            for (int parity = 0; parity < 2; parity++) {
                const int q = 2 * h + parity;
                __m256i wa16 = parity ? oa : _mm256_sub_epi16(sa, _mm256_slli_epi16(oa, 8));
                __m256i wb16 = parity ? ob : _mm256_sub_epi16(sb, _mm256_slli_epi16(ob, 8));
                __m256i wc16 = parity ? oc : _mm256_sub_epi16(sc, _mm256_slli_epi16(oc, 8));
                for (int m0 = 0; m0 < 16; m0 += 8) {
                    __m256 a = sums8(wa16, m0, delta, base), b = sums8(wb16, m0, delta, base);
                    __m256 c = sums8(wc16, m0, delta, base);
                    __m256 l0 = load_levels8(area, q, 0, m0, s->level_width);
                    __m256 l1 = load_levels8(area, q, 1, m0, s->level_width);
                    __m256 l2 = load_levels8(area, q, 2, m0, s->level_width);
                    __m256 l3 = load_levels8(area, q, 3, m0, s->level_width);
                    __m256 wa = _mm256_sub_ps(l1, l0), wb = _mm256_sub_ps(l2, l0);
                    __m256 wc = _mm256_sub_ps(_mm256_add_ps(l3, l0), _mm256_add_ps(l1, l2));
                    __m256 score = _mm256_fmadd_ps(wa, a, _mm256_mul_ps(l0, sum_u));
                    score = _mm256_fmadd_ps(wc, c, _mm256_fmadd_ps(wb, b, score));
                    __m256 weight = _mm256_add_ps(_mm256_add_ps(_mm256_andnot_ps(sign, wa), _mm256_andnot_ps(sign, wb)),
                                                  _mm256_andnot_ps(sign, wc));
                    __m256 e = _mm256_fmadd_ps(weight, err, _mm256_mul_ps(_mm256_andnot_ps(sign, score), rounding));
                    __m256 upper = _mm256_add_ps(score, e);
                    int pass = _mm256_movemask_ps(_mm256_cmp_ps(upper, _mm256_set1_ps(s->threshold), _CMP_GE_OQ));
                    if (!pass)
                        continue;
                    float ups[8], lows[8];
                    _mm256_storeu_ps(ups, upper);
                    _mm256_storeu_ps(lows, _mm256_sub_ps(score, e));
                    for (int i = 0; i < 8; i++)
                        if (pass >> i & 1 && offer(s, blk_i * BLOCK + item_of(q, m0 + i), ups[i], lows[i]) < 0)
                            return -1;
                }
            }
        }
    }
    return 0;
}
#else
#define HAVE_X86 0
#endif

/* kernels, best first; what each needs of the CPU */
enum { AVX512_KERNEL, AVX2_KERNEL, PORTABLE_KERNEL, N_KERNELS };
static const char *const kernel_names[N_KERNELS] = {"avx512", "avx2", "portable"};
static const char *const kernel_needs[N_KERNELS] = {"AVX-512 F and BW", "AVX2, FMA and F16C", "nothing"};
static int supported[N_KERNELS];

static void detect_kernels(void) {
#if HAVE_X86
    __builtin_cpu_init();
    supported[AVX512_KERNEL] = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    supported[AVX2_KERNEL] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                             && __builtin_cpu_supports("f16c");
#endif
    supported[PORTABLE_KERNEL] = 1;
}

/* The best kernel this CPU runs, or the one GNAQ_FASTSCAN_KERNEL names (read at every call, so
   tests and operators can force one); -1 with a ValueError if that one cannot run here. */
static int choose_kernel(void) {
    const char *forced = getenv("GNAQ_FASTSCAN_KERNEL");
    for (int i = 0; i < N_KERNELS; i++) {
        if (forced && *forced && strcmp(forced, kernel_names[i]))
            continue;
        if (supported[i])
            return i;
        if (forced && *forced) {
            PyErr_Format(PyExc_ValueError, "GNAQ_FASTSCAN_KERNEL=%s needs %s, which this CPU lacks", forced,
                         kernel_needs[i]);
            return -1;
        }
    }
    PyErr_Format(PyExc_ValueError, "GNAQ_FASTSCAN_KERNEL=%s: not one of avx512, avx2, portable", forced);
    return -1;
}

/* One request: the byte tables, one kernel's scan, the exact rerank; the count, or -1 (no memory). */
static int top_k(int kernel, Scan *s, int k, int64_t *out_idx, float *out_scores) {
    quantize_tables(s);
    s->heap = (Heap){malloc(k * sizeof(float)), 0, k};
    s->cand = (Candidates){NULL, NULL, 0, 0};
    s->threshold = -INFINITY;
    int count = -1;
    if (!s->heap.v)
        return -1;
#if HAVE_X86
    int scanned = kernel == AVX512_KERNEL ? scan_avx512(s) : kernel == AVX2_KERNEL ? scan_avx2(s) : scan_portable(s);
#else
    int scanned = scan_portable(s);
#endif
    if (scanned == 0) {
        /* second pass: exact scores of the candidates that can still make the top k */
        count = 0;
        for (int64_t c = 0; c < s->cand.size; c++)
            if (s->cand.upper[c] >= s->threshold)
                count = best_insert(out_idx, out_scores, count, k, s->cand.index[c],
                                    exact_score(s->blocks, s->dim, s->level_width, s->cand.index[c], s->u, s->lut));
    }
    free(s->heap.v);
    free(s->cand.index);
    free(s->cand.upper);
    return count;
}

static const char *check_shape(int dim, int level_width) {
    if (dim < 4 || dim > 256 || dim % 4)
        return "dim must be a multiple of 4 in 4..256";
    if (level_width != 1 && level_width != 2 && level_width != 4)
        return "level width must be 1, 2 or 4 bytes";
    return NULL;
}

static PyObject *py_set_rows(PyObject *self, PyObject *args) {
    Py_buffer blocks, indices, rows;
    int dim, level_width;
    if (!PyArg_ParseTuple(args, "w*iiy*y*", &blocks, &dim, &level_width, &indices, &rows))
        return NULL;
    const char *error = check_shape(dim, level_width);
    const int64_t width = dim / 4 + 4 * level_width, n = indices.len / (Py_ssize_t)sizeof(int64_t);
    const int64_t capacity = error ? 0 : blocks.len / block_bytes(dim, level_width) * BLOCK;
    if (!error && (rows.len != n * width || indices.len % sizeof(int64_t)))
        error = "rows must be one packed 2-bit row per index";
    for (int64_t i = 0; !error && i < n; i++)
        if (((const int64_t *)indices.buf)[i] < 0 || ((const int64_t *)indices.buf)[i] >= capacity)
            error = "row index outside the blocks";
    if (!error)
        for (int64_t i = 0; i < n; i++)
            set_row(blocks.buf, dim, level_width, ((const int64_t *)indices.buf)[i],
                    (const uint8_t *)rows.buf + i * width);
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&indices);
    PyBuffer_Release(&rows);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_top_k(PyObject *self, PyObject *args) {
    Py_buffer blocks, user, exclude, lut, out_idx, out_scores;
    Py_ssize_t n;
    int dim, level_width, k;
    const int kernel = choose_kernel();
    if (kernel < 0)
        return NULL;
    if (!PyArg_ParseTuple(args, "y*niiy*iy*y*w*w*", &blocks, &n, &dim, &level_width, &user, &k, &exclude, &lut,
                          &out_idx, &out_scores))
        return NULL;
    const char *error = check_shape(dim, level_width);
    if (!error && (n < 0 || blocks.len < (n + BLOCK - 1) / BLOCK * block_bytes(dim, level_width)))
        error = "blocks hold fewer than n items";
    else if (!error && user.len != (Py_ssize_t)(dim * sizeof(float)))
        error = "user vector does not match dim";
    else if (!error && (k < 1 || out_idx.len < (Py_ssize_t)(k * sizeof(int64_t))
                        || out_scores.len < (Py_ssize_t)(k * sizeof(float))))
        error = "k must be >= 1 with room for k results";
    else if (!error && level_width < 4 && lut.len != (Py_ssize_t)(sizeof(float) << (8 * level_width)))
        error = "level lookup table does not match the level width";
    int count = 0;
    if (!error) {
        Scan scan = {.blocks = blocks.buf, .n = n, .n_exclude = exclude.len / (Py_ssize_t)sizeof(int64_t),
                     .stride = block_bytes(dim, level_width), .dim = dim, .groups = dim / 4,
                     .level_width = level_width, .u = user.buf, .lut = lut.buf, .exclude = exclude.buf};
        Py_BEGIN_ALLOW_THREADS
        count = top_k(kernel, &scan, k, out_idx.buf, out_scores.buf);
        Py_END_ALLOW_THREADS
        if (count < 0)
            error = "out of memory";
    }
    PyBuffer_Release(&blocks);
    PyBuffer_Release(&user);
    PyBuffer_Release(&exclude);
    PyBuffer_Release(&lut);
    PyBuffer_Release(&out_idx);
    PyBuffer_Release(&out_scores);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    return PyLong_FromLong(count);
}

static PyObject *py_kernel(PyObject *self, PyObject *unused) {
    const int kernel = choose_kernel();
    return kernel < 0 ? NULL : PyUnicode_FromString(kernel_names[kernel]);
}

static PyMethodDef methods[] = {
    {"set_rows", py_set_rows, METH_VARARGS,
     "set_rows(blocks, dim, level_width, indices, rows): write packed 2-bit rows into the block layout"},
    {"top_k", py_top_k, METH_VARARGS,
     "top_k(blocks, n, dim, level_width, user, k, exclude, lut, out_idx, out_scores) -> count: exact top-k "
     "of the first n items, `exclude` a sorted int64 array, with the kernel `kernel()` names"},
    {"kernel", py_kernel, METH_NOARGS,
     "kernel() -> the kernel top_k runs now: $GNAQ_FASTSCAN_KERNEL if set (ValueError if this CPU cannot run "
     "it), else the best of KERNELS"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastscan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastscan(void) {
    detect_kernels();
    int count = 0;
    for (int i = 0; i < N_KERNELS; i++)
        count += supported[i];
    PyObject *m = PyModule_Create(&module), *names = PyTuple_New(count);
    for (int i = 0, at = 0; names && i < N_KERNELS; i++)
        if (supported[i]) {
            PyObject *name = PyUnicode_FromString(kernel_names[i]);
            if (!name) {
                Py_CLEAR(names);
                break;
            }
            PyTuple_SET_ITEM(names, at++, name);
        }
    if (!m || !names || PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0
        || PyModule_AddObject(m, "KERNELS", names) < 0) {
        Py_XDECREF(names);
        Py_XDECREF(m);
        return NULL;
    }
    return m;
}
