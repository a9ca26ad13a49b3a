/* AVX-512 scoring of 2-bit packed rows (see gnaq_stream/serve/scoring.py for the row layout).
 *
 * With a node's 2-bit code c = lo + 2 hi, its level is exactly
 *     L(c) = L0 + (L1 - L0) lo + (L2 - L0) hi + (L3 - L2 - L1 + L0) lo hi,
 * so the score of a row for a user vector u is
 *     L0 U + (L1 - L0) A + (L2 - L0) B + (L3 - L2 - L1 + L0) C,
 * U = sum(u), A = u . lo, B = u . hi, C = u . (lo & hi): three masked sums of u. Each mask is read
 * four dimensions at a time, and the sum of u over any subset of four dimensions is one of 16
 * values: a 16-float table per group of four dimensions, looked up for 16 rows at once with one
 * vpermps. Sixteen rows are scored together; nothing but the packed rows is read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_KERNEL 1
#define AVX512 __attribute__((target("avx512f")))

/* bits 0, 2, 4, 6 of every byte -> bits 0..3 of that byte (a 4-bit table index) */
static inline AVX512 __m512i compress_planes(__m512i x) {
    x = _mm512_and_si512(_mm512_or_si512(x, _mm512_srli_epi32(x, 1)), _mm512_set1_epi32(0x33333333));
    return _mm512_or_si512(x, _mm512_srli_epi32(x, 2));
}

/* level k of 16 rows, decoded from its stored dtype (1, 2 or 4 bytes) */
static inline AVX512 __m512 load_level(const uint8_t *levels, __m512i lanes, __mmask16 m, int k, int width) {
    if (width == 4)
        return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, lanes, levels + 4 * k, 1);
    __m512i word = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, lanes, levels + (k * width & ~3), 1);
    __m512i half;
    if (width == 2) {
        half = _mm512_srli_epi32(word, 16 * (k & 1));
    } else {
        /* fp8 e4m3 -> fp16 with the same bits one exponent bias lower (x 2^-8), undone below;
           fp16 subnormals cover e4m3's, and the conversion instruction handles them exactly */
        __m512i b = _mm512_srli_epi32(word, 8 * (k & 3));
        half = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7F)), 7),
                               _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 8));
    }
    __m512 value = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_and_si512(half, _mm512_set1_epi32(0xFFFF))));
    return width == 1 ? _mm512_mul_ps(value, _mm512_set1_ps(256.0f)) : value;
}

static AVX512 void score_rows(const uint8_t *rows, int64_t n, int width, int dim, int level_width,
                              const float *u, float *out) {
    float tables[64 * 16] __attribute__((aligned(64)));  /* dim <= 256: 64 groups of four */
    int groups = dim / 4, code_bytes = dim / 4;
    float total = 0.0f;
    for (int d = 0; d < dim; d++)
        total += u[d];
    for (int g = 0; g < groups; g++)
        for (int v = 0; v < 16; v++) {
            float s = 0.0f;
            for (int j = 0; j < 4; j++)
                if (v >> j & 1)
                    s += u[4 * g + j];
            tables[16 * g + v] = s;
        }
    const __m512i lanes = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(width));
    const __m256i lanes_lo = _mm512_castsi512_si256(lanes), lanes_hi = _mm512_extracti64x4_epi64(lanes, 1);
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i low_bits = _mm512_set1_epi32(0x55555555);
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
        const __mmask16 m = n - i0 >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i0)) - 1);
        const uint8_t *base = rows + i0 * width;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps(), c = _mm512_setzero_ps();
        for (int h = 0; h < code_bytes / 8; h++) {
            /* 8 code bytes of 16 rows (two 8-row gathers), regrouped as two 4-byte words per row */
            __m512i x = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), (__mmask8)m, lanes_lo, base + 8 * h, 1);
            __m512i y = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), (__mmask8)(m >> 8), lanes_hi, base + 8 * h, 1);
            __m512i words[2] = {_mm512_permutex2var_epi32(x, evens, y), _mm512_permutex2var_epi32(x, odds, y)};
            for (int w = 0; w < 2; w++) {
                __m512i lo = _mm512_and_si512(words[w], low_bits);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi32(words[w], 1), low_bits);
                __m512i both = compress_planes(_mm512_and_si512(lo, hi));
                lo = compress_planes(lo);
                hi = compress_planes(hi);
                for (int q = 0; q < 4; q++) {  /* vpermps reads the low 4 bits of each index */
                    __m512 t = _mm512_load_ps(tables + 16 * (8 * h + 4 * w + q));
                    a = _mm512_add_ps(a, _mm512_permutexvar_ps(_mm512_srli_epi32(lo, 8 * q), t));
                    b = _mm512_add_ps(b, _mm512_permutexvar_ps(_mm512_srli_epi32(hi, 8 * q), t));
                    c = _mm512_add_ps(c, _mm512_permutexvar_ps(_mm512_srli_epi32(both, 8 * q), t));
                }
            }
        }
        const uint8_t *levels = base + code_bytes;
        __m512 l0 = load_level(levels, lanes, m, 0, level_width), l1 = load_level(levels, lanes, m, 1, level_width);
        __m512 l2 = load_level(levels, lanes, m, 2, level_width), l3 = load_level(levels, lanes, m, 3, level_width);
        __m512 score = _mm512_mul_ps(l0, _mm512_set1_ps(total));
        score = _mm512_fmadd_ps(_mm512_sub_ps(l1, l0), a, score);
        score = _mm512_fmadd_ps(_mm512_sub_ps(l2, l0), b, score);
        score = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_add_ps(l3, l0), _mm512_add_ps(l1, l2)), c, score);
        _mm512_mask_storeu_ps(out + i0, m, score);
    }
}
#else
#define HAVE_KERNEL 0
#endif

static int kernel_available(void) {
#if HAVE_KERNEL
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
#else
    return 0;
#endif
}

static PyObject *scores(PyObject *self, PyObject *args) {
    Py_buffer rows, user, out;
    Py_ssize_t n;
    int width, dim, level_width;
    if (!PyArg_ParseTuple(args, "y*niiiy*w*", &rows, &n, &width, &dim, &level_width, &user, &out))
        return NULL;
    const char *error = NULL;
    if (!kernel_available())
        error = "this CPU has no AVX-512";
    else if (dim < 32 || dim > 256 || dim % 32)
        error = "dim must be a multiple of 32 in 32..256";
    else if (level_width != 1 && level_width != 2 && level_width != 4)
        error = "level width must be 1, 2 or 4 bytes";
    else if (width != dim / 4 + 4 * level_width)
        error = "row width does not match 2-bit codes and 4 levels";
    else if (n < 0 || rows.len < n * width || user.len != (Py_ssize_t)(dim * sizeof(float))
             || out.len < (Py_ssize_t)(n * sizeof(float)))
        error = "buffer sizes do not match n, dim and the row width";
#if HAVE_KERNEL
    if (!error) {
        Py_BEGIN_ALLOW_THREADS
        score_rows(rows.buf, n, width, dim, level_width, user.buf, out.buf);
        Py_END_ALLOW_THREADS
    }
#endif
    PyBuffer_Release(&rows);
    PyBuffer_Release(&user);
    PyBuffer_Release(&out);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"scores", scores, METH_VARARGS,
     "scores(rows, n, width, dim, level_width, user, out): scores of the first n 2-bit rows into out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastscan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastscan(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "available", kernel_available()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
