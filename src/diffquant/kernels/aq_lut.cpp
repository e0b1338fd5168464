// Lookup-table kernels for additive-codebook (AQ) weights on the CPU, fp32.
//
// Weight row o, group j:  W[o, j*g:(j+1)*g] = scale[o] * sum_m codebooks[m, codes[o, j, m]].
// For inputs x laid out token-contiguous, xt[j*g + k, t], the product is
//     y[o, t] = scale[o] * sum_j sum_m T[j, m, codes[o, j, m], t] + bias[o],
//     T[j, m, c, t] = sum_k codebooks[m, c, k] * xt[j*g + k, t]           (the table)
// so a token tile of TT tokens turns every (o, j, m) into one TT-wide vector add of a table row:
// in*M*K multiply-adds per token for the table and out*(in/g)*M adds for the gather-sum, against
// in*out multiply-adds for dense. The table is built and consumed in blocks of JB groups so that the
// block stays in L2 while every output row visits it.
//
// A KAQ convolution is the same product on unfolded patches (F.unfold orders a patch channel-major,
// so group j = one k x k kernel slice of input channel j), which is why one kernel serves both.
//
// Parallel over token tiles when there are at least as many tiles as threads, otherwise over output
// rows. Measured on this project's 2-core AVX-512 machine (benchmarks/kernels.py); a per-token
// scalar-lookup variant for 1-4 tokens was slower than a 4-wide tile and was dropped.
//
// One token (a batch-1 linear) has its own path: the whole table (J*M*K floats) is built once in
// parallel, vectorised over codewords, and each output row is a sum of J*M scalars picked by code,
// done 16 at a time with AVX-512 gathers (a 4-wide tile would waste three lanes of every add).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// A tile of TT tokens is one GCC/Clang vector-extension value of TT fp32 (AVX-512 for 16, AVX for 8,
// SSE for 4), any alignment; written explicitly because the auto-vectoriser kept the table build scalar.
struct AlignedBuf {
  float* p;
  explicit AlignedBuf(int64_t n) {
    p = static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
    TORCH_CHECK(p != nullptr, "out of memory for a lookup table of ", n, " floats");
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

template <int TT>
struct Tile {
  typedef float v __attribute__((vector_size(TT * sizeof(float)), aligned(4)));
};
template <int TT>
inline typename Tile<TT>::v load_tile(const float* p) { return *reinterpret_cast<const typename Tile<TT>::v*>(p); }
template <int TT>
inline void store_tile(float* p, typename Tile<TT>::v v) { *reinterpret_cast<typename Tile<TT>::v*>(p) = v; }

// lut[(jj*M + m)*K + c][t] = sum_k cb[m, c, k] * xtile[j*g + k][t] for groups j0..j1 (jj = j - j0);
// the g input rows of a group stay in registers while every codeword passes over them.
template <int TT, int G>
void build_block(const float* __restrict xtile, const float* __restrict cb, int64_t M, int64_t K, int64_t g,
                 int64_t j0, int64_t j1, float* __restrict lut) {
  using vt = typename Tile<TT>::v;
  const int64_t gg = G > 0 ? G : g;
  for (int64_t j = j0; j < j1; ++j) {
    vt xs[G > 0 ? G : 1];
    if constexpr (G > 0)
      for (int k = 0; k < G; ++k) xs[k] = load_tile<TT>(xtile + (j * G + k) * TT);
    for (int64_t m = 0; m < M; ++m) {
      float* dst = lut + ((j - j0) * M + m) * K * TT;
      const float* wm = cb + m * K * gg;
      int64_t c = 0;
      if constexpr (G > 0) {
        for (; c + 4 <= K; c += 4) {  // four codewords at once: independent FMA chains
          const float* w = wm + c * G;
          vt r0 = {}, r1 = {}, r2 = {}, r3 = {};
          for (int k = 0; k < G; ++k) {
            r0 += w[k] * xs[k];
            r1 += w[G + k] * xs[k];
            r2 += w[2 * G + k] * xs[k];
            r3 += w[3 * G + k] * xs[k];
          }
          store_tile<TT>(dst + c * TT, r0);
          store_tile<TT>(dst + (c + 1) * TT, r1);
          store_tile<TT>(dst + (c + 2) * TT, r2);
          store_tile<TT>(dst + (c + 3) * TT, r3);
        }
      }
      for (; c < K; ++c) {
        const float* w = wm + c * gg;
        vt r = {};
        for (int64_t k = 0; k < gg; ++k) r += w[k] * load_tile<TT>(xtile + (j * gg + k) * TT);
        store_tile<TT>(dst + c * TT, r);
      }
    }
  }
}

template <int TT>
inline void build_any(const float* xtile, const float* cb, int64_t M, int64_t K, int64_t g, int64_t j0, int64_t j1,
                      float* lut) {
  switch (g) {
    case 2: return build_block<TT, 2>(xtile, cb, M, K, g, j0, j1, lut);
    case 4: return build_block<TT, 4>(xtile, cb, M, K, g, j0, j1, lut);
    case 8: return build_block<TT, 8>(xtile, cb, M, K, g, j0, j1, lut);
    case 9: return build_block<TT, 9>(xtile, cb, M, K, g, j0, j1, lut);
    case 16: return build_block<TT, 16>(xtile, cb, M, K, g, j0, j1, lut);
    default: return build_block<TT, 0>(xtile, cb, M, K, g, j0, j1, lut);
  }
}

template <int TT, typename code_t>
void many_tokens_impl(const float* __restrict xt, int64_t in_flat, int64_t T, const float* __restrict cb, int64_t M,
                      int64_t K, int64_t g, const code_t* __restrict codes, int64_t O, const float* __restrict scale,
                      const float* __restrict bias, float* __restrict yt, int64_t jb_groups) {
  const int64_t J = in_flat / g;
  const int64_t ntiles = (T + TT - 1) / TT;
  const int64_t JB = std::max<int64_t>(1, std::min<int64_t>(jb_groups, J));
  // parallel over token tiles when there are enough, otherwise over output rows (each thread then
  // builds the same small table: cheaper than a second parallel region for a few tiles)
  const int nth = at::get_num_threads();
  const bool by_tiles = ntiles >= nth;
  auto work = [&](int64_t tile_begin, int64_t tile_end, int64_t o_begin, int64_t o_end) {
    // 64-byte aligned so that a 16-float table row is one cache line, not two
    AlignedBuf lut_buf(JB * M * K * TT), xtile_buf(in_flat * TT), acc_buf((o_end - o_begin) * TT);
    float* __restrict lut = lut_buf.p;
    float* __restrict xtile = xtile_buf.p;
    float* __restrict acc = acc_buf.p;
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t t0 = tile * TT, tt = std::min<int64_t>(TT, T - t0);
      for (int64_t i = 0; i < in_flat; ++i) {
        const float* src = xt + i * T + t0;
        float* dst = xtile + i * TT;
        for (int t = 0; t < TT; ++t) dst[t] = t < tt ? src[t] : 0.f;
      }
      std::fill(acc, acc + (o_end - o_begin) * TT, 0.f);
      for (int64_t j0 = 0; j0 < J; j0 += JB) {
        const int64_t j1 = std::min(J, j0 + JB);
        build_any<TT>(xtile, cb, M, K, g, j0, j1, lut);
        for (int64_t o = o_begin; o < o_end; ++o) {
          using vt = typename Tile<TT>::v;
          float* ao = acc + (o - o_begin) * TT;
          const code_t* co = codes + (o * J + j0) * M;
          const int64_t n = (j1 - j0) * M;
          vt a0 = load_tile<TT>(ao), a1 = {}, a2 = {}, a3 = {};  // four add chains, not one
          int64_t jm = 0;
          for (; jm + 4 <= n; jm += 4) {
            a0 += load_tile<TT>(lut + (jm * K + static_cast<int64_t>(co[jm])) * TT);
            a1 += load_tile<TT>(lut + ((jm + 1) * K + static_cast<int64_t>(co[jm + 1])) * TT);
            a2 += load_tile<TT>(lut + ((jm + 2) * K + static_cast<int64_t>(co[jm + 2])) * TT);
            a3 += load_tile<TT>(lut + ((jm + 3) * K + static_cast<int64_t>(co[jm + 3])) * TT);
          }
          for (; jm < n; ++jm) a0 += load_tile<TT>(lut + (jm * K + static_cast<int64_t>(co[jm])) * TT);
          store_tile<TT>(ao, (a0 + a1) + (a2 + a3));
        }
      }
      for (int64_t o = o_begin; o < o_end; ++o) {
        const float s = scale[o], b = bias ? bias[o] : 0.f;
        const float* ao = acc + (o - o_begin) * TT;
        float* yo = yt + o * T + t0;
        for (int64_t t = 0; t < tt; ++t) yo[t] = ao[t] * s + b;
      }
    }
  };
  if (by_tiles) {
    at::parallel_for(0, ntiles, 1, [&](int64_t b, int64_t e) { work(b, e, 0, O); });
  } else {
    at::parallel_for(0, O, 64, [&](int64_t b, int64_t e) { work(0, ntiles, b, e); });
  }
}

// One token: lut[(j*M + m)*K + c] = sum_k cb[m, c, k] * x[j*g + k], vectorised over c through a
// codeword-major copy of the codebooks (cbt[m][k][c]); then y[o] = scale[o] * sum_jm lut[jm*K + code] + bias.
template <typename code_t>
void one_token_impl(const float* __restrict x, int64_t in_flat, const float* __restrict cb, int64_t M, int64_t K,
                    int64_t g, const code_t* __restrict codes, int64_t O, const float* __restrict scale,
                    const float* __restrict bias, float* __restrict y) {
  const int64_t J = in_flat / g, n = J * M;
  std::vector<float> cbt(M * g * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; ++c)
      for (int64_t k = 0; k < g; ++k) cbt[(m * g + k) * K + c] = cb[(m * K + c) * g + k];
  AlignedBuf lut_buf(n * K);
  float* __restrict lut = lut_buf.p;
  const float* __restrict cbtp = cbt.data();
  at::parallel_for(0, J, 16, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j)
      for (int64_t m = 0; m < M; ++m) {
        float* __restrict dst = lut + (j * M + m) * K;
        const float* w = cbtp + m * g * K;
        const float x0 = x[j * g];
        for (int64_t c = 0; c < K; ++c) dst[c] = x0 * w[c];
        for (int64_t k = 1; k < g; ++k) {
          const float xk = x[j * g + k];
          const float* wk = w + k * K;
          for (int64_t c = 0; c < K; ++c) dst[c] += xk * wk[c];
        }
      }
  });
#if defined(__AVX512F__)
  // 16 positions per gather (lane l reads lut[(e+l)*K + code]); four chains so that gathers overlap
  if (n * K < (int64_t(1) << 31)) {
    at::parallel_for(0, O, 32, [&](int64_t ob, int64_t oe) {
      const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(static_cast<int>(K)));
      for (int64_t o = ob; o < oe; ++o) {
        const code_t* co = codes + o * n;
        auto pick = [&](int64_t e) {
          __m512i c;
          if constexpr (sizeof(code_t) == 1)
            c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(co + e)));
          else
            c = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(co + e)));
          return _mm512_i32gather_ps(_mm512_add_epi32(c, rows), lut + e * K, 4);
        };
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t e = 0;
        for (; e + 64 <= n; e += 64) {
          a0 = _mm512_add_ps(a0, pick(e));
          a1 = _mm512_add_ps(a1, pick(e + 16));
          a2 = _mm512_add_ps(a2, pick(e + 32));
          a3 = _mm512_add_ps(a3, pick(e + 48));
        }
        for (; e + 16 <= n; e += 16) a0 = _mm512_add_ps(a0, pick(e));
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        for (; e < n; ++e) sum += lut[e * K + co[e]];
        y[o] = sum * scale[o] + (bias ? bias[o] : 0.f);
      }
    });
    return;
  }
#endif
  at::parallel_for(0, O, 32, [&](int64_t ob, int64_t oe) {  // without AVX-512: four scalar chains per row
    for (int64_t o = ob; o < oe; ++o) {
      const code_t* co = codes + o * n;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      int64_t e = 0;
      for (; e + 4 <= n; e += 4) {
        s0 += lut[e * K + co[e]];
        s1 += lut[(e + 1) * K + co[e + 1]];
        s2 += lut[(e + 2) * K + co[e + 2]];
        s3 += lut[(e + 3) * K + co[e + 3]];
      }
      for (; e < n; ++e) s0 += lut[e * K + co[e]];
      y[o] = ((s0 + s1) + (s2 + s3)) * scale[o] + (bias ? bias[o] : 0.f);
    }
  });
}

void check(const torch::Tensor& codebooks, const torch::Tensor& codes, const torch::Tensor& scale,
           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(codebooks.dim() == 3 && codebooks.scalar_type() == torch::kFloat && codebooks.is_contiguous(),
              "codebooks must be contiguous fp32 (M, K, g)");
  TORCH_CHECK(codes.dim() == 3 && codes.is_contiguous() &&
                  (codes.scalar_type() == torch::kUInt8 || codes.scalar_type() == torch::kInt16),
              "codes must be contiguous uint8 or int16 (out, groups, M)");
  TORCH_CHECK(codes.size(2) == codebooks.size(0), "codes and codebooks disagree on M");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == codes.size(0),
              "scale must be contiguous fp32 (out,)");
  if (bias) TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == codes.size(0),
                        "bias must be contiguous fp32 (out,)");
}

}  // namespace

// yt (out, T) = AQ weight @ xt (in_flat, T), token-contiguous in and out.
torch::Tensor aq_matmul_tokens(torch::Tensor xt, torch::Tensor codebooks, torch::Tensor codes, torch::Tensor scale,
                               c10::optional<torch::Tensor> bias, int64_t jb_groups,
                               bool use_one_token) {
  check(codebooks, codes, scale, bias);
  TORCH_CHECK(xt.dim() == 2 && xt.scalar_type() == torch::kFloat && xt.is_contiguous(), "xt must be contiguous fp32 (in, T)");
  const int64_t M = codebooks.size(0), K = codebooks.size(1), g = codebooks.size(2), O = codes.size(0);
  TORCH_CHECK(xt.size(0) == codes.size(1) * g, "input features ", xt.size(0), " != groups * g");
  auto yt = torch::empty({O, xt.size(1)}, xt.options());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const int64_t T = xt.size(1);
  auto run = [&](auto tt) {
    constexpr int TT = decltype(tt)::value;
    if (codes.scalar_type() == torch::kUInt8)
      many_tokens_impl<TT, uint8_t>(xt.data_ptr<float>(), xt.size(0), T, codebooks.data_ptr<float>(), M, K, g,
                                    codes.data_ptr<uint8_t>(), O, scale.data_ptr<float>(), b, yt.data_ptr<float>(),
                                    jb_groups);
    else
      many_tokens_impl<TT, uint16_t>(xt.data_ptr<float>(), xt.size(0), T, codebooks.data_ptr<float>(), M, K, g,
                                     reinterpret_cast<uint16_t*>(codes.data_ptr<int16_t>()), O,
                                     scale.data_ptr<float>(), b, yt.data_ptr<float>(), jb_groups);
  };
  // one token: the gather path; otherwise the tile width follows the token count (a 16-wide tile
  // for 4 tokens would add 12 zeros per row)
  if (T == 1 && use_one_token) {
    if (codes.scalar_type() == torch::kUInt8)
      one_token_impl<uint8_t>(xt.data_ptr<float>(), xt.size(0), codebooks.data_ptr<float>(), M, K, g,
                              codes.data_ptr<uint8_t>(), O, scale.data_ptr<float>(), b, yt.data_ptr<float>());
    else
      one_token_impl<uint16_t>(xt.data_ptr<float>(), xt.size(0), codebooks.data_ptr<float>(), M, K, g,
                               reinterpret_cast<uint16_t*>(codes.data_ptr<int16_t>()), O, scale.data_ptr<float>(), b,
                               yt.data_ptr<float>());
  } else if (T <= 4)
    run(std::integral_constant<int, 4>{});
  else if (T <= 8)
    run(std::integral_constant<int, 8>{});
  else
    run(std::integral_constant<int, 16>{});
  return yt;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("aq_matmul_tokens", &aq_matmul_tokens, "AQ lookup-table product, token-contiguous", py::arg("xt"),
        py::arg("codebooks"), py::arg("codes"), py::arg("scale"), py::arg("bias"), py::arg("jb_groups"),
        py::arg("one_token") = true);
}
