/* bf16 GEMV kernels for the captured decode step on x86-64 CPUs with AVX512-BF16 (k2serve issue 16).
 *
 * Built at first use by k2serve/model/cpu_kernels.py with the C compiler torch.compile already needs,
 * loaded with ctypes, and run on the OpenMP runtime torch itself runs on (libgomp.so.1, already loaded
 * in the process), so torch.set_num_threads sets these kernels' threads too.
 *
 * Every dot product multiplies bf16 pairs exactly and sums in fp32 (VDPBF16PS); each output is rounded
 * to bf16 where the torch code it replaces rounds (compiled_gemv.gathered_experts_torch, F.linear). No
 * allocation, no state: the caller passes every buffer. */
#define _GNU_SOURCE /* syscall() for AMX's permission request */
#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Software prefetch distance in bf16 elements (1 KB) along each weight row; past a row's end it runs
 * into the next rows, the ones read next. Measured against none, 512 B and 2 KB on `small`'s shapes:
 * 1 KB read the weights 10-25% faster than none (BENCHMARKS.md, "Native GEMV kernels"). A prefetch
 * of an address past the weights is harmless (no fault). */
#define AHEAD 512

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

static inline float bf2f(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion (NaN stays a quiet NaN). */
static inline uint16_t f2bf(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float round_bf(float f) { return bf2f(f2bf(f)); }

int k2_cpu_gemv_abi(void) { return 7; }

/* Facts the Python side finds once when the library loads and the ops (cpu_ops.cpp) check: whether AMX
 * runs in this process (the CPU, the kernel's permission, K2SERVE_AMX), and whether this torch packs INT4
 * weights in the AVX512 tiles the INT4 kernels read. */
static int amx_enabled = 0, int4_tiles_ok = 0;
void k2_set_amx(int on) { amx_enabled = on; }
int k2_amx_enabled(void) { return amx_enabled; }
void k2_set_int4_tiles(int ok) { int4_tiles_ok = ok; }
int k2_int4_tiles_ok(void) { return int4_tiles_ok; }

int k2_cpu_gemv_supported(void) {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

/* The sums of four fp32 vectors into out[0..3]. */
TGT static inline void hsum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float *out) {
  __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(2, 3, 0, 1)));
  s = _mm512_add_ps(s, _mm512_permute_ps(s, _MM_SHUFFLE(1, 0, 3, 2)));
  float t[16];
  _mm512_storeu_ps(t, s);
  out[0] = t[0];
  out[1] = t[4];
  out[2] = t[8];
  out[3] = t[12];
}

TGT static inline __m512bh load_bh(const uint16_t *p, int n_left) {
  if (n_left >= 32) return (__m512bh)_mm512_loadu_si512(p);
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n_left) - 1), p);
}

/* out[j] = sum_i w[j * ld + i] * x[i] for j < 4, i < n. */
TGT static inline void dot4(const uint16_t *w, long ld, const uint16_t *x, int n, float *out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 32) {
    int left = n - i;
    _mm_prefetch((const char *)(w + i + AHEAD), _MM_HINT_T0);
    _mm_prefetch((const char *)(w + ld + i + AHEAD), _MM_HINT_T0);
    _mm_prefetch((const char *)(w + 2 * ld + i + AHEAD), _MM_HINT_T0);
    _mm_prefetch((const char *)(w + 3 * ld + i + AHEAD), _MM_HINT_T0);
    __m512bh xv = load_bh(x + i, left);
    a0 = _mm512_dpbf16_ps(a0, load_bh(w + i, left), xv);
    a1 = _mm512_dpbf16_ps(a1, load_bh(w + ld + i, left), xv);
    a2 = _mm512_dpbf16_ps(a2, load_bh(w + 2 * ld + i, left), xv);
    a3 = _mm512_dpbf16_ps(a3, load_bh(w + 3 * ld + i, left), xv);
  }
  hsum4(a0, a1, a2, a3, out);
}

/* out[t * 4 + j] = sum_i w[j * ld + i] * x[t * D + i] for t < 2, j < 4: two tokens share the loads. */
TGT static inline void dot4x2(const uint16_t *w, long ld, const uint16_t *x, long D, int n, float *out) {
  __m512 a[8];
  for (int j = 0; j < 8; j++) a[j] = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 32) {
    int left = n - i;
    __m512bh x0 = load_bh(x + i, left), x1 = load_bh(x + D + i, left);
    for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(w + j * ld + i + AHEAD), _MM_HINT_T0);
    for (int j = 0; j < 4; j++) {
      __m512bh wv = load_bh(w + j * ld + i, left);
      a[j] = _mm512_dpbf16_ps(a[j], wv, x0);
      a[4 + j] = _mm512_dpbf16_ps(a[4 + j], wv, x1);
    }
  }
  hsum4(a[0], a[1], a[2], a[3], out);
  hsum4(a[4], a[5], a[6], a[7], out + 4);
}

TGT static inline float dot1(const uint16_t *w, const uint16_t *x, int n) {
  __m512 a = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 32) a = _mm512_dpbf16_ps(a, load_bh(w + i, n - i), load_bh(x + i, n - i));
  return _mm512_reduce_add_ps(a);
}

/* y[t, n] = bf16(sum_d w[n, d] * x[t, d]) for t < T, n < N: x [T, D], w [N, D], y [T, N], contiguous.
 * Threads split the rows of w; each block of four rows is read once for all T tokens (two at a time
 * from L1). */
TGT void k2_linear_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int T, int N, int D) {
  int nb = N / 4;
#pragma omp parallel for schedule(static)
  for (int b = 0; b < nb; b++) {
    const uint16_t *wb = w + (long)4 * b * D;
    float o[8];
    int t = 0;
    for (; t + 2 <= T; t += 2) {
      dot4x2(wb, D, x + (long)t * D, D, D, o);
      for (int j = 0; j < 4; j++) {
        y[(long)t * N + 4 * b + j] = f2bf(o[j]);
        y[(long)(t + 1) * N + 4 * b + j] = f2bf(o[4 + j]);
      }
    }
    if (t < T) {
      dot4(wb, D, x + (long)t * D, D, o);
      for (int j = 0; j < 4; j++) y[(long)t * N + 4 * b + j] = f2bf(o[j]);
    }
  }
  for (int n = nb * 4; n < N; n++)
    for (int t = 0; t < T; t++) y[(long)t * N + n] = f2bf(dot1(w + (long)n * D, x + (long)t * D, D));
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static inline uint16_t swiglu(float gate, float up) {
  return f2bf(round_bf(silu(round_bf(gate))) * round_bf(up));
}

/* The routed experts of T tokens, K each, as compiled_gemv.gathered_experts computes them:
 *   [gate; up] = bf16(w13[e] @ x[t]),  act = bf16(bf16(silu(gate)) * up),  y = bf16(w2[e] @ act),
 *   out[t] = bf16(sum_j bf16(y_j * bf16(wts[t, j]))).
 * x [T, D] bf16, ids [T, K] int64 (expert of each (token, slot)), wts [T, K] fp32, w13 [E, 2I, D],
 * w2 [E, D, I], act: scratch [T * K, I] bf16, acc: scratch [T, D] fp32, out [T, D] bf16. One parallel
 * region, two phases: the threads split (row, 4 intermediate features), then 4 output features each
 * over every row; only the routed experts' weights are read. Returns 0, or 1 + the first flat
 * (token, slot) position whose id is outside [0, E) (nothing computed). */
TGT int k2_moe_bf16(const uint16_t *x, const int64_t *ids, const float *wts, const uint16_t *w13,
                    const uint16_t *w2, uint16_t *act, float *acc, uint16_t *out, int T, int K, int D,
                    int I, int E) {
  int R = T * K, ib = I / 4, db = D / 4;
  for (int r = 0; r < R; r++)
    if (ids[r] < 0 || ids[r] >= E) return r + 1;
  long e13 = (long)2 * I * D, e2 = (long)D * I;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (long item = 0; item < (long)R * ib; item++) {
      int r = (int)(item / ib), i = (int)(item % ib) * 4;
      const uint16_t *we = w13 + ids[r] * e13, *xr = x + (long)(r / K) * D;
      float g[4], u[4];
      dot4(we + (long)i * D, D, xr, D, g);
      dot4(we + (long)(I + i) * D, D, xr, D, u);
      for (int j = 0; j < 4; j++) act[(long)r * I + i + j] = swiglu(g[j], u[j]);
    }
#pragma omp for schedule(static)
    for (int r = 0; r < R; r++) {
      const uint16_t *we = w13 + ids[r] * e13, *xr = x + (long)(r / K) * D;
      for (int i = ib * 4; i < I; i++)
        act[(long)r * I + i] = swiglu(dot1(we + (long)i * D, xr, D), dot1(we + (long)(I + i) * D, xr, D));
    }
#pragma omp for schedule(static)
    for (int b = 0; b < db; b++) {
      for (int t = 0; t < T; t++)
        for (int j = 0; j < 4; j++) acc[(long)t * D + 4 * b + j] = 0.0f;
      for (int r = 0; r < R; r++) {
        float o[4], wr = round_bf(wts[r]);
        dot4(w2 + ids[r] * e2 + (long)4 * b * I, I, act + (long)r * I, I, o);
        for (int j = 0; j < 4; j++) acc[(long)(r / K) * D + 4 * b + j] += round_bf(round_bf(o[j]) * wr);
      }
    }
#pragma omp for schedule(static)
    for (int d = db * 4; d < D; d++)
      for (int t = 0; t < T; t++) {
        float s = 0.0f;
        for (int j = 0; j < K; j++) {
          int r = t * K + j;
          s += round_bf(round_bf(dot1(w2 + ids[r] * e2 + (long)d * I, act + (long)r * I, I)) * round_bf(wts[r]));
        }
        acc[(long)t * D + d] = s;
      }
#pragma omp for schedule(static)
    for (long i = 0; i < (long)T * D; i++) out[i] = f2bf(acc[i]);
  }
  return 0;
}

/* The rows r < R sorted by expert (counting sort, stable): order[start[e] .. start[e + 1]) are expert e's
 * rows; used[0 .. U) the experts with rows, in order. Returns U. ids must be in [0, E). */
static int group_rows(const int64_t *ids, int R, int E, int32_t *order, int32_t *start, int32_t *used) {
  int U = 0;
  for (int e = 0; e <= E; e++) start[e] = 0;
  for (int r = 0; r < R; r++) start[ids[r] + 1]++;
  for (int e = 0; e < E; e++) start[e + 1] += start[e];
  for (int r = 0; r < R; r++) order[start[ids[r]]++] = r; /* start[e] is now the end of expert e */
  for (int e = E; e > 0; e--) start[e] = start[e - 1];
  start[0] = 0;
  for (int e = 0; e < E; e++)
    if (start[e + 1] > start[e]) used[U++] = e; /* the experts with rows: the only ones read */
  return U;
}

/* f2bf on 16 lanes, bit for bit (NaN, denormals and all): the bf16 bits in each 32-bit lane's low half. */
TGT static inline __m512i vf2bf(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                          _mm512_set1_epi32(0x7f800000));
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}

/* round_bf on 16 lanes, bit for bit. */
TGT static inline __m512 vround_bf(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(vf2bf(v), 16)); }

/* out[t] = bf16(sum over j < K of yw[t * K + j]), summed in j order from 0 as the per-row kernels sum
 * (16 features a vector: each lane's adds and rounding are the scalar ones); a work-shared loop of the
 * enclosing parallel region. */
TGT static inline void sum_rows(const float *yw, uint16_t *out, int T, int K, int D) {
  int D16 = D / 16 * 16;
#pragma omp for schedule(static)
  for (int t = 0; t < T; t++) {
    for (int d = 0; d < D16; d += 16) {
      __m512 s = _mm512_setzero_ps();
      for (int j = 0; j < K; j++) s = _mm512_add_ps(s, _mm512_loadu_ps(yw + ((long)t * K + j) * D + d));
      _mm256_storeu_si256((__m256i *)(out + (long)t * D + d), _mm512_cvtepi32_epi16(vf2bf(s)));
    }
    for (int d = D16; d < D; d++) {
      float s = 0.0f;
      for (int j = 0; j < K; j++) s += yw[((long)t * K + j) * D + d];
      out[(long)t * D + d] = f2bf(s);
    }
  }
}

/* out[t * 4 + j] = sum_i w[j * ld + i] * xs[t][i] for t < M, j < 4: M (<= 4) tokens share each load of
 * four weight rows. Every (row, token) sum runs in the order `dot4` uses, so each equals dot4's bitwise. */
TGT static inline __attribute__((always_inline)) void dot4xm(const uint16_t *w, long ld,
                                                               const uint16_t *const *xs, int M, int n,
                                                               float *out) {
  __m512 a[16];
  for (int j = 0; j < 4 * M; j++) a[j] = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 32) {
    int left = n - i;
    for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(w + j * ld + i + AHEAD), _MM_HINT_T0);
    __m512bh xv[4];
    for (int t = 0; t < M; t++) xv[t] = load_bh(xs[t] + i, left);
    for (int j = 0; j < 4; j++) {
      __m512bh wv = load_bh(w + j * ld + i, left);
      for (int t = 0; t < M; t++) a[4 * t + j] = _mm512_dpbf16_ps(a[4 * t + j], wv, xv[t]);
    }
  }
  for (int t = 0; t < M; t++) hsum4(a[4 * t], a[4 * t + 1], a[4 * t + 2], a[4 * t + 3], out + 4 * t);
}

/* dot4xm for any m: chunks of 4, 3, 2, 1 tokens with the count fixed at compile time. */
TGT static void dot4xn(const uint16_t *w, long ld, const uint16_t *const *xs, int m, int n, float *out) {
  for (; m >= 4; m -= 4, xs += 4, out += 16) dot4xm(w, ld, xs, 4, n, out);
  if (m == 3) dot4xm(w, ld, xs, 3, n, out);
  if (m == 2) dot4xm(w, ld, xs, 2, n, out);
  if (m == 1) dot4xm(w, ld, xs, 1, n, out);
}

/* `k2_moe_bf16` with the work grouped by expert: each routed expert's weights are read once for all
 * the rows routed to it (at batch > 1 tokens share experts), up to four rows per load. The same
 * outputs bit for bit: every dot product, rounding and sum runs as k2_moe_bf16 runs it. Scratch: act
 * [T * K, I] bf16, yw [T * K, D] fp32 (each row's weighted expert output), order [T * K] and start
 * [E + 1] int32, xs [T * K] pointers, used [E] int32. Threads take (expert with rows, 4 features) items
 * of each phase. Returns 0 or 1 + the first bad (token, slot), as k2_moe_bf16. */
TGT int k2_moe_bf16_grouped(const uint16_t *x, const int64_t *ids, const float *wts, const uint16_t *w13,
                            const uint16_t *w2, uint16_t *act, float *yw, int32_t *order, int32_t *start,
                            const uint16_t **xs, int32_t *used, uint16_t *out, int T, int K, int D, int I,
                            int E) {
  int R = T * K, ib = I / 4, db = D / 4, ni = ib + (I % 4 != 0), nd = db + (D % 4 != 0);
  for (int r = 0; r < R; r++)
    if (ids[r] < 0 || ids[r] >= E) return r + 1;
  int U = group_rows(ids, R, E, order, start, used);
  for (int q = 0; q < R; q++) xs[q] = x + (long)(order[q] / K) * D;
  long e13 = (long)2 * I * D, e2 = (long)D * I;
#pragma omp parallel
  {
    float o[16], g[16];
#pragma omp for schedule(dynamic, 16)
    for (long item = 0; item < (long)U * ni; item++) {
      int e = used[item / ni], b = (int)(item % ni), q0 = start[e], m = start[e + 1] - q0;
      const uint16_t *we = w13 + e * e13;
      if (b < ib) { /* four gate rows and the four up rows of features 4b .. 4b + 3 */
        int i = 4 * b;
        for (int c = 0; c < m; c += 4) {
          int mc = m - c < 4 ? m - c : 4;
          dot4xn(we + (long)i * D, D, xs + q0 + c, mc, D, g);
          dot4xn(we + (long)(I + i) * D, D, xs + q0 + c, mc, D, o);
          for (int t = 0; t < mc; t++)
            for (int j = 0; j < 4; j++) act[(long)order[q0 + c + t] * I + i + j] = swiglu(g[4 * t + j], o[4 * t + j]);
        }
      } else { /* the features past the last multiple of four */
        for (int q = q0; q < q0 + m; q++)
          for (int i = ib * 4; i < I; i++)
            act[(long)order[q] * I + i] =
                swiglu(dot1(we + (long)i * D, xs[q], D), dot1(we + (long)(I + i) * D, xs[q], D));
      }
    }
#pragma omp for schedule(dynamic, 16)
    for (long item = 0; item < (long)U * nd; item++) {
      int e = used[item / nd], b = (int)(item % nd), q0 = start[e], m = start[e + 1] - q0;
      const uint16_t *we = w2 + e * e2;
      const uint16_t *as[4];
      if (b < db) {
        for (int c = 0; c < m; c += 4) {
          int mc = m - c < 4 ? m - c : 4;
          for (int t = 0; t < mc; t++) as[t] = act + (long)order[q0 + c + t] * I;
          dot4xn(we + (long)4 * b * I, I, as, mc, I, o);
          for (int t = 0; t < mc; t++) {
            int r = order[q0 + c + t];
            float wr = round_bf(wts[r]);
            for (int j = 0; j < 4; j++) yw[(long)r * D + 4 * b + j] = round_bf(round_bf(o[4 * t + j]) * wr);
          }
        }
      } else {
        for (int q = q0; q < q0 + m; q++) {
          int r = order[q];
          float wr = round_bf(wts[r]);
          for (int d = db * 4; d < D; d++)
            yw[(long)r * D + d] = round_bf(round_bf(dot1(we + (long)d * I, act + (long)r * I, I)) * wr);
        }
      }
    }
    sum_rows(yw, out, T, K, D);
  }
  return 0;
}

/* ---- INT4 experts in torch's CPU tile layout ------------------------------------------------------
 * `aten._convert_weight_to_int4pack_for_cpu` on AVX512 lays an [N, K] weight out in blocks of 64 rows:
 * for each block and input column k, 32 bytes whose byte j holds row j (low nibble) and row 32 + j
 * (high nibble). Scales and zeros: [K / group, N, 2] in bf16. W = (q - 8) * scale + zero, in fp32 as
 * torch's `_weight_int4pack_mm_for_cpu` forms it (cpu_kernels.py checks the layout on the machine at
 * hand: quant.int4pack_cpu_tiles). */

/* acc[0..3] (64 rows, 16 a vector) += W[n0 .. n0 + 63, :] @ x, for the block whose tile bytes start at
 * `tile`. Per group: sum q * x in fp32, then scale * that + (zero - 8 scale) * sum(x). */
TGT static inline void tile64(const uint8_t *tile, const uint16_t *sz, long N, long n0, const float *x,
                              int K, int group, __m512 acc[4]) {
  const __m512i m4 = _mm512_set1_epi32(15), hi16 = _mm512_set1_epi32((int)0xffff0000u);
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int g0 = 0; g0 < K; g0 += group) {
    __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
    __m512 p2 = _mm512_setzero_ps(), p3 = _mm512_setzero_ps();
    float xs = 0.0f;
    for (int k = g0; k < g0 + group; k++) {
      const uint8_t *p = tile + (long)k * 32;
      _mm_prefetch((const char *)(p + 2 * AHEAD), _MM_HINT_T0);
      __m512 xv = _mm512_set1_ps(x[k]);
      xs += x[k];
      __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
      __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16)));
      p0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v0, m4)), xv, p0);
      p1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v1, m4)), xv, p1);
      p2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)), xv, p2);
      p3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4)), xv, p3);
    }
    const uint16_t *s = sz + ((long)(g0 / group) * N + n0) * 2;
    __m512 xsv = _mm512_set1_ps(xs), ps[4] = {p0, p1, p2, p3};
    for (int q = 0; q < 4; q++) {
      __m512i v = _mm512_loadu_si512(s + 32 * q); /* 16 (scale, zero) pairs */
      __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(v, hi16));
      acc[q] = _mm512_fmadd_ps(sc, ps[q], acc[q]);
      acc[q] = _mm512_fmadd_ps(_mm512_fnmadd_ps(eight, sc, ze), xsv, acc[q]);
    }
  }
}

/* `k2_moe_bf16` with INT4 experts in the tile layout: w13 [E, 2I, D / 2] bytes with scales and zeros
 * w13_sz [E, D / group, 2I, 2], w2 [E, D, I / 2] with w2_sz [E, I / group, D, 2]. The same roundings:
 * [gate; up] = bf16(W13 @ x), act = bf16(bf16(silu(gate)) * up), y = bf16(W2 @ act), out[t] =
 * bf16(sum_j bf16(y_j * bf16(wts[t, j]))). Needs I and D multiples of 64 and of `group`. Scratch: xf
 * [T, D] fp32, act [T * K, I] fp32, acc [T, D] fp32. Returns 0, or 1 + the first bad (token, slot). */
TGT int k2_moe_int4(const uint16_t *x, const int64_t *ids, const float *wts, const uint8_t *w13,
                    const uint16_t *w13_sz, const uint8_t *w2, const uint16_t *w2_sz, float *xf, float *act,
                    float *acc, uint16_t *out, int T, int K, int D, int I, int E, int group) {
  int R = T * K, ib = I / 64, db = D / 64;
  long e13 = (long)I * D, e2 = (long)D * I / 2; /* bytes per expert: 2I * D / 2 and D * I / 2 */
  long s13 = (long)(D / group) * 2 * I * 2, s2 = (long)(I / group) * D * 2; /* bf16s per expert */
  for (int r = 0; r < R; r++)
    if (ids[r] < 0 || ids[r] >= E) return r + 1;
  for (long i = 0; i < (long)T * D; i++) xf[i] = bf2f(x[i]);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int item = 0; item < R * ib; item++) {
      int r = item / ib, b = item % ib;
      const uint8_t *we = w13 + ids[r] * e13;
      const uint16_t *se = w13_sz + ids[r] * s13;
      const float *xr = xf + (long)(r / K) * D;
      __m512 g[4], u[4];
      for (int q = 0; q < 4; q++) g[q] = u[q] = _mm512_setzero_ps();
      tile64(we + (long)b * D * 32, se, 2L * I, 64L * b, xr, D, group, g);
      tile64(we + (long)(ib + b) * D * 32, se, 2L * I, (long)I + 64L * b, xr, D, group, u);
      float gf[64], uf[64];
      for (int q = 0; q < 4; q++) {
        _mm512_storeu_ps(gf + 16 * q, g[q]);
        _mm512_storeu_ps(uf + 16 * q, u[q]);
      }
      /* tile rows: q = 0, 1 are block rows 0..31 (low nibbles), q = 2, 3 rows 32..63 */
      for (int j = 0; j < 64; j++) act[(long)r * I + 64L * b + j] = bf2f(swiglu(gf[j], uf[j]));
    }
#pragma omp for schedule(static)
    for (int b = 0; b < db; b++) {
      for (int t = 0; t < T; t++)
        for (int j = 0; j < 64; j++) acc[(long)t * D + 64L * b + j] = 0.0f;
      for (int r = 0; r < R; r++) {
        __m512 y[4];
        for (int q = 0; q < 4; q++) y[q] = _mm512_setzero_ps();
        tile64(w2 + ids[r] * e2 + (long)b * I * 32, w2_sz + ids[r] * s2, D, 64L * b, act + (long)r * I, I,
               group, y);
        float yf[64], wr = round_bf(wts[r]);
        for (int q = 0; q < 4; q++) _mm512_storeu_ps(yf + 16 * q, y[q]);
        for (int j = 0; j < 64; j++) acc[(long)(r / K) * D + 64L * b + j] += round_bf(round_bf(yf[j]) * wr);
      }
    }
#pragma omp for schedule(static)
    for (long i = 0; i < (long)T * D; i++) out[i] = f2bf(acc[i]);
  }
  return 0;
}

/* `tile64` for M (<= 4) tokens at once: each byte of the tile is read and unpacked once for all M,
 * and every token's sums run in tile64's order (so each result equals tile64's bitwise). acc: M
 * blocks of 64 floats in memory (rows as tile64's four vectors), added to. */
TGT static inline __attribute__((always_inline)) void tile64xm(const uint8_t *tile, const uint16_t *sz, long N,
                                                                 long n0, const float *const *xs, int M, int K,
                                                                 int group, float *acc) {
  const __m512i m4 = _mm512_set1_epi32(15), hi16 = _mm512_set1_epi32((int)0xffff0000u);
  const __m512 eight = _mm512_set1_ps(8.0f);
  for (int g0 = 0; g0 < K; g0 += group) {
    __m512 p[4][4];
    float xs_sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int t = 0; t < M; t++)
      for (int q = 0; q < 4; q++) p[t][q] = _mm512_setzero_ps();
    for (int k = g0; k < g0 + group; k++) {
      const uint8_t *b = tile + (long)k * 32;
      _mm_prefetch((const char *)(b + 2 * AHEAD), _MM_HINT_T0);
      __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)b));
      __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 16)));
      __m512 w0 = _mm512_cvtepi32_ps(_mm512_and_si512(v0, m4)), w1 = _mm512_cvtepi32_ps(_mm512_and_si512(v1, m4));
      __m512 w2 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v0, 4)), w3 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v1, 4));
      for (int t = 0; t < M; t++) {
        __m512 xv = _mm512_set1_ps(xs[t][k]);
        xs_sum[t] += xs[t][k];
        p[t][0] = _mm512_fmadd_ps(w0, xv, p[t][0]);
        p[t][1] = _mm512_fmadd_ps(w1, xv, p[t][1]);
        p[t][2] = _mm512_fmadd_ps(w2, xv, p[t][2]);
        p[t][3] = _mm512_fmadd_ps(w3, xv, p[t][3]);
      }
    }
    const uint16_t *s = sz + ((long)(g0 / group) * N + n0) * 2;
    for (int q = 0; q < 4; q++) {
      __m512i v = _mm512_loadu_si512(s + 32 * q);
      __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      __m512 ze8 = _mm512_fnmadd_ps(eight, sc, _mm512_castsi512_ps(_mm512_and_si512(v, hi16)));
      for (int t = 0; t < M; t++) {
        __m512 a = _mm512_loadu_ps(acc + 64 * t + 16 * q);
        a = _mm512_fmadd_ps(sc, p[t][q], a);
        a = _mm512_fmadd_ps(ze8, _mm512_set1_ps(xs_sum[t]), a);
        _mm512_storeu_ps(acc + 64 * t + 16 * q, a);
      }
    }
  }
}

TGT static void tile64xn(const uint8_t *tile, const uint16_t *sz, long N, long n0, const float *const *xs, int m,
                         int K, int group, float *acc) {
  for (int t = 0; t < 64 * m; t++) acc[t] = 0.0f;
  if (m == 4) tile64xm(tile, sz, N, n0, xs, 4, K, group, acc);
  if (m == 3) tile64xm(tile, sz, N, n0, xs, 3, K, group, acc);
  if (m == 2) tile64xm(tile, sz, N, n0, xs, 2, K, group, acc);
  if (m == 1) tile64xm(tile, sz, N, n0, xs, 1, K, group, acc);
}

/* `k2_moe_int4` with the work grouped by expert, as k2_moe_bf16_grouped is for bf16: each routed
 * expert's tiles are read once for all its rows (up to four rows per read), the same outputs bit for
 * bit. Scratch: xf [T, D] fp32, act [T * K, I] fp32, yw [T * K, D] fp32, order [T * K] and start
 * [E + 1] int32, xs [T * K] pointers, used [E] int32. Returns 0 or 1 + the first bad (token, slot). */
TGT int k2_moe_int4_grouped(const uint16_t *x, const int64_t *ids, const float *wts, const uint8_t *w13,
                            const uint16_t *w13_sz, const uint8_t *w2, const uint16_t *w2_sz, float *xf,
                            float *act, float *yw, int32_t *order, int32_t *start, const float **xs,
                            int32_t *used, uint16_t *out, int T, int K, int D, int I, int E, int group) {
  int R = T * K, ib = I / 64, db = D / 64;
  long e13 = (long)I * D, e2 = (long)D * I / 2;
  long s13 = (long)(D / group) * 2 * I * 2, s2 = (long)(I / group) * D * 2;
  for (int r = 0; r < R; r++)
    if (ids[r] < 0 || ids[r] >= E) return r + 1;
  for (long i = 0; i < (long)T * D; i++) xf[i] = bf2f(x[i]);
  int U = group_rows(ids, R, E, order, start, used);
  for (int q = 0; q < R; q++) xs[q] = xf + (long)(order[q] / K) * D;
#pragma omp parallel
  {
    float g[256], u[256];
    const float *as[4];
#pragma omp for schedule(dynamic, 4)
    for (long item = 0; item < (long)U * ib; item++) {
      int e = used[item / ib], b = (int)(item % ib), q0 = start[e], m = start[e + 1] - q0;
      const uint8_t *we = w13 + (long)e * e13;
      const uint16_t *se = w13_sz + (long)e * s13;
      for (int c = 0; c < m; c += 4) {
        int mc = m - c < 4 ? m - c : 4;
        tile64xn(we + (long)b * D * 32, se, 2L * I, 64L * b, xs + q0 + c, mc, D, group, g);
        tile64xn(we + (long)(ib + b) * D * 32, se, 2L * I, (long)I + 64L * b, xs + q0 + c, mc, D, group, u);
        for (int t = 0; t < mc; t++)
          for (int j = 0; j < 64; j++)
            act[(long)order[q0 + c + t] * I + 64L * b + j] = bf2f(swiglu(g[64 * t + j], u[64 * t + j]));
      }
    }
#pragma omp for schedule(dynamic, 4)
    for (long item = 0; item < (long)U * db; item++) {
      int e = used[item / db], b = (int)(item % db), q0 = start[e], m = start[e + 1] - q0;
      for (int c = 0; c < m; c += 4) {
        int mc = m - c < 4 ? m - c : 4;
        for (int t = 0; t < mc; t++) as[t] = act + (long)order[q0 + c + t] * I;
        tile64xn(w2 + (long)e * e2 + (long)b * I * 32, w2_sz + (long)e * s2, D, 64L * b, as, mc, I, group, g);
        for (int t = 0; t < mc; t++) {
          int r = order[q0 + c + t];
          float wr = round_bf(wts[r]);
          for (int j = 0; j < 64; j++) yw[(long)r * D + 64L * b + j] = round_bf(round_bf(g[64 * t + j]) * wr);
        }
      }
    }
    sum_rows(yw, out, T, K, D);
  }
  return 0;
}

#define INT4_PARALLEL_MIN (256L * 1024)

/* y[t, n] = bf16(sum_k W[n, k] * x[t, k]) for an INT4 weight W [N, K] in the tile layout above (tiles
 * [N, K / 2] bytes, scales and zeros sz [K / group, N, 2] bf16): an INT4 linear layer without bias, the
 * sums in tile64's order. x [T, K] bf16, y [T, N] bf16; N a multiple of 64, K of `group`. Threads split
 * the 64-row blocks; each block's tiles are read and unpacked once for up to four tokens. x is widened to
 * fp32 once into a buffer the calling thread keeps. Returns 0, or 1 when that buffer cannot grow. */
TGT int k2_linear_int4(const uint16_t *x, const uint8_t *w, const uint16_t *sz, uint16_t *y, int T, int N, int K,
                       int group) {
  static __thread float *xf = NULL; /* x in fp32: the calling thread's buffer, kept and grown */
  static __thread long xf_len = 0;
  int nb = N / 64;
  if ((long)T * K > xf_len) {
    float *grown = realloc(xf, sizeof(float) * (size_t)T * (size_t)K);
    if (grown == NULL) return 1;
    xf = grown;
    xf_len = (long)T * K;
  }
  float *xin = xf; /* the pointer, not the thread-local variable, inside the parallel region */
  for (long i = 0; i < (long)T * K; i++) xin[i] = bf2f(x[i]);
  /* a layer of under INT4_PARALLEL_MIN weight-rows (T x N x K) runs on the calling thread: for a `moe200m`
   * shared expert (128 x 768, one row) the parallel region's start and join cost more than the split saves */
#pragma omp parallel if ((long)T * N * K >= INT4_PARALLEL_MIN)
  {
    float acc[256];
    const float *xs[4];
#pragma omp for schedule(static)
    for (int b = 0; b < nb; b++) {
      for (int t0 = 0; t0 < T; t0 += 4) {
        int m = T - t0 < 4 ? T - t0 : 4;
        for (int t = 0; t < m; t++) xs[t] = xin + (long)(t0 + t) * K;
        tile64xn(w + (long)b * K * 32, sz, N, 64L * b, xs, m, K, group, acc);
        for (int t = 0; t < m; t++)
          for (int j = 0; j < 64; j++) y[(long)(t0 + t) * N + 64L * b + j] = f2bf(acc[64 * t + j]);
      }
    }
  }
  return 0;
}

/* The dense bf16 weight of an INT4 linear layer in the tile layout above, transposed: out[k, n] =
 * bf16((q - 8) * scale + zero) for W [N, K] ((q - 8) * scale is exact in fp32), rounded to nearest even
 * (`F.linear(x, out.t())` reads it; per input k a block's 64 outputs are contiguous, so the loop is a
 * vector unpack and store). N a multiple of 64, K of `group`; out [K, N]. */
TGT void k2_dequant_int4(const uint8_t *w, const uint16_t *sz, uint16_t *out, int N, int K, int group) {
  int nb = N / 64;
  const __m512i m4 = _mm512_set1_epi32(15), hi16 = _mm512_set1_epi32((int)0xffff0000u);
  const __m512 eight = _mm512_set1_ps(8.0f);
#pragma omp parallel for schedule(static)
  for (int b = 0; b < nb; b++) {
    for (int g0 = 0; g0 < K; g0 += group) {
      const uint16_t *s = sz + ((long)(g0 / group) * N + 64L * b) * 2;
      __m512 sc[4], ze[4];
      for (int q = 0; q < 4; q++) {
        __m512i v = _mm512_loadu_si512(s + 32 * q); /* 16 (scale, zero) pairs */
        sc[q] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        ze[q] = _mm512_castsi512_ps(_mm512_and_si512(v, hi16));
      }
      for (int k = g0; k < g0 + group; k++) {
        const uint8_t *p = w + ((long)b * K + k) * 32;
        __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
        __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16)));
        __m512i qs[4] = {_mm512_and_si512(v0, m4), _mm512_and_si512(v1, m4), _mm512_srli_epi32(v0, 4),
                         _mm512_srli_epi32(v1, 4)};
        uint16_t *o = out + (long)k * N + 64L * b;
        for (int q = 0; q < 4; q++) {
          __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(qs[q]), eight), sc[q], ze[q]);
          _mm256_storeu_si256((__m256i *)(o + 16 * q), (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    }
  }
}


/* ---- bf16 experts on AMX tiles (TDPBF16PS) ----------------------------------------------------------
 * From a few rows an expert on, VDPBF16PS is compute-bound (~100 GFLOP/s on two cores against the ~30
 * GB/s the weights stream at); AMX multiplies a 16 x 32 bf16 tile by a 32 x 16 one per instruction.
 * The weights are the A operand as they lie ([out, in] rows: a tile is 16 output features x 32 inputs,
 * no repacking, no second copy), the tokens the B operand, repacked per call into AMX's pair-interleaved
 * form: for a chunk of up to 16 of an expert's rows, bx[p][t][0..1] = x[t][2p .. 2p + 1] (a 64-byte
 * tile row per input pair), zero past the chunk's rows. C tiles are 16 features x 16 rows in fp32.
 * Products of bf16 pairs are exact and summed in fp32, in AMX's order: an output can differ from
 * `k2_moe_bf16`'s by a bf16 rounding step (the rounding points are the same as there). */

#define AMX_TGT __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

struct amx_cfg {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

/* Whether this CPU has AMX-BF16 and the kernel let this process use its tile state (Linux asks for
 * that once per process: arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; torch's oneDNN asks as well). */
int k2_amx_init(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
  if (!(d & (1u << 22)) || !(d & (1u << 24))) return 0; /* AMX-BF16, AMX-TILE */
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

/* Every tile 16 rows x 64 bytes: A (16 features x 32 bf16 inputs), B (16 input pairs x 16 rows), C (16
 * features x 16 fp32 rows). tmm0-3: C, tmm4: B, tmm5-6: A. */
AMX_TGT static void amx_config(void) {
  struct amx_cfg cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 7; t++) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

/* exp on 16 lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p the degree-7 Taylor polynomial (within
 * ~1 ulp of expf; 0 below -104, inf above 89, NaN stays NaN). */
TGT static inline __m512 vexp(__m512 x) {
  __m512 c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), c);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  __m512 e = _mm512_scalef_ps(p, n);
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

/* swiglu on 16 lanes (bf16 bits in each 32-bit lane's low half): the scalar one's roundings, exp from
 * vexp (an output can differ from the scalar one's where expf and vexp round apart across a bf16 step). */
TGT static inline __m512i vswiglu(__m512 gate, __m512 up) {
  __m512 g = vround_bf(gate);
  __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), vexp(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  return vf2bf(_mm512_mul_ps(vround_bf(s), vround_bf(up)));
}

/* tmm0..3 = the four 16-feature blocks whose first rows are a0..a3 (each `lda` elements apart) times the
 * chunk's B (n_in inputs: n_in / 2 tile rows of bt, 16 rows each). */
AMX_TGT static inline __attribute__((always_inline)) void amx_4x(const uint16_t *a0, const uint16_t *a1,
                                                                   const uint16_t *a2, const uint16_t *a3,
                                                                   long lda, const uint16_t *bt, int n_in) {
  long stride = lda * 2;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int k = 0; k < n_in; k += 32) {
    _tile_loadd(4, bt + (long)k * 16, 64);
    _tile_loadd(5, a0 + k, stride);
    _tile_dpbf16ps(0, 5, 4);
    _tile_loadd(6, a1 + k, stride);
    _tile_dpbf16ps(1, 6, 4);
    _tile_loadd(5, a2 + k, stride);
    _tile_dpbf16ps(2, 5, 4);
    _tile_loadd(6, a3 + k, stride);
    _tile_dpbf16ps(3, 6, 4);
  }
}

/* The four C tiles to cbuf (tile numbers are immediates: no loop). */
AMX_TGT static inline __attribute__((always_inline)) void amx_store4(float cbuf[4][16][16]) {
  _tile_stored(0, cbuf[0], 64);
  _tile_stored(1, cbuf[1], 64);
  _tile_stored(2, cbuf[2], 64);
  _tile_stored(3, cbuf[3], 64);
}

/* The rows of chunk c (the (c - cstart[u])-th chunk of 16 of expert e = used[u]): their count (<= 16),
 * and in *q0 the first one's position in `order`. */
static inline int chunk_rows(const int32_t *start, const int32_t *cstart, int e, int u, int c, int *q0) {
  *q0 = start[e] + 16 * (c - cstart[u]);
  int n = start[e + 1] - *q0;
  return n < 16 ? n : 16;
}

/* `k2_moe_bf16_grouped`'s computation on AMX tiles (same roundings, AMX's summation order). Needs D a
 * multiple of 64 and I of 32. Scratch: bx [C, D, 16] and ba [C, I, 16] bf16 (one B operand per chunk
 * of <= 16 rows of an expert; C = the chunk count bound the caller sizes, `k2_amx_chunks`), yw [T * K,
 * D] fp32, order [T * K], start [E + 1], cstart [E + 1], used [E] int32. Items: (expert with rows, 32
 * intermediate features: gate and up), then (expert, 64 output features); each runs every chunk of its
 * expert while the expert's weights for it are in cache. Returns 0 or 1 + the first bad (token, slot). */
AMX_TGT int k2_moe_bf16_amx(const uint16_t *x, const int64_t *ids, const float *wts, const uint16_t *w13,
                            const uint16_t *w2, uint16_t *bx, uint16_t *ba, float *yw, int32_t *order,
                            int32_t *start, int32_t *cstart, int32_t *used, uint16_t *out, int T, int K, int D,
                            int I, int E) {
  int R = T * K, ni = I / 32, nd = D / 64;
  for (int r = 0; r < R; r++)
    if (ids[r] < 0 || ids[r] >= E) return r + 1;
  int U = group_rows(ids, R, E, order, start, used);
  cstart[0] = 0; /* chunks of expert used[u]: cstart[u] .. cstart[u + 1] */
  for (int u = 0; u < U; u++) cstart[u + 1] = cstart[u] + (start[used[u] + 1] - start[used[u]] + 15) / 16;
  int NC = cstart[U];
  long e13 = (long)2 * I * D, e2 = (long)D * I;
#pragma omp parallel
  {
    float cbuf[4][16][16];
    const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16)); /* cbuf[q][j][t] for j < 16: a column */
    /* B operands of the chunks: token rows to input-pair-interleaved tiles */
#pragma omp for schedule(static)
    for (int c = 0; c < NC; c++) {
      int u = 0;
      while (cstart[u + 1] <= c) u++;
      int q0, n = chunk_rows(start, cstart, used[u], u, c, &q0);
      uint32_t *dst = (uint32_t *)(bx + (long)c * D * 16);
      for (int t = 0; t < n; t++) {
        const uint32_t *src = (const uint32_t *)(x + (long)(order[q0 + t] / K) * D);
        for (int p = 0; p < D / 2; p++) dst[(long)p * 16 + t] = src[p];
      }
      for (int t = n; t < 16; t++)
        for (int p = 0; p < D / 2; p++) dst[(long)p * 16 + t] = 0u;
    }
    amx_config();
#pragma omp for schedule(dynamic, 4)
    for (long item = 0; item < (long)U * ni; item++) {
      int u = (int)(item / ni), i0 = 32 * (int)(item % ni), e = used[u];
      const uint16_t *we = w13 + e * e13;
      for (int c = cstart[u]; c < cstart[u + 1]; c++) {
        int q0, n = chunk_rows(start, cstart, e, u, c, &q0);
        amx_4x(we + (long)i0 * D, we + (long)(i0 + 16) * D, we + (long)(I + i0) * D, we + (long)(I + i0 + 16) * D,
               D, bx + (long)c * D * 16, D);
        amx_store4(cbuf);
        uint16_t *bt = ba + (long)c * I * 16 + (long)i0 * 16; /* tile rows (i0 + j) / 2: 16 (even, odd) pairs */
        __mmask16 live = (__mmask16)((1u << n) - 1);
        for (int j = 0; j < 32; j += 2) {
          __m512i lo = vswiglu(_mm512_loadu_ps(cbuf[j / 16][j % 16]), _mm512_loadu_ps(cbuf[2 + j / 16][j % 16]));
          __m512i hi = vswiglu(_mm512_loadu_ps(cbuf[j / 16][j % 16 + 1]), _mm512_loadu_ps(cbuf[2 + j / 16][j % 16 + 1]));
          _mm512_storeu_si512(bt + (long)j * 16, _mm512_maskz_mov_epi32(live, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16))));
        }
      }
    }
#pragma omp for schedule(dynamic, 4)
    for (long item = 0; item < (long)U * nd; item++) {
      int u = (int)(item / nd), d0 = 64 * (int)(item % nd), e = used[u];
      const uint16_t *we = w2 + e * e2 + (long)d0 * I;
      for (int c = cstart[u]; c < cstart[u + 1]; c++) {
        int q0, n = chunk_rows(start, cstart, e, u, c, &q0);
        amx_4x(we, we + 16L * I, we + 32L * I, we + 48L * I, I, ba + (long)c * I * 16, I);
        amx_store4(cbuf);
        for (int t = 0; t < n; t++) {
          int r = order[q0 + t];
          __m512 wr = _mm512_set1_ps(round_bf(wts[r]));
          for (int q = 0; q < 4; q++) { /* token t's 16 features of tile q: column t of cbuf[q] */
            __m512 v = vround_bf(_mm512_i32gather_ps(col, &cbuf[q][0][t], 4));
            _mm512_storeu_ps(yw + (long)r * D + d0 + 16 * q, vround_bf(_mm512_mul_ps(v, wr)));
          }
        }
      }
    }
    _tile_release();
    sum_rows(yw, out, T, K, D);
  }
  return 0;
}

/* The most chunks of <= 16 rows that T * K rows over E experts can form (the scratch bound). */
int k2_amx_chunks(int R, int E) { return (R < E ? R : E) + R / 16; }

/* `captured.StaticDecodeAttention`'s bf16 computation for one layer in one call (on two threads the
 * torch version's eight small bmm / einsum calls cost ~100 us a layer at batch 1, nearly all overhead):
 * per (row b, head h), with W = C + dr latent columns and the keys of positions 0..pos[b] read in place
 * through the row's block table (no gathered copy):
 *   q_lat = bf16(q_nope @ W_UK[h])             [C]   (W_UK[h] = kv_b weight rows h (dn + dv) .. + dn)
 *   s[t]  = bf16(cat(q_lat, q_pe) . key[t]) * scale      (bmm's bf16 output, then fp32)
 *   p     = bf16(softmax(s))                   (fp32 exp / sum, then rounded as `p.to(bf16)`)
 *   o     = bf16(sum_t p[t] key[t][:C])        [C]
 *   out   = bf16(o @ W_UV[h].T)                [dv]  (W_UV[h] = the next dv rows)
 * The same rounding points as the torch code, fp32 sums in another order. Every head of a row reads the
 * same latent keys (MLA is multi-query in the latent space), so the scores and the values run a row's
 * heads together, up to 8 at once: each key is read once per 8 heads, not once per head. Five phases,
 * each split over the threads: absorbed queries per (row, head); scores per (row, key block); softmax per
 * (row, head); values per (row, 32 latent columns, 8 heads), keys summed in position order; outputs per
 * (row, head). C a multiple of 16.
 * kv: the pool [layers, blocks, bs, W] at this layer; tables [B, NB]; scratch [B * H, NB * bs] fp32; lat
 * [B * H, W + C] bf16 (the absorbed queries, then the attended latents). Returns 0, or 1 + the first row
 * whose position or block table entries fall outside the pool. */

#define MLA_HG 8 /* heads whose scores or values run together */

/* s[h * ld] = bf16(query[h] . key) * scale for h < hg: one key row, 32 columns a VDPBF16PS (dot1's
 * order per head), the key's columns loaded once for the hg heads. */
TGT static inline __attribute__((always_inline)) void mla_scores(const uint16_t *query, const uint16_t *key,
                                                                   int W, int hg, float scale, float *s, long ld) {
  __m512 a[MLA_HG];
  for (int h = 0; h < hg; h++) a[h] = _mm512_setzero_ps();
  for (int i = 0; i < W; i += 32) {
    __m512bh k = load_bh(key + i, W - i);
    for (int h = 0; h < hg; h++) a[h] = _mm512_dpbf16_ps(a[h], load_bh(query + (long)h * W + i, W - i), k);
  }
  for (int h = 0; h < hg; h++) s[h * ld] = round_bf(_mm512_reduce_add_ps(a[h])) * scale;
}

/* acc[h][v] += p[h * ld + t] * key[t][16 v ..] for v < nv (1 or 2 vectors of 16 latent columns), h < hg,
 * over the row's keys 0..P in position order (the block table walked block by block). */
TGT static inline __attribute__((always_inline)) void mla_values(const uint16_t *kv, const int64_t *tb, int bs,
                                                                   int W, int P, int c0, int nv, int hg,
                                                                   const float *p, long ld, __m512 acc[][2]) {
  for (int h = 0; h < hg; h++) acc[h][0] = acc[h][1] = _mm512_setzero_ps();
  for (int j = 0, t = 0; t <= P; j++) {
    const uint16_t *key = kv + tb[j] * bs * (long)W + c0;
    int n = P + 1 - t < bs ? P + 1 - t : bs;
    for (int i = 0; i < n; i++, t++, key += W) {
      __m512 k[2];
      for (int v = 0; v < nv; v++)
        k[v] = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(key + 16 * v))), 16));
      for (int h = 0; h < hg; h++) {
        __m512 pt = _mm512_set1_ps(p[h * ld + t]);
        for (int v = 0; v < nv; v++) acc[h][v] = _mm512_fmadd_ps(pt, k[v], acc[h][v]);
      }
    }
  }
}

TGT int k2_mla_decode(const uint16_t *qn, const uint16_t *qpe, const uint16_t *kv, const int64_t *tables,
                      const int64_t *pos, const uint16_t *wkv, float scale, float *scratch, uint16_t *lat,
                      uint16_t *out, int B, int H, int dn, int dr, int C, int dv, int NB, int bs, int blocks) {
  int W = C + dr, ncb = (C + 31) / 32, nhg = (H + MLA_HG - 1) / MLA_HG;
  long T = (long)NB * bs;
  uint16_t *queries = lat, *obs = lat + (long)B * H * W;
  for (int b = 0; b < B; b++) { /* every read in range: 1 + the first bad row, else 0 */
    if (pos[b] < 0 || pos[b] >= T) return b + 1;
    for (int j = 0; j <= pos[b] / bs; j++)
      if (tables[(long)b * NB + j] < 0 || tables[(long)b * NB + j] >= blocks) return b + 1;
  }
#pragma omp parallel
  {
    float acc[C];
    /* absorbed queries: cat(bf16(q_nope @ W_UK[h]), q_pe) */
#pragma omp for schedule(static)
    for (int item = 0; item < B * H; item++) {
      const uint16_t *wk = wkv + (long)(item % H) * (dn + dv) * C;
      uint16_t *query = queries + (long)item * W;
      for (int c = 0; c < C; c += 16) _mm512_storeu_ps(acc + c, _mm512_setzero_ps());
      for (int d = 0; d < dn; d++) {
        __m512 qd = _mm512_set1_ps(bf2f(qn[(long)item * dn + d]));
        const uint16_t *row = wk + (long)d * C;
        for (int c = 0; c < C; c += 16) {
          __m512 w = _mm512_castsi512_ps(
              _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + c))), 16));
          _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(qd, w, _mm512_loadu_ps(acc + c)));
        }
      }
      for (int c = 0; c < C; c++) query[c] = f2bf(acc[c]);
      for (int j = 0; j < dr; j++) query[C + j] = qpe[(long)item * dr + j];
    }
    /* scores, per (row, key block): every head of the row for each key */
#pragma omp for schedule(static)
    for (long item = 0; item < (long)B * NB; item++) {
      int b = (int)(item / NB), j = (int)(item % NB), P = (int)pos[b];
      if ((long)j * bs > P) continue;
      const uint16_t *key = kv + tables[item] * bs * (long)W;
      int n = P + 1 - j * bs < bs ? P + 1 - j * bs : bs;
      for (int h0 = 0; h0 < H; h0 += MLA_HG) {
        int hg = H - h0 < MLA_HG ? H - h0 : MLA_HG;
        const uint16_t *query = queries + ((long)b * H + h0) * W;
        float *s = scratch + ((long)b * H + h0) * T + (long)j * bs;
        for (int i = 0; i < n; i++) {
          if (hg == MLA_HG)
            mla_scores(query, key + (long)i * W, W, MLA_HG, scale, s + i, T);
          else
            mla_scores(query, key + (long)i * W, W, hg, scale, s + i, T);
        }
      }
    }
    /* p = bf16(softmax(s)) per (row, head), 16 positions a vector */
#pragma omp for schedule(static)
    for (int item = 0; item < B * H; item++) {
      int n = (int)pos[item / H] + 1;
      float *s = scratch + (long)item * T;
      __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
      for (int t = 0; t < n; t += 16) {
        __mmask16 m = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, s + t));
      }
      __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      for (int t = 0; t < n; t += 16) {
        __mmask16 m = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
        __m512 e = vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), top));
        _mm512_mask_storeu_ps(s + t, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
      }
      __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
      for (int t = 0; t < n; t += 16) {
        __mmask16 m = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
        _mm512_mask_storeu_ps(s + t, m, vround_bf(_mm512_div_ps(_mm512_maskz_loadu_ps(m, s + t), total)));
      }
    }
    /* values per (row, 32 latent columns, 8 heads): o = bf16(sum_t p[t] key[t][:C]) */
#pragma omp for schedule(static)
    for (long item = 0; item < (long)B * ncb * nhg; item++) {
      int b = (int)(item / (ncb * nhg)), cb = (int)(item / nhg % ncb), h0 = (int)(item % nhg) * MLA_HG;
      int hg = H - h0 < MLA_HG ? H - h0 : MLA_HG, c0 = 32 * cb, nv = C - c0 >= 32 ? 2 : 1;
      const float *p = scratch + ((long)b * H + h0) * T;
      const int64_t *tb = tables + (long)b * NB;
      __m512 o[MLA_HG][2];
      if (hg == MLA_HG && nv == 2)
        mla_values(kv, tb, bs, W, (int)pos[b], c0, 2, MLA_HG, p, T, o);
      else
        mla_values(kv, tb, bs, W, (int)pos[b], c0, nv, hg, p, T, o);
      for (int h = 0; h < hg; h++)
        for (int v = 0; v < nv; v++)
          _mm256_storeu_si256((__m256i *)(obs + ((long)b * H + h0 + h) * C + c0 + 16 * v),
                              _mm512_cvtepi32_epi16(vf2bf(o[h][v])));
    }
    /* out = bf16(o @ W_UV[h].T) per (row, head) */
#pragma omp for schedule(static)
    for (int item = 0; item < B * H; item++) {
      const uint16_t *wv = wkv + ((long)(item % H) * (dn + dv) + dn) * C, *ob = obs + (long)item * C;
      float o4[4];
      int d = 0;
      for (; d + 4 <= dv; d += 4) {
        dot4(wv + (long)d * C, C, ob, C, o4);
        for (int j = 0; j < 4; j++) out[(long)item * dv + d + j] = f2bf(o4[j]);
      }
      for (; d < dv; d++) out[(long)item * dv + d] = f2bf(dot1(ob, wv + (long)d * C, C));
    }
  }
  return 0;
}
