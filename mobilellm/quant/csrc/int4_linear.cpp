// Packed-int4 linear layers for x86-64 CPUs with AVX2 + FMA + F16C (built at first use by kernels.py).
//
// Weights: uint8; inside every 32-column block of a row, byte i holds column i (low nibble) and column
// i + 16 (high nibble), each stored as value + 8 (values in [-8, 7]).
//
// int4_linear_a8: int8 dynamic asymmetric per-token activations (the cpu scheme). Weights and scales come in
// 8-row panels (mobilellm/quant/layout.py): per panel and 32-block, 128 bytes = four 32-byte words, word q
// holding bytes 4q..4q+3 of the block of rows 0..7 in turn; then the 8 rows' scales of each group together.
// So one load gives 8 weights of each of 8 rows, eight outputs are computed at once (one int32 lane each:
// no horizontal sums, no per-row set-up), and a panel is one sequential stream for the prefetcher.
// Each row of x is quantized here with exactly the formulas of mobilellm/quant/math.py (same IEEE float
// ops, round half to even); each group's integer dot product is exact, groups are combined in float.
// int4_linear_f32: weight-only (float activations, rows in order), for the accelerator scheme on a CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "avx2_common.h"
#include <cmath>
#include <cstring>

// A panel-block is 128 bytes; the next few are fetched ahead. On pro-1b's shapes (2 threads) 512-1024 bytes
// ahead were alike and 2048 worse.
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 768
#endif

constexpr int64_t PANEL = 8;

namespace {

// 16 packed bytes -> 32 signed int8 weights in column order.
inline __m256i unpack32(const uint8_t* p) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i mask = _mm_set1_epi8(0x0F);
  __m128i lo = _mm_and_si128(b, mask);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  __m256i w = _mm256_set_m128i(hi, lo);
  return _mm256_sub_epi8(w, _mm256_set1_epi8(8));
}

inline float to_float(float s) { return s; }
inline float to_float(at::Half s) { return _cvtsh_ss(s.x); }

// Per-token int8 qparams and values, bit-identical to math.quantize_int8_per_token (IEEE division and
// round-half-to-even in both), stored as u = q + 128 in [0, 255], and the sum of u over each 32-block.
void quantize_row(const float* x, int64_t K, uint8_t* u, float* block_usum, float* scale_out, int32_t* zpu_out) {
  __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    vlo = _mm256_min_ps(vlo, v);
    vhi = _mm256_max_ps(vhi, v);
  }
  float lo_l[8], hi_l[8];
  _mm256_storeu_ps(lo_l, vlo);
  _mm256_storeu_ps(hi_l, vhi);
  float lo = 0.f, hi = 0.f;
  for (int i = 0; i < 8; ++i) { lo = std::min(lo, lo_l[i]); hi = std::max(hi, hi_l[i]); }
  const float scale = std::max((hi - lo) / 255.0f, 1e-9f);
  const float zp = std::min(std::max(-128.0f - std::nearbyint(lo / scale), -128.0f), 127.0f);
  const __m256 vscale = _mm256_set1_ps(scale), vzp = _mm256_set1_ps(zp + 128.0f);
  const __m256 vmin = _mm256_set1_ps(0.0f), vmax = _mm256_set1_ps(255.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
  auto q8 = [&](const float* p) {  // clamp(round(x / scale) + zp, -128, 127) + 128, as int32
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, vzp), vmin), vmax));
  };
  auto block = [&](int64_t k) {  // 32 values in column order, and their sum
    const __m256i ab = _mm256_packus_epi32(q8(x + k), q8(x + k + 8));
    const __m256i cd = _mm256_packus_epi32(q8(x + k + 16), q8(x + k + 24));
    const __m256i q = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
    const __m256i s = _mm256_sad_epu8(q, _mm256_setzero_si256());  // four 64-bit partial sums
    block_usum[k / 32] = static_cast<float>(_mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) +
                                            _mm256_extract_epi64(s, 2) + _mm256_extract_epi64(s, 3));
    return q;
  };
  for (int64_t k = 0; k < K; k += 32)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + k), block(k));
  *scale_out = scale;
  *zpu_out = static_cast<int32_t>(zp) + 128;
}

inline __m256 load8(const float* s) { return _mm256_loadu_ps(s); }
inline __m256 load8(const at::Half* s) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))); }

// The cpu-scheme dot product, one token against one panel (8 rows). With u = q + 128, wu = w + 8 (the stored
// nibble) and zpu = zp + 128, the 32-block b of row n, with scale s_b, contributes
//   s_b * sum (u - zpu) * w = s_b * (sum u * wu - 8 * usum_b - zpu * wsum_b).
// - sum u * wu: a word's nibbles are masked (columns 4q..4q+3 of each row) or shifted and masked (16+4q..),
//   multiplied by the matching 4 activations broadcast to every lane (maddubs: u unsigned, wu <= 15), and
//   four words' int16 pair sums add up without overflow (4 * 2 * 255 * 15 < 2^15) before one madd widens.
// - 8 * sum_b s_b * usum_b: one FMA per block, beside the main one.
// - zpu * C[n], C[n] = sum_b s_b * wsum_b: one constant per row, computed once per matrix (int4_row_correction).
// sp: this panel's scales, (K/G groups) x 8 rows.
template <typename S>
inline __m256 panel_dot(const uint8_t* u, const float* usum, float xs, float zpu, const uint8_t* wp, const S* sp,
                        const float* corr, int64_t K, int64_t G) {
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t n_blocks = K / 32, blocks_per_group = G / 32;
  __m256 acc = _mm256_setzero_ps(), off = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const uint8_t* p = wp + b * 4 * 32;
    _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_BYTES), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_BYTES + 64), _MM_HINT_T0);
    const uint8_t* ub = u + b * 32;
    __m256i sum_lo = _mm256_setzero_si256(), sum_hi = _mm256_setzero_si256();
    for (int q = 0; q < 4; ++q) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * q));
      int32_t a_lo, a_hi;  // activations of columns 4q..4q+3 and 16+4q..16+4q+3
      std::memcpy(&a_lo, ub + 4 * q, 4);
      std::memcpy(&a_hi, ub + 16 + 4 * q, 4);
      sum_lo = _mm256_add_epi16(sum_lo, _mm256_maddubs_epi16(_mm256_set1_epi32(a_lo), _mm256_and_si256(w, mask)));
      sum_hi = _mm256_add_epi16(sum_hi, _mm256_maddubs_epi16(_mm256_set1_epi32(a_hi),
                                                             _mm256_and_si256(_mm256_srli_epi16(w, 4), mask)));
    }
    const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(sum_lo, ones), _mm256_madd_epi16(sum_hi, ones));
    const __m256 s = load8(sp + (b / blocks_per_group) * PANEL);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc);
    off = _mm256_fmadd_ps(s, _mm256_set1_ps(usum[b]), off);
  }
  const __m256 centred = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), off, acc);
  return _mm256_mul_ps(_mm256_fnmadd_ps(_mm256_set1_ps(zpu), _mm256_loadu_ps(corr), centred), _mm256_set1_ps(xs));
}

template <typename S>
void a8_panels(const uint8_t* u, const float* usum, const float* xs, const int32_t* zpu, int64_t M, const uint8_t* w,
               const S* sc, const float* corr, int64_t N, int64_t K, int64_t G, float* y) {
  const int64_t n_panels = (N + PANEL - 1) / PANEL, n_groups = K / G;
  // Panels outer, tokens inner: a panel (4 KB at K = 1280) stays in L1 while every token (prefill) passes by.
  at::parallel_for(0, n_panels, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t rows = std::min(PANEL, N - p * PANEL);
      for (int64_t m = 0; m < M; ++m) {
        const __m256 out = panel_dot(u + m * K, usum + m * (K / 32), xs[m], static_cast<float>(zpu[m]),
                                     w + p * PANEL * (K / 2), sc + p * PANEL * n_groups, corr + p * PANEL, K, G);
        float* dst = y + m * N + p * PANEL;
        if (rows == PANEL) {
          _mm256_storeu_ps(dst, out);
        } else {
          float tail[PANEL];
          _mm256_storeu_ps(tail, out);
          for (int64_t r = 0; r < rows; ++r) dst[r] = tail[r];
        }
      }
    }
  });
}

// C[n] = sum_g scale[n, g] * (sum of the signed int4 values of group g of row n), for panel-layout weights.
template <typename S>
void row_correction(const uint8_t* w, const S* sc, int64_t n_rows, int64_t K, int64_t G, float* corr) {
  const int64_t n_groups = K / G, words_per_group = G / 8;  // a 4-byte word holds 8 values
  at::parallel_for(0, n_rows / PANEL, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* panel = w + p * PANEL * (K / 2);
      for (int64_t r = 0; r < PANEL; ++r) {
        float c = 0.f;
        for (int64_t g = 0; g < n_groups; ++g) {
          int32_t s = 0;
          for (int64_t word = g * words_per_group; word < (g + 1) * words_per_group; ++word)
            for (int64_t i = 0; i < 4; ++i) {
              const uint8_t byte = panel[(word * PANEL + r) * 4 + i];
              s += (byte & 0x0F) + (byte >> 4) - 16;
            }
          c += to_float(sc[(p * n_groups + g) * PANEL + r]) * static_cast<float>(s);
        }
        corr[p * PANEL + r] = c;
      }
    }
  });
}

template <typename S>
void f32_rows(const float* x, int64_t M, const uint8_t* w, const S* sc, int64_t N, int64_t K, int64_t G,
              float* y) {
  const int64_t n_groups = K / G, blocks = G / 32;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = w + n * (K / 2);
      const S* sr = sc + n * n_groups;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < n_groups; ++g) {
          __m256 gacc = _mm256_setzero_ps();
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t col = (g * blocks + b) * 32;
            __m256i wv = unpack32(wr + col / 2);
            __m128i w_lo = _mm256_castsi256_si128(wv), w_hi = _mm256_extracti128_si256(wv, 1);
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w_lo));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w_lo, 8)));
            __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w_hi));
            __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w_hi, 8)));
            gacc = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + col), gacc);
            gacc = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + col + 8), gacc);
            gacc = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + col + 16), gacc);
            gacc = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + col + 24), gacc);
          }
          acc = _mm256_fmadd_ps(gacc, _mm256_set1_ps(to_float(sr[g])), acc);
        }
        y[m * N + n] = hsum8(acc);
      }
    }
  });
}

void check(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sc, int64_t G) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be contiguous float (M, K)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kByte && w.is_contiguous(), "weights must be contiguous uint8 (N, K/2)");
  TORCH_CHECK(w.size(1) * 2 == x.size(1), "weights (N, K/2) do not match x (M, K)");
  TORCH_CHECK(G % 32 == 0 && x.size(1) % G == 0, "group size must be a multiple of 32 dividing K");
  TORCH_CHECK(sc.is_contiguous() && sc.size(0) == w.size(0) && sc.size(1) == x.size(1) / G, "scales must be (N, K/G)");
  TORCH_CHECK(sc.scalar_type() == torch::kFloat || sc.scalar_type() == torch::kHalf, "scales must be float32 or float16");
}

}  // namespace

// Test hook: x (M, K) float -> (int8 values (M, K), scale (M), zero point (M)), as math.quantize_int8_per_token.
std::vector<torch::Tensor> quantize_rows_int8(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be contiguous float (M, K)");
  TORCH_CHECK(x.size(1) % 32 == 0, "K must be a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1);
  auto u = torch::empty({M, K}, torch::kByte);
  auto scale = torch::empty({M}, torch::kFloat);
  auto zpu = torch::empty({M}, torch::kInt);
  std::vector<float> usum(K / 32);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, K, u.data_ptr<uint8_t>() + m * K, usum.data(),
                 scale.data_ptr<float>() + m, zpu.data_ptr<int32_t>() + m);
  return {(u.to(torch::kInt) - 128).to(torch::kChar), scale, zpu - 128};
}

// Panel-layout weights (N rounded up to 8 rows, K/2) and scales (same rows, K/G).
void check_panels(const torch::Tensor& w, const torch::Tensor& sc, int64_t G) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kByte && w.is_contiguous() && w.size(0) % PANEL == 0,
              "weights must be contiguous uint8 8-row panels (N rounded up to 8, K/2): see layout.to_panels");
  TORCH_CHECK(G % 32 == 0 && (w.size(1) * 2) % G == 0, "group size must be a multiple of 32 dividing K");
  TORCH_CHECK(sc.is_contiguous() && sc.dim() == 2 && sc.size(0) == w.size(0) && sc.size(1) == w.size(1) * 2 / G,
              "scales must be panels of (N rounded up to 8, K/G)");
  TORCH_CHECK(sc.scalar_type() == torch::kFloat || sc.scalar_type() == torch::kHalf, "scales must be float32 or float16");
}

torch::Tensor int4_row_correction(torch::Tensor w, torch::Tensor sc, int64_t G) {
  check_panels(w, sc, G);
  const int64_t N = w.size(0), K = w.size(1) * 2;
  auto corr = torch::empty({N}, torch::kFloat);
  if (sc.scalar_type() == torch::kHalf)
    row_correction(w.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(), N, K, G, corr.data_ptr<float>());
  else
    row_correction(w.data_ptr<uint8_t>(), sc.data_ptr<float>(), N, K, G, corr.data_ptr<float>());
  return corr;
}

// y (M, N) for x (M, K); w, sc panels of N rows (padding rows are computed and dropped).
torch::Tensor int4_linear_a8(torch::Tensor x, torch::Tensor w, torch::Tensor sc, torch::Tensor corr, int64_t G,
                             int64_t N) {
  check_panels(w, sc, G);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be contiguous float (M, K)");
  TORCH_CHECK(w.size(1) * 2 == x.size(1), "weights (N, K/2) do not match x (M, K)");
  TORCH_CHECK(N > w.size(0) - PANEL && N <= w.size(0), "out_features does not match the weight panels");
  TORCH_CHECK(corr.scalar_type() == torch::kFloat && corr.is_contiguous() && corr.dim() == 1 && corr.size(0) == w.size(0),
              "row correction must be float (N rounded up to 8,): see int4_row_correction");
  const int64_t M = x.size(0), K = x.size(1);
  auto u = torch::empty({M, K}, torch::kByte);
  std::vector<float> usum(M * (K / 32)), xs(M);
  std::vector<int32_t> zpu(M);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, K, u.data_ptr<uint8_t>() + m * K, usum.data() + m * (K / 32), &xs[m], &zpu[m]);
  auto y = torch::empty({M, N}, torch::kFloat);
  if (sc.scalar_type() == torch::kHalf)
    a8_panels(u.data_ptr<uint8_t>(), usum.data(), xs.data(), zpu.data(), M, w.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(),
              corr.data_ptr<float>(), N, K, G, y.data_ptr<float>());
  else
    a8_panels(u.data_ptr<uint8_t>(), usum.data(), xs.data(), zpu.data(), M, w.data_ptr<uint8_t>(), sc.data_ptr<float>(),
              corr.data_ptr<float>(), N, K, G, y.data_ptr<float>());
  return y;
}

torch::Tensor int4_linear_f32(torch::Tensor x, torch::Tensor w, torch::Tensor sc, int64_t G) {
  check(x, w, sc, G);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, torch::kFloat);
  if (sc.scalar_type() == torch::kHalf)
    f32_rows(x.data_ptr<float>(), M, w.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(), N, K, G, y.data_ptr<float>());
  else
    f32_rows(x.data_ptr<float>(), M, w.data_ptr<uint8_t>(), sc.data_ptr<float>(), N, K, G, y.data_ptr<float>());
  return y;
}

// Dispatcher ops (torch.ops.mobilellm.*): ~2 us per call where a Python custom op costs ~15, and still
// traceable by torch.compile (kernels.py registers their fake implementations).
TORCH_LIBRARY(mobilellm, m) {
  m.def("int4_linear_a8(Tensor x, Tensor w, Tensor scales, Tensor correction, int group_size, SymInt out_features) -> Tensor");
  m.def("int4_linear_f32(Tensor x, Tensor w, Tensor scales, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(mobilellm, CPU, m) {
  m.impl("int4_linear_a8", &int4_linear_a8);
  m.impl("int4_linear_f32", &int4_linear_f32);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear_a8", &int4_linear_a8, "int8 dynamic activations x packed int4 weights");
  m.def("int4_row_correction", &int4_row_correction, "per-row zero-point correction for int4_linear_a8");
  m.def("int4_linear_f32", &int4_linear_f32, "float activations x packed int4 weights");
  m.def("quantize_rows_int8", &quantize_rows_int8, "per-token int8 quantization (test hook)");
}
