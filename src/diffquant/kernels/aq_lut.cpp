// Lookup-table kernels for additive-codebook (AQ) weights on the CPU, fp32.
//
// Weight row o, group j:  W[o, j*g:(j+1)*g] = scale[o] * sum_m codebooks[m, codes[o, j, m]].
// For inputs x laid out token-contiguous, xt[j*g + k, t], the product is
//     y[o, t] = scale[o] * sum_j sum_m T[j, m, codes[o, j, m], t] + bias[o],
//     T[j, m, c, t] = sum_k codebooks[m, c, k] * xt[j*g + k, t]           (the table)
// so a token tile of TT tokens turns every (o, j, m) into one TT-wide vector add of a table row:
// in*M*K multiply-adds per token for the table and out*(in/g)*M adds for the gather-sum, against
// in*out multiply-adds for dense. The table is built and consumed in blocks of JB groups so that the
// block stays in L2 while every output row visits it. A block holds `block_columns` (group, codebook)
// columns, JB = block_columns / M groups (cpu.BLOCK_COLUMNS = 16). Against 8 groups whatever M, on 1x8
// weights (16 groups now) the linears ran a median 1.08x faster (0.93-1.51x over 49 cells at 2-1024 tokens,
// called back to back and after a dequantize-then-dense product) and the 3x3 convolutions 1.01x; 2x8 (8 groups
// both ways, so a control) measured 1.00x (0.95-1.13x) (kernels_ab.py --base 2745d31 --mixed,
// benchmarks/results/kernels-ab-block-columns.json, AMD EPYC). In a trial sweep (not kept), 16 groups of two
// codebooks (32 columns) were slower than 8 at every token count from 16 up.
//
// Codes are read column-major, codes_t[(j*M + m)*out + o] (`cpu_layout` in cpu.py): consecutive
// output rows of one (group, codebook) column sit side by side, which the one-token path needs (16
// rows per vector) and the tiled path does not mind (a cache line serves 64 consecutive rows).
//
// A KAQ convolution is the same product on unfolded patches (F.unfold orders a patch channel-major,
// so group j = one k x k kernel slice of input channel j), which is why one kernel serves both.
//
// Parallel over token tiles when there are at least as many tiles as threads; otherwise over the input
// groups (each thread builds its share of the table, see many_tokens_impl) or, where the table is cheap
// next to the gather-sum, over output rows. Measured on this project's 2-core AVX-512 machines
// (benchmarks/kernels.py); a per-token scalar-lookup variant for 1-4 tokens was slower than a 4-wide
// tile and was dropped. So was splitting 9-16 tokens into two 8-wide tiles, one per thread, so that no
// two threads build the same table: on the AMD EPYC it ran at 0.78-1.06x of the one 16-wide tile on
// DiT-XL/2 and SD-1.5 layers (benchmarks/kernels_ab.py --tokens 12,16,32;
// benchmarks/results/kernels-ab-tt8-rejected.json).
//
// One token (a batch-1 linear) has its own path: the whole table (J*M*K floats) is built once, then
// for each (group, codebook) column the 16 output rows of a vector look up their K-entry table row.
// With up to 256 codewords (uint8 codes) that row is held in K/16 registers and the lookup is a tree
// of register permutes (vpermi2ps picks from 32 entries; blends on the code's higher bits), not a
// memory gather: on the Xeon (Cascade Lake) it ran 1.6-2.4x faster than the row-major 16-lane gathers it
// replaced, e.g. DiT-XL/2 qkv 2x8 at 1 token 0.40 ms against 0.84 ms (benchmarks/kernels_ab.py,
// benchmarks/results/kernels-ab-onetoken.json).
// Where AVX-512 VBMI exists (Zen 4, Ice Lake and later) the table row is split into byte planes instead
// and 64 rows look up their entries per byte permute (vpermi2b picks from 128 bytes), the floats put back
// together by unpacks (`rows_by_byte_planes`): on the AMD EPYC it ran 1.1-2.1x faster than the float
// permutes at 1 token on DiT-XL/2, LDM-4 and SD-1.5 layers, 1x8 and 2x8 (benchmarks/kernels_ab.py
// --base c0ae416 --lookups, benchmarks/results/kernels-ab-byteplanes.json). There, 16-lane gathers were
// the slowest of the four lookups, slower than scalar loads.
// Larger codebooks use gathers from the column's table.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <type_traits>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// A tile of TT tokens is one GCC/Clang vector-extension value of TT fp32 (AVX-512 for 16, AVX for 8,
// SSE for 4), any alignment; written explicitly because the auto-vectoriser kept the table build scalar.
// Working memory, kept per thread between calls, one buffer per role, grown when a call needs more: a
// buffer allocated afresh by each call lands at new addresses, whose lines come from DRAM after the rest of
// a model has run, while these stay in the last-level cache. Each role is taken once per thread per call
// (the calling thread also works inside the parallel regions, so the roles it holds there differ from the
// one it holds outside). Held until the thread exits: at most the largest layer's tables and partial sums.
// Measured against allocating per call (benchmarks/kernels_ab.py --base 99f6559 --mixed,
// benchmarks/results/kernels-ab-scratch.json, AMD EPYC, 1-256 tokens): 0.99-1.13x called back to back,
// 0.96-1.26x right after a dequantize-then-dense product (median 1.02x both): a small gain, kept because it
// also takes the allocator out of every call.
enum Role : int { kParts = 0, kTableBlock, kXTile, kAcc, kOneTokenTable, kOneTokenAcc, kRoles };

float* scratch(Role role, int64_t n) {
  struct Slots {
    float* p[kRoles] = {};
    int64_t n[kRoles] = {};
    ~Slots() {
      for (float* q : p) std::free(q);
    }
  };
  thread_local Slots slots;
  if (slots.n[role] < n) {
    std::free(slots.p[role]);
    slots.p[role] = static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
    slots.n[role] = slots.p[role] ? n : 0;
    TORCH_CHECK(slots.p[role] != nullptr, "out of memory for ", n, " floats of lookup-kernel working memory");
  }
  return slots.p[role];
}

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

// acc[(o - o_begin)*TT + t] += sum over the block's columns jm < n of lut[(jm*K + codes_t[jm*O + o])*TT + t];
// `first`: the block is the first one, so acc is written, not added to (no zero fill beforehand; against the
// fill, 0.93-1.33x called back to back and 0.95-1.08x after a dequantize-then-dense product at 4-256 tokens, no
// gain beyond noise: benchmarks/results/kernels-ab-nofill.json; kept as the simpler loop). Forced inline: called
// out of line from the row-split lambda it ran at 0.88-0.95x of the same loop written inline (DiT-XL/2 qkv and
// fc1, 8-16 tokens, AMD EPYC; trial kernels_ab.py runs, not kept).
template <int TT, typename code_t>
__attribute__((always_inline)) inline void gather_block(const float* __restrict lut, int64_t n, int64_t K,
                                                        const code_t* __restrict co, int64_t O, int64_t o_begin,
                                                        int64_t o_end, float* __restrict acc, bool first) {
  using vt = typename Tile<TT>::v;
  for (int64_t o = o_begin; o < o_end; ++o) {
    float* ao = acc + (o - o_begin) * TT;
    const code_t* c = co + o;  // column jm of this block at c[jm * O]
    vt a0 = {}, a1 = {}, a2 = {}, a3 = {};  // four add chains, not one
    if (!first) a0 = load_tile<TT>(ao);
    int64_t jm = 0;
    for (; jm + 4 <= n; jm += 4) {
      a0 += load_tile<TT>(lut + (jm * K + static_cast<int64_t>(c[jm * O])) * TT);
      a1 += load_tile<TT>(lut + ((jm + 1) * K + static_cast<int64_t>(c[(jm + 1) * O])) * TT);
      a2 += load_tile<TT>(lut + ((jm + 2) * K + static_cast<int64_t>(c[(jm + 2) * O])) * TT);
      a3 += load_tile<TT>(lut + ((jm + 3) * K + static_cast<int64_t>(c[(jm + 3) * O])) * TT);
    }
    for (; jm < n; ++jm) a0 += load_tile<TT>(lut + (jm * K + static_cast<int64_t>(c[jm * O])) * TT);
    store_tile<TT>(ao, (a0 + a1) + (a2 + a3));
  }
}

// Loaders write a token tile's input rows i0..i1, zero-padded to TT tokens, at xtile[i*TT + t]: the table
// build reads each group's g rows as TT-wide vectors.

// from a matrix: token-contiguous, x[i*T + t], or with `token_major` a (T, in_flat) one, x[t*in_flat + i] (a
// linear's input as it comes, transposed here in cache rather than by a separate copy)
struct MatrixLoader {
  const float* x;
  int64_t in_flat, T;
  bool token_major;
  template <int TT>
  void load(int64_t t0, int64_t i0, int64_t i1, float* __restrict xtile) const {
    const int64_t tt = std::min<int64_t>(TT, T - t0);
    if (token_major) {
      for (int t = 0; t < TT; ++t) {
        const float* src = x + (t0 + t) * in_flat;
        if (t < tt)
          for (int64_t i = i0; i < i1; ++i) xtile[i * TT + t] = src[i];
        else
          for (int64_t i = i0; i < i1; ++i) xtile[i * TT + t] = 0.f;
      }
      return;
    }
    for (int64_t i = i0; i < i1; ++i) {
      const float* src = x + i * T + t0;
      float* dst = xtile + i * TT;
      for (int t = 0; t < TT; ++t) dst[t] = t < tt ? src[t] : 0.f;
    }
  }
};

// from one image (C, H, W) of a convolution: row i = (c, ki, kj) of a patch in F.unfold's order, token t =
// output pixel; the patches are read straight from the image (an im2col per tile, in cache), so the
// unfolded image (kh*kw times the input) is never written out
struct ConvLoader {
  const float* x;
  int64_t H, W, kh, kw, sh, sw, ph, pw, dh, dw, Wo, P;  // P = output pixels
  template <int TT>
  void load(int64_t t0, int64_t i0, int64_t i1, float* __restrict xtile) const {
    int64_t top[TT], left[TT];  // the patch origin of each token; a padding token never lands inside
    for (int t = 0; t < TT; ++t) {
      const int64_t p = t0 + t;
      top[t] = p < P ? (p / Wo) * sh - ph : -(int64_t(1) << 40);
      left[t] = p < P ? (p % Wo) * sw - pw : 0;
    }
    const int64_t kk = kh * kw;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i / kk, r = i % kk;
      const float* plane = x + c * H * W;
      const int64_t dy = (r / kw) * dh, dx = (r % kw) * dw;
      float* dst = xtile + i * TT;
      for (int t = 0; t < TT; ++t) {
        const int64_t y = top[t] + dy, xx = left[t] + dx;
        dst[t] = (y >= 0 && y < H && xx >= 0 && xx < W) ? plane[y * W + xx] : 0.f;
      }
    }
  }
};

template <int TT, typename code_t, typename Loader>
void many_tokens_impl(const Loader& loader, int64_t in_flat, int64_t T, const float* __restrict cb, int64_t M,
                      int64_t K, int64_t g, const code_t* __restrict codes_t, int64_t O, const float* __restrict scale,
                      const float* __restrict bias, float* __restrict yt, int64_t block_columns, bool token_major) {
  const int64_t J = in_flat / g;
  const int64_t ntiles = (T + TT - 1) / TT;
  const int64_t JB = std::max<int64_t>(1, std::min<int64_t>(block_columns / M, J));  // groups per table block
  const int nth = at::get_num_threads();
  // One token tile and several threads: split the groups (the reduction dimension) between threads.
  // Each thread builds the table of its own groups only and adds into its own partial sums for
  // every output row; the partial sums are added at the end. Splitting the output rows instead has
  // every thread build the whole table, so more threads shorten only the gather-sum: that costs
  // in*K*M per token per thread against the gather's O*(in/g)*M / nth, a share of K*g*nth / O. Against
  // the row split on the AMD EPYC (2 threads; benchmarks/kernels_ab.py --base 73c305e,
  // benchmarks/results/kernels-ab-splitk.json) it ran 1.06-1.47x at 2-16 tokens where that share is at
  // least 2 (DiT-XL/2 proj and fc2, SD-1.5's 1280: out <= in), and 0.97-1.19x at 2-4 tokens on qkv and
  // fc1 (out 3-4x in). At 8-16 tokens on those two, whose all-rows partial sums are 3-4x larger, it was
  // no faster than the row split in a trial run (0.96-1.13x against 1.00-1.19x), so they keep the rows.
  // One tile only (up to 16 tokens): for several, the parts' sums would take nth * ntiles * O * TT
  // floats, tens of MB on a many-core machine (16 threads, 13 tiles, 4608 rows).
  const bool split_groups = ntiles == 1 && nth > 1 && J >= 2 * nth && (TT <= 4 || K * g * nth >= 2 * O);
  if (split_groups) {  // T <= TT: the one tile holds every token
    const int64_t parts = nth;
    float* __restrict part = scratch(kParts, parts * O * TT);
    // One OpenMP region with a barrier between the parts and their sum, not two parallel_for regions: at 2-16
    // tokens the call is tens of microseconds: against the two regions, 0.88-1.38x called back to back and
    // 0.97-1.14x after a dequantize-then-dense product, median 1.03x / 1.02x, at 2-16 tokens on DiT-XL/2 proj and
    // fc2, LDM-4's 960 and SD-1.5's 1280 linears, 1x8 and 2x8 (benchmarks/kernels_ab.py --base fbf408d --mixed,
    // benchmarks/results/kernels-ab-oneregion.json, AMD EPYC): a small gain. Written so
    // that any number of threads is correct (a nested call gets one): thread i takes parts i, i + n, ...,
    // then rows by thread. Exceptions (out of memory in scratch) are carried out of the region.
    std::exception_ptr error;
#pragma omp parallel num_threads(static_cast<int>(parts))
    {
      const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
      try {
        float* const lut = scratch(kTableBlock, JB * M * K * TT);
        float* const xtile = scratch(kXTile, in_flat * TT);
        for (int64_t p = id; p < parts; p += nt) {
          const int64_t jlo = J * p / parts, jhi = J * (p + 1) / parts;
          float* acc = part + p * O * TT;
          loader.template load<TT>(0, jlo * g, jhi * g, xtile);
          for (int64_t j0 = jlo; j0 < jhi; j0 += JB) {
            const int64_t j1 = std::min(jhi, j0 + JB);
            build_any<TT>(xtile, cb, M, K, g, j0, j1, lut);
            gather_block<TT, code_t>(lut, (j1 - j0) * M, K, codes_t + j0 * M * O, O, 0, O, acc, j0 == jlo);
          }
        }
      } catch (...) {
#pragma omp critical
        if (!error) error = std::current_exception();
      }
#pragma omp barrier
      // the parts' sums, scaled and biased, a TT-wide vector per row (in perf, a scalar loop here took
      // about a fifth of the kernel's time at 16 tokens)
      if (!error) {
        using vt = typename Tile<TT>::v;
        for (int64_t o = O * id / nt; o < O * (id + 1) / nt; ++o) {
          vt sum = load_tile<TT>(part + o * TT);
          for (int64_t p = 1; p < parts; ++p) sum += load_tile<TT>(part + (p * O + o) * TT);
          sum = sum * scale[o] + (bias ? bias[o] : 0.f);
          if (token_major) {
            for (int64_t t = 0; t < T; ++t) yt[t * O + o] = sum[t];
          } else if (T == TT) {
            store_tile<TT>(yt + o * T, sum);
          } else {
            for (int64_t t = 0; t < T; ++t) yt[o * T + t] = sum[t];
          }
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
  // parallel over token tiles when there are enough, otherwise over output rows (each thread then
  // builds the same small table)
  const bool by_tiles = ntiles >= nth;
  auto work = [&](int64_t tile_begin, int64_t tile_end, int64_t o_begin, int64_t o_end) {
    // 64-byte aligned so that a 16-float table row is one cache line, not two
    float* __restrict lut = scratch(kTableBlock, JB * M * K * TT);
    float* __restrict xtile = scratch(kXTile, in_flat * TT);
    float* __restrict acc = scratch(kAcc, (o_end - o_begin) * TT);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t t0 = tile * TT, tt = std::min<int64_t>(TT, T - t0);
      loader.template load<TT>(t0, 0, in_flat, xtile);
      for (int64_t j0 = 0; j0 < J; j0 += JB) {
        const int64_t j1 = std::min(J, j0 + JB);
        build_any<TT>(xtile, cb, M, K, g, j0, j1, lut);
        gather_block<TT, code_t>(lut, (j1 - j0) * M, K, codes_t + j0 * M * O, O, o_begin, o_end, acc, j0 == 0);
      }
      for (int64_t o = o_begin; o < o_end; ++o) {
        const float s = scale[o], b = bias ? bias[o] : 0.f;
        const float* ao = acc + (o - o_begin) * TT;
        if (token_major)
          for (int64_t t = 0; t < tt; ++t) yt[(t0 + t) * O + o] = ao[t] * s + b;
        else
          for (int64_t t = 0; t < tt; ++t) yt[o * T + t0 + t] = ao[t] * s + b;
      }
    }
  };
  if (by_tiles) {
    at::parallel_for(0, ntiles, 1, [&](int64_t b, int64_t e) { work(b, e, 0, O); });
  } else {
    at::parallel_for(0, O, 64, [&](int64_t b, int64_t e) { work(0, ntiles, b, e); });
  }
}

// lut[(j*M + m)*K + c] = sum_k cb[m, c, k] * x[j*g + k], vectorised over c through a codeword-major copy
// of the codebooks (cbt[m][k][c]); parallel over groups.
void to_byte_planes(float* row, int64_t K);

inline void build_one_token_table(const float* __restrict x, const float* __restrict cb, int64_t M, int64_t K,
                                  int64_t g, int64_t J, float* __restrict lut, bool byte_planes) {
  std::vector<float> cbt(M * g * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; ++c)
      for (int64_t k = 0; k < g; ++k) cbt[(m * g + k) * K + c] = cb[(m * K + c) * g + k];
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
        if (byte_planes) to_byte_planes(dst, K);
      }
  });
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DQ_AVX512 1
// 16 lanes, each picking entry idx[l] (< K <= 256) of a table row held in K/16 registers t[]: vpermi2ps
// covers 32 entries with the code's low 5 bits, then blends choose by bits 5, 6, 7.
template <int K>
inline __m512 lookup_regs(const __m512* t, __m512i idx) {
  if constexpr (K == 16) {
    return _mm512_permutexvar_ps(idx, t[0]);
  } else if constexpr (K == 32) {
    return _mm512_permutex2var_ps(t[0], idx, t[1]);
  } else {
    const __mmask16 hi = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(K / 2));
    return _mm512_mask_blend_ps(hi, lookup_regs<K / 2>(t, idx), lookup_regs<K / 2>(t + K / 32, idx));
  }
}

// acc[r] += sum over columns e of lut[e*K + codes_t[e*O + o_begin + r]], rows r < rows, by register permutes
template <int K>
void rows_by_permutes(const float* __restrict lut, int64_t n, const uint8_t* __restrict codes_t, int64_t O,
                      int64_t o_begin, int64_t rows, float* __restrict acc) {
  for (int64_t e = 0; e < n; ++e) {
    __m512 t[K / 16];
    for (int i = 0; i < K / 16; ++i) t[i] = _mm512_load_ps(lut + e * K + 16 * i);
    const uint8_t* c = codes_t + e * O + o_begin;
    for (int64_t r = 0; r < rows; r += 16) {
      const __mmask16 lm = rows - r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (rows - r)) - 1);
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, c + r));
      _mm512_store_ps(acc + r, _mm512_add_ps(_mm512_load_ps(acc + r), lookup_regs<K>(t, idx)));
    }
  }
}

// the same by 16-lane gathers from the column's table row (any K, uint8 or uint16 codes)
template <typename code_t>
void rows_by_gathers(const float* __restrict lut, int64_t n, int64_t K, const code_t* __restrict codes_t, int64_t O,
                     int64_t o_begin, int64_t rows, float* __restrict acc) {
  for (int64_t e = 0; e < n; ++e) {
    const float* tbl = lut + e * K;
    const code_t* c = codes_t + e * O + o_begin;
    for (int64_t r = 0; r < rows; r += 16) {
      const __mmask16 lm = rows - r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (rows - r)) - 1);
      __m512i idx;
      if constexpr (sizeof(code_t) == 1)
        idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, c + r));
      else
        idx = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lm, c + r));
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lm, idx, tbl, 4);
      _mm512_store_ps(acc + r, _mm512_add_ps(_mm512_load_ps(acc + r), v));
    }
  }
}
#endif

#if defined(DQ_AVX512) && defined(__AVX512VBMI__)
#define DQ_VBMI 1
// A table row of K fp32 entries (K a multiple of 64) rewritten in place as byte planes: per block of 64
// entries, 256 bytes [byte 0 of the 64 entries | byte 1 | byte 2 | byte 3]. The lookup then picks 64
// rows' bytes per vpermb / vpermi2b (a byte permute covers 64 / 128 entries) instead of 16 rows' floats
// per vpermi2ps (32 entries), and reassembles the floats with unpacks: exact, since only bytes move.
void to_byte_planes(float* row, int64_t K) {
  // within each 16-float register, gather byte b of every float into bytes 16b..16b+15
  alignas(64) static const uint8_t split_idx[64] = {
      0, 4, 8,  12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 1, 5, 9,  13, 17, 21, 25, 29, 33, 37, 41, 45,
      49, 53, 57, 61, 2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62, 3, 7, 11, 15, 19, 23, 27, 31,
      35, 39, 43, 47, 51, 55, 59, 63};
  const __m512i si = _mm512_load_si512(split_idx);
  for (int64_t b = 0; b < K; b += 64) {
    __m512i z[4];
    for (int i = 0; i < 4; ++i) z[i] = _mm512_permutexvar_epi8(si, _mm512_loadu_si512(row + b + 16 * i));
    // a 4x4 transpose of 128-bit quarters: plane p = quarter p of z[0..3]
    const __m512i t0 = _mm512_shuffle_i32x4(z[0], z[1], 0x44), t1 = _mm512_shuffle_i32x4(z[2], z[3], 0x44);
    const __m512i t2 = _mm512_shuffle_i32x4(z[0], z[1], 0xEE), t3 = _mm512_shuffle_i32x4(z[2], z[3], 0xEE);
    _mm512_storeu_si512(row + b, _mm512_shuffle_i32x4(t0, t1, 0x88));
    _mm512_storeu_si512(row + b + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));
    _mm512_storeu_si512(row + b + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));
    _mm512_storeu_si512(row + b + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));
  }
}

// Byte p of the entries picked by 64 codes, from a byte-plane table row of K = 64, 128 or 256 entries.
template <int K>
inline __m512i pick_plane(const __m512i* t, int p, __m512i idx, __mmask64 top) {
  if constexpr (K == 64) {
    return _mm512_permutexvar_epi8(idx, t[p]);
  } else if constexpr (K == 128) {
    return _mm512_permutex2var_epi8(t[p], idx, t[4 + p]);
  } else {
    return _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(t[p], idx, t[4 + p]),
                                  _mm512_permutex2var_epi8(t[8 + p], idx, t[12 + p]));
  }
}

// acc[q] += the entries picked for 64 rows at a time, rows_by_permutes for a byte-plane table. The unpacks
// work within 128-bit lanes, so the 64 floats come out in a fixed order: acc[64c + 16k + 4L + i] holds row
// 64c + 16L + 4k + i (`byte_plane_row`); the caller puts them back in order once at the end.
template <int K>
void rows_by_byte_planes(const float* __restrict lut, int64_t n, const uint8_t* __restrict codes_t, int64_t O,
                         int64_t o_begin, int64_t rows, float* __restrict acc) {
  for (int64_t e = 0; e < n; ++e) {
    __m512i t[K / 16];
    for (int i = 0; i < K / 16; ++i) t[i] = _mm512_load_si512(lut + e * K + 16 * i);
    const uint8_t* c = codes_t + e * O + o_begin;
    for (int64_t r = 0; r < rows; r += 64) {
      const __mmask64 lm = rows - r >= 64 ? ~__mmask64(0) : (__mmask64(1) << (rows - r)) - 1;
      const __m512i idx = _mm512_maskz_loadu_epi8(lm, c + r);
      const __mmask64 top = _mm512_movepi8_mask(idx);
      const __m512i b0 = pick_plane<K>(t, 0, idx, top), b1 = pick_plane<K>(t, 1, idx, top);
      const __m512i b2 = pick_plane<K>(t, 2, idx, top), b3 = pick_plane<K>(t, 3, idx, top);
      const __m512i w01l = _mm512_unpacklo_epi8(b0, b1), w01h = _mm512_unpackhi_epi8(b0, b1);
      const __m512i w23l = _mm512_unpacklo_epi8(b2, b3), w23h = _mm512_unpackhi_epi8(b2, b3);
      float* a = acc + r;
      _mm512_store_ps(a, _mm512_add_ps(_mm512_load_ps(a), _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01l, w23l))));
      _mm512_store_ps(a + 16,
                      _mm512_add_ps(_mm512_load_ps(a + 16), _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01l, w23l))));
      _mm512_store_ps(a + 32,
                      _mm512_add_ps(_mm512_load_ps(a + 32), _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01h, w23h))));
      _mm512_store_ps(a + 48,
                      _mm512_add_ps(_mm512_load_ps(a + 48), _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01h, w23h))));
    }
  }
}
#else
void to_byte_planes(float*, int64_t) { TORCH_CHECK(false, "byte-plane tables need AVX-512 VBMI"); }
#endif

// the row held at accumulator position q by rows_by_byte_planes (its own inverse)
inline int64_t byte_plane_row(int64_t q) {
  const int64_t c = q & ~int64_t(63), k = (q >> 4) & 3, lane = (q >> 2) & 3, i = q & 3;
  return c + 16 * lane + 4 * k + i;
}

// How one token's gather-sum looks its table rows up (`lookup` of aq_matmul_tokens).
enum Lookup : int64_t { kAuto = 0, kFloatPermutes = 1, kGathers = 2, kBytePlanes = 3, kScalar = 4 };

inline const char* lookup_name(int64_t lookup) {
  static const char* names[] = {"auto", "float_permutes", "gathers", "byte_planes", "scalar"};
  return lookup >= 0 && lookup <= kScalar ? names[lookup] : "(unknown)";
}

// which lookups this build can run for K codewords and code type width `code_bytes`
inline bool lookup_runs(int64_t lookup, int64_t K, int64_t code_bytes) {
  const bool pow2_le256 = K >= 16 && K <= 256 && (K & (K - 1)) == 0;
  switch (lookup) {
    case kScalar: return true;
#ifdef DQ_AVX512
    case kGathers: return true;
    case kFloatPermutes: return code_bytes == 1 && pow2_le256;
#endif
#ifdef DQ_VBMI
    case kBytePlanes: return code_bytes == 1 && pow2_le256 && K >= 64;
#endif
    default: return false;
  }
}

// the lookup chosen when none is forced: byte planes where VBMI has them, else float permutes, else
// gathers, else scalar (measured: benchmarks/kernels_ab.py --lookups)
inline int64_t auto_lookup(int64_t K, int64_t code_bytes) {
  for (int64_t l : {kBytePlanes, kFloatPermutes, kGathers})
    if (lookup_runs(l, K, code_bytes)) return l;
  return kScalar;
}

// One token: the table lut[(j*M + m)*K + c] (above), then y[o] = scale[o] * sum_e lut[e*K + codes_t[e*O + o]]
// + bias[o], parallel over blocks of output rows (each thread reads every column's table row). `lookup` is
// one that lookup_runs (aq_matmul_tokens checks).
template <typename code_t>
void one_token_impl(const float* __restrict x, int64_t in_flat, const float* __restrict cb, int64_t M, int64_t K,
                    int64_t g, const code_t* __restrict codes_t, int64_t O, const float* __restrict scale,
                    const float* __restrict bias, float* __restrict y, int64_t lookup) {
  const int64_t J = in_flat / g, n = J * M;
  float* __restrict lut = scratch(kOneTokenTable, n * K);
  build_one_token_table(x, cb, M, K, g, J, lut, lookup == kBytePlanes);
  // blocks of 64 rows: a byte-plane step covers 64, the others 16
  at::parallel_for(0, (O + 63) / 64, 4, [&](int64_t bb, int64_t be) {
    const int64_t o_begin = bb * 64, rows = std::min<int64_t>(O, be * 64) - o_begin;
    float* __restrict acc = scratch(kOneTokenAcc, (be - bb) * 64);
    std::fill(acc, acc + (be - bb) * 64, 0.f);
#ifdef DQ_AVX512
    if constexpr (sizeof(code_t) == 1) {
      if (lookup == kFloatPermutes) {
        switch (K) {
          case 16: rows_by_permutes<16>(lut, n, codes_t, O, o_begin, rows, acc); break;
          case 32: rows_by_permutes<32>(lut, n, codes_t, O, o_begin, rows, acc); break;
          case 64: rows_by_permutes<64>(lut, n, codes_t, O, o_begin, rows, acc); break;
          case 128: rows_by_permutes<128>(lut, n, codes_t, O, o_begin, rows, acc); break;
          case 256: rows_by_permutes<256>(lut, n, codes_t, O, o_begin, rows, acc); break;
        }
      }
#ifdef DQ_VBMI
      if (lookup == kBytePlanes) {
        switch (K) {
          case 64: rows_by_byte_planes<64>(lut, n, codes_t, O, o_begin, rows, acc); break;
          case 128: rows_by_byte_planes<128>(lut, n, codes_t, O, o_begin, rows, acc); break;
          case 256: rows_by_byte_planes<256>(lut, n, codes_t, O, o_begin, rows, acc); break;
        }
        for (int64_t q = 0; q < (be - bb) * 64; ++q) {
          const int64_t r = byte_plane_row(q);
          if (r < rows) y[o_begin + r] = acc[q] * scale[o_begin + r] + (bias ? bias[o_begin + r] : 0.f);
        }
        return;
      }
#endif
    }
    if (lookup == kGathers) rows_by_gathers<code_t>(lut, n, K, codes_t, O, o_begin, rows, acc);
#endif
    if (lookup == kScalar)  // the column's table row in L1
      for (int64_t e = 0; e < n; ++e) {
        const float* tbl = lut + e * K;
        const code_t* c = codes_t + e * O + o_begin;
        for (int64_t r = 0; r < rows; ++r) acc[r] += tbl[c[r]];
      }
    for (int64_t r = 0; r < rows; ++r) y[o_begin + r] = acc[r] * scale[o_begin + r] + (bias ? bias[o_begin + r] : 0.f);
  });
}

void check(const torch::Tensor& codebooks, const torch::Tensor& codes_t, int64_t out, const torch::Tensor& scale,
           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(codebooks.dim() == 3 && codebooks.scalar_type() == torch::kFloat && codebooks.is_contiguous(),
              "codebooks must be contiguous fp32 (M, K, g)");
  TORCH_CHECK(codes_t.dim() == 2 && codes_t.is_contiguous() &&
                  (codes_t.scalar_type() == torch::kUInt8 || codes_t.scalar_type() == torch::kInt16),
              "codes must be contiguous uint8 or int16 (groups * M, out): column-major, see cpu_layout in cpu.py");
  TORCH_CHECK(codes_t.size(0) % codebooks.size(0) == 0, "codes rows ", codes_t.size(0), " are not groups * M for M = ",
              codebooks.size(0));
  TORCH_CHECK(codes_t.size(1) == out, "codes have ", codes_t.size(1), " output rows, expected ", out);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == out,
              "scale must be contiguous fp32 (out,)");
  if (bias) TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == out,
                        "bias must be contiguous fp32 (out,)");
}

}  // namespace

// many_tokens_impl for T tokens from `loader`, with the tile width that follows the token count (a 16-wide
// tile for 4 tokens would add 12 zeros per row) and the codes' type (uint8, or int16 read as uint16)
template <typename Loader>
void many_tokens(const Loader& loader, int64_t in_flat, int64_t T, const torch::Tensor& codebooks,
                 const torch::Tensor& codes_t, const torch::Tensor& scale, const float* bias, float* y,
                 int64_t block_columns, bool token_major) {
  const int64_t M = codebooks.size(0), K = codebooks.size(1), g = codebooks.size(2), O = codes_t.size(1);
  const float* cb = codebooks.data_ptr<float>();
  const float* s = scale.data_ptr<float>();
  auto run = [&](auto tt) {
    constexpr int TT = decltype(tt)::value;
    if (codes_t.scalar_type() == torch::kUInt8)
      many_tokens_impl<TT, uint8_t>(loader, in_flat, T, cb, M, K, g, codes_t.data_ptr<uint8_t>(), O, s, bias, y,
                                    block_columns, token_major);
    else
      many_tokens_impl<TT, uint16_t>(loader, in_flat, T, cb, M, K, g,
                                     reinterpret_cast<const uint16_t*>(codes_t.data_ptr<int16_t>()), O, s, bias, y,
                                     block_columns, token_major);
  };
  if (T <= 4)
    run(std::integral_constant<int, 4>{});
  else if (T <= 8)
    run(std::integral_constant<int, 8>{});
  else
    run(std::integral_constant<int, 16>{});
}

// yt (out, T) = AQ weight @ xt (in_flat, T), token-contiguous in and out; codes_t (groups * M, out). With
// `token_major`, x is (T, in_flat) and the result (T, out): a linear layer's own layout, so that the caller
// copies neither way.
torch::Tensor aq_matmul_tokens(torch::Tensor xt, torch::Tensor codebooks, torch::Tensor codes_t, torch::Tensor scale,
                               c10::optional<torch::Tensor> bias, int64_t block_columns, bool use_one_token,
                               int64_t lookup, bool token_major) {
  const int64_t O = codes_t.dim() == 2 ? codes_t.size(1) : -1;
  check(codebooks, codes_t, O, scale, bias);
  TORCH_CHECK(xt.dim() == 2 && xt.scalar_type() == torch::kFloat && xt.is_contiguous(),
              token_major ? "x must be contiguous fp32 (T, in)" : "xt must be contiguous fp32 (in, T)");
  const int64_t M = codebooks.size(0), K = codebooks.size(1), g = codebooks.size(2);
  const int64_t in_flat = xt.size(token_major ? 1 : 0), T = xt.size(token_major ? 0 : 1);
  TORCH_CHECK(in_flat == codes_t.size(0) / M * g, "input features ", in_flat, " != groups * g = ",
              codes_t.size(0) / M * g);
  auto yt = token_major ? torch::empty({T, O}, xt.options()) : torch::empty({O, T}, xt.options());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  const bool u8 = codes_t.scalar_type() == torch::kUInt8;
  const uint8_t* c8 = u8 ? codes_t.data_ptr<uint8_t>() : nullptr;
  const uint16_t* c16 = u8 ? nullptr : reinterpret_cast<const uint16_t*>(codes_t.data_ptr<int16_t>());
  // one token: the lookup path; otherwise tiles of tokens (many_tokens)
  const int64_t code_bytes = u8 ? 1 : 2;
  if (lookup == kAuto) lookup = auto_lookup(K, code_bytes);
  TORCH_CHECK(lookup_runs(lookup, K, code_bytes), "the one-token lookup ", lookup, " (", lookup_name(lookup),
              ") does not run for ", K, " codewords with ", code_bytes,
              "-byte codes on this build; cpu.one_token_lookups() lists those that do");
  if (T == 1 && use_one_token) {
    if (u8)
      one_token_impl<uint8_t>(xt.data_ptr<float>(), in_flat, codebooks.data_ptr<float>(), M, K, g, c8, O,
                              scale.data_ptr<float>(), b, yt.data_ptr<float>(), lookup);
    else
      one_token_impl<uint16_t>(xt.data_ptr<float>(), in_flat, codebooks.data_ptr<float>(), M, K, g, c16, O,
                               scale.data_ptr<float>(), b, yt.data_ptr<float>(), lookup);
  } else {
    many_tokens(MatrixLoader{xt.data_ptr<float>(), in_flat, T, token_major}, in_flat, T, codebooks, codes_t, scale, b,
                yt.data_ptr<float>(), block_columns, token_major);
  }
  return yt;
}

// y (N, out, Ho, Wo) = KAQ convolution of x (N, C, H, W) (groups == 1), codes_t (groups * M, out) over a
// patch of C*kh*kw inputs in F.unfold's order. Each image is one product of `pixels` tokens whose tiles are
// loaded straight from the image (ConvLoader); images run one after another, each split between threads.
torch::Tensor aq_conv2d(torch::Tensor x, torch::Tensor codebooks, torch::Tensor codes_t, torch::Tensor scale,
                        c10::optional<torch::Tensor> bias, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                        int64_t pw, int64_t dh, int64_t dw, int64_t block_columns) {
  const int64_t O = codes_t.dim() == 2 ? codes_t.size(1) : -1;
  check(codebooks, codes_t, O, scale, bias);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be contiguous fp32 (N, C, H, W)");
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && dh > 0 && dw > 0 && ph >= 0 && pw >= 0,
              "kernel size, stride and dilation must be positive and padding non-negative");
  const int64_t M = codebooks.size(0), K = codebooks.size(1), g = codebooks.size(2);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), in_flat = C * kh * kw;
  TORCH_CHECK(in_flat == codes_t.size(0) / M * g, "a patch has ", C, " x ", kh, " x ", kw, " = ", in_flat,
              " inputs but the codes cover groups * g = ", codes_t.size(0) / M * g);
  const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, Wo = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "the input (", H, " x ", W, ") is smaller than the dilated kernel");
  auto y = torch::empty({N, O, Ho, Wo}, x.options());
  const int64_t P = Ho * Wo;
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  for (int64_t n = 0; n < N; ++n) {
    const ConvLoader loader{x.data_ptr<float>() + n * C * H * W, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Wo, P};
    float* yn = y.data_ptr<float>() + n * O * P;
    many_tokens(loader, in_flat, P, codebooks, codes_t, scale, b, yn, block_columns, false);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("aq_conv2d", &aq_conv2d, "KAQ convolution by the lookup kernel, patches read straight from each image",
        py::arg("x"), py::arg("codebooks"), py::arg("codes_t"), py::arg("scale"), py::arg("bias"), py::arg("kh"),
        py::arg("kw"), py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("dh"), py::arg("dw"),
        py::arg("block_columns"));
  m.def("aq_matmul_tokens", &aq_matmul_tokens, "AQ lookup-table product, token-contiguous, codes column-major",
        py::arg("xt"), py::arg("codebooks"), py::arg("codes_t"), py::arg("scale"), py::arg("bias"),
        py::arg("block_columns"), py::arg("one_token") = true, py::arg("lookup") = int64_t(kAuto),
        py::arg("token_major") = false);
  // lookup numbers as in enum Lookup; cpu.py names them
  m.def("one_token_lookups", [](int64_t K, int64_t code_bytes) {
        std::vector<int64_t> runs;
        for (int64_t l : {kFloatPermutes, kGathers, kBytePlanes, kScalar})
          if (lookup_runs(l, K, code_bytes)) runs.push_back(l);
        return std::make_pair(auto_lookup(K, code_bytes), runs);
      }, "(the automatic lookup, those this build runs) for K codewords and 1- or 2-byte codes",
      py::arg("K"), py::arg("code_bytes"));
}
