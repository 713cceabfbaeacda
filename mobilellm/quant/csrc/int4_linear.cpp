// Packed-int4 linear layers for x86-64 CPUs with AVX2 + FMA + F16C (built at first use by kernels.py).
//
// Weights: uint8 (N, K/2); inside every 32-column block, byte i holds column i (low nibble) and column
// i + 16 (high nibble), each stored as value + 8 (values in [-8, 7]). Scales: (N, K/G), float or half.
//
// int4_linear_a8: int8 dynamic asymmetric per-token activations (the cpu scheme). Each row of x is
// quantized here with exactly the formulas of mobilellm/quant/math.py (same IEEE float ops, round half
// to even); each group's integer dot product is exact, groups are combined in float (see a8_dot).
// int4_linear_f32: weight-only (float activations), for the accelerator scheme on a CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "avx2_common.h"
#include <cmath>

// Measured on pro-1b's shapes with the weights read from memory (benchmarks/int4_decode.py): one row at a
// time (a single sequential stream, which the hardware prefetcher follows best) reached 75-81% of the read
// roofline on one core, 4 interleaved rows 60-69%, 8 rows 41-59%; prefetch distances of 512-1024 bytes
// were alike, 384 and below worse.
#ifndef ROWS_PER_BLOCK
#define ROWS_PER_BLOCK 1
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 768
#endif

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
// `paired`: u in the block-pair layout of a8_dot (per 64 columns: 0-15, 32-47, 16-31, 48-63), else in order.
void quantize_row(const float* x, int64_t K, bool paired, uint8_t* u, float* block_usum, float* scale_out,
                  int32_t* zpu_out) {
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
  for (int64_t k = 0; k < K; k += 64) {
    const __m256i q0 = block(k), q1 = block(k + 32);
    __m256i* out = reinterpret_cast<__m256i*>(u + k);
    _mm256_storeu_si256(out, paired ? _mm256_permute2x128_si256(q0, q1, 0x20) : q0);
    _mm256_storeu_si256(out + 1, paired ? _mm256_permute2x128_si256(q0, q1, 0x31) : q1);
  }
  *scale_out = scale;
  *zpu_out = static_cast<int32_t>(zp) + 128;
}

// The cpu-scheme dot product. With u = q + 128, wu = w + 8 (the stored nibble) and zpu = zp + 128, a 32-block
// b of row n, with scale s_b, contributes s_b * sum (u - zpu) * w = s_b * (sum u * wu - 8 * usum_b - zpu * wsum_b).
// - sum u * wu: the weights are only loaded, masked and shifted, and fed to maddubs (u unsigned, wu <= 15).
//   Two blocks go together: 32 bytes of weights hold the low nibbles (columns 0-15) of blocks 2p and 2p+1,
//   and their high nibbles (16-31) four bits up, so one mask gives [2p: 0-15 | 2p+1: 0-15] and a shift and a
//   mask [2p: 16-31 | 2p+1: 16-31]; the activations are stored in that order (quantize_row, paired). The
//   two maddubs results add in int16 (2 * 2 * 255 * 15 < 2^15), one madd gives 4 lanes per block, and one FMA
//   scales them with [s_2p x4 | s_2p+1 x4].
// - 8 * sum_b s_b * usum_b: the scale row dotted with the token's block sums, 1/32 of the work.
// - zpu * C[n], C[n] = sum_b s_b * wsum_b: one constant per row, computed once per matrix (int4_row_correction).
// R weight rows x one token; sc: the R rows' per-block scales as float, row r at sc + r * (K / 32).
// Four blocks (one 64-byte line of weights) per iteration into two accumulators: with one, every FMA waited
// for the previous one (a 4-5 cycle chain per 32 bytes), which capped a core below its share of bandwidth.
template <int R>
inline void a8_dot(const uint8_t* um, const float* usum, float xs, float zpu, const uint8_t* w, int64_t row_bytes,
                   const float* sc, const float* corr, int64_t K, float* out) {
  const int64_t n_blocks = K / 32;
  const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0F);
  const __m256i first_pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), second_pair = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  // 64 weights (blocks b, b + 1) against their activations: 8 int32 lanes, 4 per block.
  auto pair_dot = [&](const uint8_t* p, int64_t b) {
    const __m256i ua = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(um + b * 32));
    const __m256i ub = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(um + b * 32 + 32));
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i lo = _mm256_and_si256(wv, mask), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(ua, lo), _mm256_maddubs_epi16(ub, hi));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
  };
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 4 <= n_blocks; b += 4) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = w + r * row_bytes + b * 16;
      _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_BYTES), _MM_HINT_T0);
      const __m256 s4 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(sc + r * n_blocks + b));
      acc0[r] = _mm256_fmadd_ps(pair_dot(p, b), _mm256_permutevar8x32_ps(s4, first_pair), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(pair_dot(p + 32, b + 2), _mm256_permutevar8x32_ps(s4, second_pair), acc1[r]);
    }
  }
  for (; b < n_blocks; b += 2) {  // K = 64 (mod 128): one pair left
    for (int r = 0; r < R; ++r) {
      const float* s = sc + r * n_blocks + b;
      acc0[r] = _mm256_fmadd_ps(pair_dot(w + r * row_bytes + b * 16, b),
                                _mm256_set_m128(_mm_broadcast_ss(s + 1), _mm_broadcast_ss(s)), acc0[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 off = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; b += 8)
      off = _mm256_fmadd_ps(_mm256_loadu_ps(sc + r * n_blocks + b), _mm256_loadu_ps(usum + b), off);
    out[r] = (hsum8(_mm256_add_ps(acc0[r], acc1[r])) - 8.0f * hsum8(off) - zpu * corr[r]) * xs;
  }
}

// Per-32-block float scales of `rows` rows (a group of G columns spans G / 32 blocks).
inline void block_scales(const float* s, int64_t n, float* out) { std::copy(s, s + n, out); }
inline void block_scales(const at::Half* s, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(s[i].x);
}

template <typename S>
void block_scales(const S* sc, int64_t rows, int64_t K, int64_t G, float* out) {
  const int64_t n_groups = K / G, per_group = G / 32;
  block_scales(sc, rows * n_groups, out);
  if (per_group == 1) return;
  for (int64_t i = rows * n_groups - 1; i >= 0; --i)  // spread in place, back to front
    for (int64_t j = per_group - 1; j >= 0; --j) out[i * per_group + j] = out[i];
}

template <typename S>
void a8_rows(const uint8_t* u, const float* usum, const float* xs, const int32_t* zpu, int64_t M, const uint8_t* w,
             const S* sc, const float* corr, int64_t N, int64_t K, int64_t G, float* y) {
  constexpr int R = ROWS_PER_BLOCK;
  const int64_t n_blocks = K / 32, row_bytes = K / 2;
  // Weight rows outer, tokens inner: a row stays in L1 while every token (prefill) passes by.
  at::parallel_for(0, (N + R - 1) / R, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> scf(R * n_blocks + 8);  // padded: the off loop reads 8 at a time
    float out[R];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = blk * R, rows = std::min<int64_t>(R, N - n);
      block_scales(sc + n * (K / G), rows, K, G, scf.data());
      for (int64_t m = 0; m < M; ++m) {
        const uint8_t* um = u + m * K;
        const float* us = usum + m * (n_blocks + 8);
        const float zp = static_cast<float>(zpu[m]);
        if (rows == R) {
          a8_dot<R>(um, us, xs[m], zp, w + n * row_bytes, row_bytes, scf.data(), corr + n, K, out);
        } else {
          for (int64_t r = 0; r < rows; ++r)
            a8_dot<1>(um, us, xs[m], zp, w + (n + r) * row_bytes, row_bytes, scf.data() + r * n_blocks, corr + n + r, K, out + r);
        }
        for (int64_t r = 0; r < rows; ++r) y[m * N + n + r] = out[r];  // not std::copy: a memmove call per row
      }
    }
  });
}

// C[n] = sum_g scale[n, g] * (sum of the signed int4 values of group g of row n).
template <typename S>
void row_correction(const uint8_t* w, const S* sc, int64_t N, int64_t K, int64_t G, float* corr) {
  const int64_t n_groups = K / G, row_bytes = K / 2;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float c = 0.f;
      for (int64_t g = 0; g < n_groups; ++g) {
        int32_t s = 0;
        for (int64_t i = g * G / 2; i < (g + 1) * G / 2; ++i) {
          const uint8_t b = w[n * row_bytes + i];
          s += (b & 0x0F) + (b >> 4) - 16;
        }
        c += to_float(sc[n * n_groups + g]) * static_cast<float>(s);
      }
      corr[n] = c;
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
  TORCH_CHECK(x.size(1) % 64 == 0, "K must be a multiple of 64");
  const int64_t M = x.size(0), K = x.size(1);
  auto u = torch::empty({M, K}, torch::kByte);
  auto scale = torch::empty({M}, torch::kFloat);
  auto zpu = torch::empty({M}, torch::kInt);
  std::vector<float> usum(K / 32);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, K, false, u.data_ptr<uint8_t>() + m * K, usum.data(),
                 scale.data_ptr<float>() + m, zpu.data_ptr<int32_t>() + m);
  return {(u.to(torch::kInt) - 128).to(torch::kChar), scale, zpu - 128};
}

torch::Tensor int4_row_correction(torch::Tensor w, torch::Tensor sc, int64_t G) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kByte && w.is_contiguous(), "weights must be contiguous uint8 (N, K/2)");
  check(torch::empty({0, w.size(1) * 2}), w, sc, G);
  const int64_t N = w.size(0), K = w.size(1) * 2;
  auto corr = torch::empty({N}, torch::kFloat);
  if (sc.scalar_type() == torch::kHalf)
    row_correction(w.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(), N, K, G, corr.data_ptr<float>());
  else
    row_correction(w.data_ptr<uint8_t>(), sc.data_ptr<float>(), N, K, G, corr.data_ptr<float>());
  return corr;
}

torch::Tensor int4_linear_a8(torch::Tensor x, torch::Tensor w, torch::Tensor sc, torch::Tensor corr, int64_t G) {
  check(x, w, sc, G);
  TORCH_CHECK(corr.scalar_type() == torch::kFloat && corr.is_contiguous() && corr.dim() == 1 && corr.size(0) == w.size(0),
              "row correction must be float (N,): see int4_row_correction");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto u = torch::empty({M, K}, torch::kByte);
  TORCH_CHECK(K % 64 == 0, "int4_linear_a8 needs K to be a multiple of 64");
  std::vector<float> usum(M * (K / 32 + 8), 0.f), xs(M);  // each row padded by 8 zeros (see a8_dot)
  std::vector<int32_t> zpu(M);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, K, true, u.data_ptr<uint8_t>() + m * K, usum.data() + m * (K / 32 + 8),
                 &xs[m], &zpu[m]);
  auto y = torch::empty({M, N}, torch::kFloat);
  if (sc.scalar_type() == torch::kHalf)
    a8_rows(u.data_ptr<uint8_t>(), usum.data(), xs.data(), zpu.data(), M, w.data_ptr<uint8_t>(), sc.data_ptr<at::Half>(),
            corr.data_ptr<float>(), N, K, G, y.data_ptr<float>());
  else
    a8_rows(u.data_ptr<uint8_t>(), usum.data(), xs.data(), zpu.data(), M, w.data_ptr<uint8_t>(), sc.data_ptr<float>(),
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
  m.def("int4_linear_a8(Tensor x, Tensor w, Tensor scales, Tensor correction, int group_size) -> Tensor");
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
