// Decode attention over an int8 KV cache (the cpu scheme's), for x86-64 with AVX2 + FMA.
//
// One query token per batch row: q (B, Hq, hd) attends slots [0, n) of k, v (B, Hkv, S, hd) int8 with one
// fp32 scale per slot and KV head (B, Hkv, S, 1). The keys and values are read as int8 and never copied out
// as floats: dequantizing the whole cache every step (then SDPA) wrote and re-read 8 bytes per cached value,
// which at 2k+ tokens costs more than the attention itself. The Hq / Hkv query heads of a KV head (GQA) share
// each row as it is read.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

namespace {

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for x <= 0 (softmax after subtracting the max): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts),
// e^r by its degree-6 Taylor polynomial (truncation < 1.2e-7 relative), times 2^n through the exponent bits.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // below, e^x underflows to 0 in float anyway
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline __m256 int8x8_to_float(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One KV head and its G query heads: q (G, hd) -> out (G, hd). k, v: the head's (S, hd) rows; ks, vs: (S,).
void attend_head(const float* q, int64_t G, const int8_t* k, const float* ks, const int8_t* v, const float* vs,
                 int64_t n, int64_t hd, float sm_scale, float* out, std::vector<float>& scores,
                 std::vector<float>& row) {
  scores.resize(G * n + 8);
  row.resize(hd);
  // Scores: each key row converted once, dotted with every query head.
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t d = 0; d < hd; d += 8) _mm256_storeu_ps(row.data() + d, int8x8_to_float(k + s * hd + d));
    const float scale = ks[s] * sm_scale;
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * hd + d), _mm256_loadu_ps(row.data() + d), acc);
      scores[g * n + s] = hsum8(acc) * scale;
    }
  }
  // Softmax per query head, each probability then folded with its value row's scale.
  std::vector<float> inv_sum(G);
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores.data() + g * n;
    float mx = -INFINITY;
    for (int64_t s = 0; s < n; ++s) mx = std::max(mx, sc[s]);
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sc + s), vmx));
      vsum = _mm256_add_ps(vsum, e);
      _mm256_storeu_ps(sc + s, _mm256_mul_ps(e, _mm256_loadu_ps(vs + s)));
    }
    float sum = hsum8(vsum);
    for (; s < n; ++s) {
      float e[8];
      _mm256_storeu_ps(e, exp_nonpositive(_mm256_set1_ps(sc[s] - mx)));
      sum += e[0];
      sc[s] = e[0] * vs[s];
    }
    inv_sum[g] = 1.0f / sum;
  }
  // Output: the value rows weighted by the probabilities, each row converted once.
  std::fill(out, out + G * hd, 0.0f);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t d = 0; d < hd; d += 8) _mm256_storeu_ps(row.data() + d, int8x8_to_float(v + s * hd + d));
    for (int64_t g = 0; g < G; ++g) {
      const __m256 w = _mm256_set1_ps(scores[g * n + s]);
      float* o = out + g * hd;
      for (int64_t d = 0; d < hd; d += 8)
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(row.data() + d), _mm256_loadu_ps(o + d)));
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < hd; ++d) out[g * hd + d] *= inv_sum[g];
}

}  // namespace

torch::Tensor int8_kv_attention(torch::Tensor q, torch::Tensor k, torch::Tensor k_scale, torch::Tensor v,
                                torch::Tensor v_scale, int64_t n, double sm_scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat && q.is_contiguous(), "q must be contiguous float (B, Hq, hd)");
  TORCH_CHECK(k.dim() == 4 && k.scalar_type() == torch::kChar && k.is_contiguous() && v.sizes() == k.sizes() &&
              v.scalar_type() == torch::kChar && v.is_contiguous(), "k and v must be contiguous int8 (B, Hkv, S, hd)");
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), hd = k.size(3), Hq = q.size(1);
  TORCH_CHECK(q.size(0) == B && q.size(2) == hd && Hq % Hkv == 0, "q (B, Hq, hd) does not match k (B, Hkv, S, hd)");
  TORCH_CHECK(hd % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(k_scale.scalar_type() == torch::kFloat && k_scale.is_contiguous() && k_scale.numel() == B * Hkv * S &&
              v_scale.scalar_type() == torch::kFloat && v_scale.is_contiguous() && v_scale.numel() == B * Hkv * S,
              "scales must be contiguous float (B, Hkv, S, 1)");
  TORCH_CHECK(n >= 1 && n <= S, "n must be in [1, S]");
  const int64_t G = Hq / Hkv;
  auto out = torch::empty({B, Hq, hd}, torch::kFloat);
  const float* qp = q.data_ptr<float>();
  const int8_t *kp = k.data_ptr<int8_t>(), *vp = v.data_ptr<int8_t>();
  const float *ksp = k_scale.data_ptr<float>(), *vsp = v_scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, row;
    for (int64_t i = i0; i < i1; ++i)  // i = b * Hkv + h: its query heads are i * G ... i * G + G - 1
      attend_head(qp + i * G * hd, G, kp + i * S * hd, ksp + i * S, vp + i * S * hd, vsp + i * S, n, hd,
                  static_cast<float>(sm_scale), op + i * G * hd, scores, row);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(mobilellm, m) {
  m.def("int8_kv_attention(Tensor q, Tensor k, Tensor k_scale, Tensor v, Tensor v_scale, SymInt n, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mobilellm, CPU, m) {
  m.impl("int8_kv_attention", &int8_kv_attention);
}
