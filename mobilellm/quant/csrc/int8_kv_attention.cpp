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

#include "avx2_common.h"
#include <cmath>
#include <vector>

namespace {

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

// Slots per tile: their int8 rows are converted to float once into an L1-resident buffer, then read by every
// query head of the KV head (the int8 -> float conversion per head and slot took most of the time).
constexpr int64_t TILE = 16;

// rows (n, hd) int8 -> out (n, hd) float.
inline void rows_to_float(const int8_t* rows, int64_t n, int64_t hd, float* out) {
  for (int64_t i = 0; i < n * hd; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                  _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows + i)))));
}

// The sums of four vectors' lanes: [sum a, sum b, sum c, sum d].
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// q (hd) against `ts` float key rows kf (ts, hd): scores[s] = (q . kf[s]) * scale[s]; four rows at a time, each
// with its own accumulator (one accumulator chained every FMA on the previous one).
inline void tile_scores(const float* q, const float* kf, int64_t ts, int64_t hd, const float* scale, float* scores) {
  int64_t s = 0;
  for (; s + 4 <= ts; s += 4) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      a0 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kf + s * hd + d), a0);
      a1 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kf + (s + 1) * hd + d), a1);
      a2 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kf + (s + 2) * hd + d), a2);
      a3 = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kf + (s + 3) * hd + d), a3);
    }
    _mm_storeu_ps(scores + s, _mm_mul_ps(hsum4(a0, a1, a2, a3), _mm_loadu_ps(scale + s)));
  }
  for (; s < ts; ++s) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kf + s * hd + d), a);
    scores[s] = hsum8(a) * scale[s];
  }
}

// out (hd) += sum_s w[s] * vf[s] over `ts` float value rows; 32 dims (four registers) at a time.
inline void tile_values(const float* w, const float* vf, int64_t ts, int64_t hd, float* out) {
  int64_t d = 0;
  for (; d + 32 <= hd; d += 32) {
    __m256 a0 = _mm256_loadu_ps(out + d), a1 = _mm256_loadu_ps(out + d + 8), a2 = _mm256_loadu_ps(out + d + 16),
           a3 = _mm256_loadu_ps(out + d + 24);
    for (int64_t s = 0; s < ts; ++s) {
      const __m256 ws = _mm256_broadcast_ss(w + s);
      const float* row = vf + s * hd + d;
      a0 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row), a0);
      a1 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row + 8), a1);
      a2 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row + 16), a2);
      a3 = _mm256_fmadd_ps(ws, _mm256_loadu_ps(row + 24), a3);
    }
    _mm256_storeu_ps(out + d, a0);
    _mm256_storeu_ps(out + d + 8, a1);
    _mm256_storeu_ps(out + d + 16, a2);
    _mm256_storeu_ps(out + d + 24, a3);
  }
  for (; d < hd; d += 8) {
    __m256 a = _mm256_loadu_ps(out + d);
    for (int64_t s = 0; s < ts; ++s) a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + s), _mm256_loadu_ps(vf + s * hd + d), a);
    _mm256_storeu_ps(out + d, a);
  }
}

// One KV head and its G query heads: q (G, hd) -> out (G, hd). k, v: the head's (S, hd) rows; ks, vs: (S,).
void attend_head(const float* q, int64_t G, const int8_t* k, const float* ks, const int8_t* v, const float* vs,
                 int64_t n, int64_t hd, float sm_scale, float* out, std::vector<float>& scores,
                 std::vector<float>& tile) {
  scores.resize(G * n + n);
  tile.resize(TILE * hd);
  float* key_scale = scores.data() + G * n;  // the keys' scales times the softmax scale
  for (int64_t s = 0; s < n; ++s) key_scale[s] = ks[s] * sm_scale;
  for (int64_t s0 = 0; s0 < n; s0 += TILE) {
    const int64_t ts = std::min(TILE, n - s0);
    rows_to_float(k + s0 * hd, ts, hd, tile.data());
    for (int64_t g = 0; g < G; ++g) tile_scores(q + g * hd, tile.data(), ts, hd, key_scale + s0, scores.data() + g * n + s0);
  }
  // Softmax per query head, each probability then folded with its value row's scale.
  std::vector<float> inv_sum(G);
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores.data() + g * n;
    __m256 vmax8 = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vmax8 = _mm256_max_ps(vmax8, _mm256_loadu_ps(sc + i));
    float lanes[8], mx = -INFINITY;
    _mm256_storeu_ps(lanes, vmax8);
    for (float lane : lanes) mx = std::max(mx, lane);
    for (; i < n; ++i) mx = std::max(mx, sc[i]);
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
  std::fill(out, out + G * hd, 0.0f);
  for (int64_t s0 = 0; s0 < n; s0 += TILE) {
    const int64_t ts = std::min(TILE, n - s0);
    rows_to_float(v + s0 * hd, ts, hd, tile.data());
    for (int64_t g = 0; g < G; ++g) tile_values(scores.data() + g * n + s0, tile.data(), ts, hd, out + g * hd);
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < hd; ++d) out[g * hd + d] *= inv_sum[g];
}

}  // namespace

// Row b of q (B, Hq, hd) attends slots [0, n_b) of store row r_b of k, v (N, Hkv, S, hd): r_b = rows[b] and
// n_b = n[b] when given (continuous batching: a slot cache of N sequences, each at its own length), else r_b = b
// and n_b = n_all. Every (row, KV head) goes through the same attend_head, so each row's numbers equal that
// row's call alone, and one call covers the whole batch.
static torch::Tensor attend_rows(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& k_scale,
                                 const torch::Tensor& v, const torch::Tensor& v_scale, const int64_t* rp,
                                 const int64_t* np, int64_t n_all, double sm_scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat && q.is_contiguous(), "q must be contiguous float (B, Hq, hd)");
  TORCH_CHECK(k.dim() == 4 && k.scalar_type() == torch::kChar && k.is_contiguous() && v.sizes() == k.sizes() &&
              v.scalar_type() == torch::kChar && v.is_contiguous(), "k and v must be contiguous int8 (N, Hkv, S, hd)");
  const int64_t N = k.size(0), Hkv = k.size(1), S = k.size(2), hd = k.size(3), B = q.size(0), Hq = q.size(1);
  TORCH_CHECK(q.size(2) == hd && Hq % Hkv == 0 && (rp != nullptr || B == N),
              "q (B, Hq, hd) does not match k (N, Hkv, S, hd)");
  TORCH_CHECK(hd % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(k_scale.scalar_type() == torch::kFloat && k_scale.is_contiguous() && k_scale.numel() == N * Hkv * S &&
              v_scale.scalar_type() == torch::kFloat && v_scale.is_contiguous() && v_scale.numel() == N * Hkv * S,
              "scales must be contiguous float (N, Hkv, S, 1)");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = rp ? rp[b] : b, nb = np ? np[b] : n_all;
    TORCH_CHECK(r >= 0 && r < N && nb >= 1 && nb <= S, "row ", b, ": store row ", r, " must be in [0, ", N,
                ") and n ", nb, " in [1, ", S, "]");
  }
  const int64_t G = Hq / Hkv;
  auto out = torch::empty({B, Hq, hd}, torch::kFloat);
  const float* qp = q.data_ptr<float>();
  const int8_t *kp = k.data_ptr<int8_t>(), *vp = v.data_ptr<int8_t>();
  const float *ksp = k_scale.data_ptr<float>(), *vsp = v_scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores, tile;
    for (int64_t i = i0; i < i1; ++i) {  // i = b * Hkv + h; its store head is r_b * Hkv + h
      const int64_t b = i / Hkv, j = (rp ? rp[b] : b) * Hkv + i % Hkv;
      attend_head(qp + i * G * hd, G, kp + j * S * hd, ksp + j * S, vp + j * S * hd, vsp + j * S,
                  np ? np[b] : n_all, hd, static_cast<float>(sm_scale), op + i * G * hd, scores, tile);
    }
  });
  return out;
}

// One sequence per row of k, v (B, Hkv, S, hd), all at length n.
torch::Tensor int8_kv_attention(torch::Tensor q, torch::Tensor k, torch::Tensor k_scale, torch::Tensor v,
                                torch::Tensor v_scale, int64_t n, double sm_scale) {
  return attend_rows(q, k, k_scale, v, v_scale, nullptr, nullptr, n, sm_scale);
}

// Continuous batching: rows (B,) picks each query row's sequence in the slot cache, n (B,) its length.
torch::Tensor int8_kv_attention_rows(torch::Tensor q, torch::Tensor k, torch::Tensor k_scale, torch::Tensor v,
                                     torch::Tensor v_scale, torch::Tensor rows, torch::Tensor n, double sm_scale) {
  TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.dim() == 1 && rows.size(0) == q.size(0) &&
              n.scalar_type() == torch::kLong && n.dim() == 1 && n.size(0) == q.size(0), "rows and n must be int64 (B,)");
  const auto rows_c = rows.contiguous(), n_c = n.contiguous();
  return attend_rows(q, k, k_scale, v, v_scale, rows_c.data_ptr<int64_t>(), n_c.data_ptr<int64_t>(), 0, sm_scale);
}

TORCH_LIBRARY_FRAGMENT(mobilellm, m) {
  m.def("int8_kv_attention(Tensor q, Tensor k, Tensor k_scale, Tensor v, Tensor v_scale, SymInt n, float scale) -> Tensor");
  m.def("int8_kv_attention_rows(Tensor q, Tensor k, Tensor k_scale, Tensor v, Tensor v_scale, Tensor rows, Tensor n, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mobilellm, CPU, m) {
  m.impl("int8_kv_attention", &int8_kv_attention);
  m.impl("int8_kv_attention_rows", &int8_kv_attention_rows);
}
