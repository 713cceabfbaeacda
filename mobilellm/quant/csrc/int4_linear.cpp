// Packed-int4 linear layers for x86-64 CPUs with AVX2 + FMA + F16C (built at first use by kernels.py).
//
// Weights: uint8 (N, K/2); inside every 32-column block, byte i holds column i (low nibble) and column
// i + 16 (high nibble), each stored as value + 8 (values in [-8, 7]). Scales: (N, K/G), float or half.
//
// int4_linear_a8: int8 dynamic asymmetric per-token activations (the cpu scheme). Each row of x is
// quantized here with exactly the formulas of mobilellm/quant/math.py (same IEEE float ops, round half
// to even), then every 32-block contributes sum (u - zpu) * w exactly in integers, with u = xq + 128.
// int4_linear_f32: weight-only (float activations), for the accelerator scheme on a CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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

// Per-token int8 qparams and values, bit-identical to math.quantize_int8_per_token.
void quantize_row(const float* x, int64_t K, uint8_t* u, float* scale_out, int32_t* zpu_out) {
  float lo = 0.f, hi = 0.f;
  for (int64_t k = 0; k < K; ++k) { lo = std::min(lo, x[k]); hi = std::max(hi, x[k]); }
  float scale = std::max((hi - lo) / 255.0f, 1e-9f);
  float zp = std::min(std::max(-128.0f - std::nearbyint(lo / scale), -128.0f), 127.0f);
  for (int64_t k = 0; k < K; ++k) {
    float q = std::min(std::max(std::nearbyint(x[k] / scale) + zp, -128.0f), 127.0f);
    u[k] = static_cast<uint8_t>(static_cast<int32_t>(q) + 128);
  }
  *scale_out = scale;
  *zpu_out = static_cast<int32_t>(zp) + 128;
}

template <typename S>
void a8_rows(const uint8_t* u, const float* xs, const int32_t* zpu, int64_t M, const uint8_t* w,
             const S* sc, int64_t N, int64_t K, int64_t G, float* y) {
  const int64_t n_groups = K / G, blocks = G / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = w + n * (K / 2);
      const S* sr = sc + n * n_groups;
      for (int64_t m = 0; m < M; ++m) {
        const uint8_t* um = u + m * K;
        const __m256i zv = _mm256_set1_epi8(static_cast<char>(zpu[m]));
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < n_groups; ++g) {
          __m256i gsum = _mm256_setzero_si256();
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t col = (g * blocks + b) * 32;
            __m256i wv = unpack32(wr + col / 2);
            __m256i uv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(um + col));
            // (u - zpu) * w summed in pairs; |value| <= 255 * 8 * 2 per term, fits int16.
            __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(uv, wv), _mm256_maddubs_epi16(zv, wv));
            gsum = _mm256_add_epi32(gsum, _mm256_madd_epi16(p, ones));
          }
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(gsum), _mm256_set1_ps(to_float(sr[g])), acc);
        }
        y[m * N + n] = hsum(acc) * xs[m];
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
        y[m * N + n] = hsum(acc);
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
  const int64_t M = x.size(0), K = x.size(1);
  auto u = torch::empty({M, K}, torch::kByte);
  auto scale = torch::empty({M}, torch::kFloat);
  auto zpu = torch::empty({M}, torch::kInt);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, K, u.data_ptr<uint8_t>() + m * K, scale.data_ptr<float>() + m,
                 zpu.data_ptr<int32_t>() + m);
  return {(u.to(torch::kInt) - 128).to(torch::kChar), scale, zpu - 128};
}

torch::Tensor int4_linear_a8(torch::Tensor x, torch::Tensor w, torch::Tensor sc, int64_t G) {
  check(x, w, sc, G);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto u = torch::empty({M, K}, torch::kByte);
  std::vector<float> xs(M);
  std::vector<int32_t> zpu(M);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, K, u.data_ptr<uint8_t>() + m * K, &xs[m], &zpu[m]);
  auto y = torch::empty({M, N}, torch::kFloat);
  if (sc.scalar_type() == torch::kHalf)
    a8_rows(u.data_ptr<uint8_t>(), xs.data(), zpu.data(), M, w.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(), N, K, G, y.data_ptr<float>());
  else
    a8_rows(u.data_ptr<uint8_t>(), xs.data(), zpu.data(), M, w.data_ptr<uint8_t>(), sc.data_ptr<float>(), N, K, G, y.data_ptr<float>());
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear_a8", &int4_linear_a8, "int8 dynamic activations x packed int4 weights");
  m.def("int4_linear_f32", &int4_linear_f32, "float activations x packed int4 weights");
  m.def("quantize_rows_int8", &quantize_rows_int8, "per-token int8 quantization (test hook)");
}
