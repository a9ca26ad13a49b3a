/* Exact top-K over 2-bit packed item rows with AVX-512: an 8-bit fast scan bounds every item's
 * score, and only the items whose bound reaches the running K-th best are scored exactly.
 *
 * Scores. With a node's 2-bit code c = lo + 2 hi, its level is exactly
 *     L(c) = L0 + (L1 - L0) lo + (L2 - L0) hi + (L3 - L2 - L1 + L0) lo hi,
 * so an item's score for a user vector u is
 *     L0 U + (L1 - L0) A + (L2 - L0) B + (L3 - L2 - L1 + L0) C,
 * U = sum(u), A = u . lo, B = u . hi, C = u . (lo & hi): three masked sums of u. Over a group of
 * four dimensions a masked sum is one of 16 values (a table per group). The tables are quantized
 * to bytes with one step `delta` for all groups, so a masked sum is known to within
 * groups * delta / 2, and vpshufb looks up 64 items per instruction.
 *
 * Block layout (64 items per block; what `set_rows` writes and `top_k` reads), with P = dim / 8
 * pairs of groups and w the level width in bytes:
 *     lo plane   P x 64 bytes: byte [p][j] = item j's lo bits of group 2p (low nibble) and 2p+1
 *     hi plane   P x 64 bytes: the same for the hi bits
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

static void set_row(uint8_t *blocks, int dim, int level_width, int64_t index, const uint8_t *row) {
    const int pairs = dim / 8;
    uint8_t *blk = blocks + (index / BLOCK) * block_bytes(dim, level_width);
    const int j = (int)(index % BLOCK);
    for (int p = 0; p < pairs; p++) {
        unsigned a = row[2 * p], b = row[2 * p + 1];
        blk[64 * p + j] = (uint8_t)(compress4(a & 0x55) | compress4(b & 0x55) << 4);
        blk[64 * (pairs + p) + j] = (uint8_t)(compress4(a >> 1 & 0x55) | compress4(b >> 1 & 0x55) << 4);
    }
    uint8_t *levels = blk + 128 * pairs;
    for (int k = 0; k < 4; k++)
        memcpy(levels + ((level_q(j) * 4 + k) * 16 + level_m(j)) * level_width, row + dim / 4 + k * level_width,
               level_width);
}

/* the exact score of one item, dimension by dimension, levels decoded through `lut` */
static float exact_score(const uint8_t *blocks, int dim, int level_width, int64_t index, const float *u,
                         const float *lut) {
    const int pairs = dim / 8;
    const uint8_t *blk = blocks + (index / BLOCK) * block_bytes(dim, level_width);
    const int j = (int)(index % BLOCK);
    const uint8_t *at = blk + 128 * pairs + (level_q(j) * 64 + level_m(j)) * level_width;
    float level[4];
    for (int k = 0; k < 4; k++) {
        const uint8_t *v = at + 16 * k * level_width;
        if (level_width == 4)
            memcpy(&level[k], v, 4);
        else
            level[k] = lut[level_width == 1 ? v[0] : (v[0] | v[1] << 8)];
    }
    float s = 0.0f;
    for (int d = 0; d < dim; d++) {
        const int g = d / 4, shift = 4 * (g & 1) + d % 4;
        const int lo = blk[64 * (g / 2) + j] >> shift & 1, hi = blk[64 * (pairs + g / 2) + j] >> shift & 1;
        s += u[d] * level[lo + 2 * hi];
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

/* Second pass: exact scores of the candidates that can still make the top k. */
static int rerank(const uint8_t *blocks, int dim, int level_width, const float *u, const float *lut, int k,
                  const Candidates *cand, float threshold, int64_t *out_idx, float *out_scores) {
    int count = 0;
    for (int64_t c = 0; c < cand->size; c++)
        if (cand->upper[c] >= threshold)
            count = best_insert(out_idx, out_scores, count, k, cand->index[c],
                                exact_score(blocks, dim, level_width, cand->index[c], u, lut));
    return count;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_KERNEL 1
#define AVX512 __attribute__((target("avx512f,avx512bw")))

/* level k of the 16 items of row q of a block's level area, decoded from its stored dtype */
static inline AVX512 __m512 load_levels(const uint8_t *area, int q, int k, int width) {
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

/* 64 lookups of one plane's two nibbles, added into 16-bit accumulators: `sum` gathers
   even + 256 odd bytes (mod 2^16), `odd` the odd bytes alone, so even = sum - 256 odd */
#define LOOKUP(x, t_lo, t_hi, sum, odd)                                                           \
    do {                                                                                          \
        __m512i r0 = _mm512_shuffle_epi8(t_lo, _mm512_and_si512(x, nibble));                      \
        __m512i r1 = _mm512_shuffle_epi8(t_hi, _mm512_and_si512(_mm512_srli_epi16(x, 4), nibble)); \
        sum = _mm512_add_epi16(sum, _mm512_add_epi16(r0, r1));                                    \
        odd = _mm512_add_epi16(odd, _mm512_add_epi16(_mm512_srli_epi16(r0, 8), _mm512_srli_epi16(r1, 8))); \
    } while (0)

static inline AVX512 __m512 sums_of(__m512i sum, __m512i odd, int q, __m512 delta, __m512 base) {
    __m512i v = (q & 1) ? odd : _mm512_sub_epi16(sum, _mm512_slli_epi16(odd, 8));
    __m256i half = q >> 1 ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(half)), delta, base);
}

static AVX512 int scan(const uint8_t *blocks, int64_t n, int dim, int level_width, const float *u, int k,
                       const int64_t *exclude, int64_t n_exclude, const float *lut, int64_t *out_idx,
                       float *out_scores) {
    const int groups = dim / 4, pairs = dim / 8;
    const int64_t stride = block_bytes(dim, level_width);
    /* per-group tables of masked sums, their minima, and one byte step for all of them */
    float table[64][16], lowest = 0.0f, widest = 0.0f, total = 0.0f, magnitude = 0.0f;
    for (int d = 0; d < dim; d++) {
        total += u[d];
        magnitude += fabsf(u[d]);
    }
    float minima[64];
    for (int g = 0; g < groups; g++) {
        float lo = 0.0f, hi = 0.0f;
        for (int v = 0; v < 16; v++) {
            float s = 0.0f;
            for (int t = 0; t < 4; t++)
                if (v >> t & 1)
                    s += u[4 * g + t];
            table[g][v] = s;
            lo = s < lo ? s : lo;
            hi = s > hi ? s : hi;
        }
        minima[g] = lo;
        lowest += lo;
        widest = hi - lo > widest ? hi - lo : widest;
    }
    const float step = widest > 0.0f ? widest / 255.0f : 1.0f;
    uint8_t bytes[64][16] __attribute__((aligned(64)));
    for (int g = 0; g < groups; g++)
        for (int v = 0; v < 16; v++) {
            float q = nearbyintf((table[g][v] - minima[g]) / step);
            bytes[g][v] = (uint8_t)(q < 0.0f ? 0.0f : q > 255.0f ? 255.0f : q);
        }
    /* each group's byte is within step / 2 of its table value (plus float rounding of the sums) */
    const float error = groups * step * 0.5f * 1.001f + 1e-6f * magnitude;
    __m512i t_lo[32], t_hi[32];
    for (int p = 0; p < pairs; p++) {
        t_lo[p] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)bytes[2 * p]));
        t_hi[p] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)bytes[2 * p + 1]));
    }
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512 delta = _mm512_set1_ps(step), base = _mm512_set1_ps(lowest), sum_u = _mm512_set1_ps(total);
    /* float rounding of the score itself, far above float32's 6e-8 per operation */
    const __m512 err = _mm512_set1_ps(error), rounding = _mm512_set1_ps(1e-6f);
    Heap heap = {malloc(k * sizeof(float)), 0, k};
    Candidates cand = {NULL, NULL, 0, 0};
    if (!heap.v)
        return -1;
    float threshold = -INFINITY;
    const int64_t n_blocks = (n + BLOCK - 1) / BLOCK;
    for (int64_t blk_i = 0; blk_i < n_blocks; blk_i++) {
        const uint8_t *blk = blocks + blk_i * stride;
        __m512i sa = _mm512_setzero_si512(), oa = sa, sb = sa, ob = sa, sc = sa, oc = sa;
        for (int p = 0; p < pairs; p++) {
            __m512i lo = _mm512_loadu_si512(blk + 64 * p), hi = _mm512_loadu_si512(blk + 64 * (pairs + p));
            __m512i both = _mm512_and_si512(lo, hi);
            LOOKUP(lo, t_lo[p], t_hi[p], sa, oa);
            LOOKUP(hi, t_lo[p], t_hi[p], sb, ob);
            LOOKUP(both, t_lo[p], t_hi[p], sc, oc);
        }
        const uint8_t *area = blk + 128 * pairs;
        for (int q = 0; q < 4; q++) {
            __m512 a = sums_of(sa, oa, q, delta, base), b = sums_of(sb, ob, q, delta, base);
            __m512 c = sums_of(sc, oc, q, delta, base);
            __m512 l0 = load_levels(area, q, 0, level_width), l1 = load_levels(area, q, 1, level_width);
            __m512 l2 = load_levels(area, q, 2, level_width), l3 = load_levels(area, q, 3, level_width);
            __m512 wa = _mm512_sub_ps(l1, l0), wb = _mm512_sub_ps(l2, l0);
            __m512 wc = _mm512_sub_ps(_mm512_add_ps(l3, l0), _mm512_add_ps(l1, l2));
            __m512 s = _mm512_fmadd_ps(wa, a, _mm512_mul_ps(l0, sum_u));
            s = _mm512_fmadd_ps(wc, c, _mm512_fmadd_ps(wb, b, s));
            __m512 weight = _mm512_add_ps(_mm512_add_ps(_mm512_abs_ps(wa), _mm512_abs_ps(wb)), _mm512_abs_ps(wc));
            __m512 e = _mm512_fmadd_ps(weight, err, _mm512_mul_ps(_mm512_abs_ps(s), rounding));
            __m512 upper = _mm512_add_ps(s, e);
            __mmask16 pass = _mm512_cmp_ps_mask(upper, _mm512_set1_ps(threshold), _CMP_GE_OQ);
            if (!pass)
                continue;
            float ups[16], lows[16];
            _mm512_storeu_ps(ups, upper);
            _mm512_storeu_ps(lows, _mm512_sub_ps(s, e));
            for (int m = 0; m < 16; m++) {
                int64_t index = blk_i * BLOCK + item_of(q, m);
                if (!(pass >> m & 1) || index >= n || ups[m] < threshold || is_excluded(exclude, n_exclude, index))
                    continue;
                if (candidates_push(&cand, index, ups[m]) < 0) {
                    free(heap.v);
                    free(cand.index);
                    free(cand.upper);
                    return -1;
                }
                heap_offer(&heap, lows[m]);
                threshold = heap_threshold(&heap);
            }
        }
    }
    int count = rerank(blocks, dim, level_width, u, lut, k, &cand, threshold, out_idx, out_scores);
    free(heap.v);
    free(cand.index);
    free(cand.upper);
    return count;
}
#else
#define HAVE_KERNEL 0
#endif

static int kernel_available(void) {
#if HAVE_KERNEL
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

static const char *check_shape(int dim, int level_width) {
    if (dim < 8 || dim > 256 || dim % 8)
        return "dim must be a multiple of 8 in 8..256";
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
    if (!PyArg_ParseTuple(args, "y*niiy*iy*y*w*w*", &blocks, &n, &dim, &level_width, &user, &k, &exclude, &lut,
                          &out_idx, &out_scores))
        return NULL;
    const char *error = check_shape(dim, level_width);
    if (!error && !kernel_available())
        error = "this CPU has no AVX-512 (F and BW)";
    else if (!error && (n < 0 || blocks.len < (n + BLOCK - 1) / BLOCK * block_bytes(dim, level_width)))
        error = "blocks hold fewer than n items";
    else if (!error && user.len != (Py_ssize_t)(dim * sizeof(float)))
        error = "user vector does not match dim";
    else if (!error && (k < 1 || out_idx.len < (Py_ssize_t)(k * sizeof(int64_t))
                        || out_scores.len < (Py_ssize_t)(k * sizeof(float))))
        error = "k must be >= 1 with room for k results";
    else if (!error && level_width < 4 && lut.len != (Py_ssize_t)(sizeof(float) << (8 * level_width)))
        error = "level lookup table does not match the level width";
    int count = 0;
#if HAVE_KERNEL
    if (!error) {
        Py_BEGIN_ALLOW_THREADS
        count = scan(blocks.buf, n, dim, level_width, user.buf, k, exclude.buf,
                     exclude.len / (Py_ssize_t)sizeof(int64_t), lut.buf, out_idx.buf, out_scores.buf);
        Py_END_ALLOW_THREADS
        if (count < 0)
            error = "out of memory";
    }
#endif
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

static PyMethodDef methods[] = {
    {"set_rows", py_set_rows, METH_VARARGS,
     "set_rows(blocks, dim, level_width, indices, rows): write packed 2-bit rows into the block layout"},
    {"top_k", py_top_k, METH_VARARGS,
     "top_k(blocks, n, dim, level_width, user, k, exclude, lut, out_idx, out_scores) -> count: exact top-k "
     "of the first n items, `exclude` a sorted int64 array"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastscan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastscan(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "available", kernel_available()) < 0
              || PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
