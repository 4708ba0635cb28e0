// Host (CPU) kernels for the decode hot path, called from XLA through its FFI.
//
// XLA's CPU backend turns paged decode attention into thousands of tiny gather thunks per step,
// and a one-token KV scatter into a copy of the whole page array. These two kernels are the
// `native` attention backend of `pallas_kernels/cpu_native.py`, which builds this file with the
// system compiler and registers the handlers; the jnp references they are tested against are
// in `pallas_kernels/reference.py`:
//
//   DistservePagedDecodeF32  one query token per sequence against its paged K/V (online softmax)
//   DistserveWriteKVF32      new K/V rows into their page slots, in place (outputs alias inputs)
//   DistserveGatherPagesF32  whole pages of one array, by page id, into a contiguous block list
//   DistserveScatterPagesF32 a block list into pages by id, in place (the KV pull's two ends)
//   DistserveSimdPath        the name of the instruction-set path this build compiled (C ABI)
//
// SIMD paths: the float math is written once on GCC vector extensions (`v8`, eight floats),
// which the compiler lowers to the instruction set the build targets; `cpu_native.py` builds
// with -march=native (and, for tests, with narrower targets). The paths round differently: with
// FMA (AVX2 hosts) -ffp-contract=fast fuses every a * b + c, and with AVX the eight-token dot
// products are finished by `_mm256_hadd_ps` in another order than the portable `HSum`.
// `DistserveSimdPath` names the path from the compiler's macros: "avx512" (AVX-512F; `v8` stays
// 256 bits wide and rounds as on AVX2), "avx2" (AVX2 + FMA), "avx" (AVX, no FMA), "sse2" (the
// x86-64 baseline: `v8` as two SSE halves, the portable transpose) or "generic" (elsewhere).
//
// Cache layout (the runtime's): `[num_kv_heads, num_pages, page_size, head_dim]`.
// Work is split over XLA's intra-op thread pool. The caller takes work items too, so a kernel
// never waits on a pool thread that has not started: it only waits for items already running.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }

inline float HSum(v8 d) { return ((d[0] + d[4]) + (d[1] + d[5])) + ((d[2] + d[6]) + (d[3] + d[7])); }

// Lane t of the result is the sum of the lanes of s[t]: eight dot products finished at once.
inline v8 TransposeSum(const v8* s) {
#if defined(__AVX__)
  __m256 a = _mm256_hadd_ps(reinterpret_cast<__m256>(s[0]), reinterpret_cast<__m256>(s[1]));
  __m256 b = _mm256_hadd_ps(reinterpret_cast<__m256>(s[2]), reinterpret_cast<__m256>(s[3]));
  __m256 c = _mm256_hadd_ps(reinterpret_cast<__m256>(s[4]), reinterpret_cast<__m256>(s[5]));
  __m256 d = _mm256_hadd_ps(reinterpret_cast<__m256>(s[6]), reinterpret_cast<__m256>(s[7]));
  __m256 ab = _mm256_hadd_ps(a, b);  // per 128-bit half: tokens 0-3, partial sums of that half's lanes
  __m256 cd = _mm256_hadd_ps(c, d);
  return reinterpret_cast<v8>(_mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20),
                                            _mm256_permute2f128_ps(ab, cd, 0x31)));
#else
  v8 r;
  for (int t = 0; t < 8; ++t) r[t] = HSum(s[t]);
  return r;
#endif
}

typedef int32_t i8 __attribute__((vector_size(32)));

// exp of eight lanes for x <= 0 (scores minus their running max): x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by Cephes' expf polynomial (about 1 ulp), times 2^n through the exponent bits. x below -87
// (exp < 1.7e-38, far below any probability that moves a float32 sum) gives 0.
inline v8 Exp8(v8 x) {
  const i8 under = x < splat8(-87.f);
  x = under ? splat8(-87.f) : x;
  const v8 t = x * splat8(1.44269504088896341f) + splat8(0.5f);
  v8 n = __builtin_convertvector(__builtin_convertvector(t, i8), v8);
  n = n > t ? n - splat8(1.f) : n;  // floor(x log2(e) + 1/2)
  const v8 r = x - n * splat8(0.693359375f) - n * splat8(-2.12194440e-4f);
  v8 p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = p * r * r + r + splat8(1.f);
  const i8 bits = reinterpret_cast<i8>(p) + (__builtin_convertvector(n, i8) << 23);
  return under ? splat8(0.f) : reinterpret_cast<v8>(bits);
}

// ---------------------------------------------------------------------------- thread pool

struct ForState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  std::function<void(int64_t)> fn;
};

void RunItems(ForState* st) {
  for (int64_t i = st->next.fetch_add(1, std::memory_order_relaxed); i < st->n;
       i = st->next.fetch_add(1, std::memory_order_relaxed)) {
    st->fn(i);
    st->done.fetch_add(1, std::memory_order_release);
  }
}

// Runs fn(0..n-1) over the caller and up to `num_threads - 1` pool threads.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  int64_t workers = std::min<int64_t>(n, std::max<int64_t>(1, pool.num_threads()));
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto st = std::make_shared<ForState>();
  st->n = n;
  st->fn = fn;
  for (int64_t t = 1; t < workers; ++t) pool.Schedule([st] { RunItems(st.get()); });
  RunItems(st.get());
  while (st->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// ---------------------------------------------------------------------------- paged decode

constexpr float kMask = -1e30f;

inline float Dot(const float* a, const float* b, int64_t d) {
  int64_t i = 0;
  v8 acc = splat8(0.f);
  for (; i + 8 <= d; i += 8) acc += load8(a + i) * load8(b + i);
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += acc[j];
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void Axpy(float a, const float* x, float* y, int64_t d) {
  int64_t i = 0;
  v8 av = splat8(a);
  for (; i + 8 <= d; i += 8) store8(y + i, load8(y + i) + av * load8(x + i));
  for (; i < d; ++i) y[i] += a * x[i];
}

// One (sequence, kv head) item: the group's query heads against keys [first, len) of the
// sequence's pages, scores of up to 16 tokens at a time folded into an online softmax.
struct DecodeItem {
  const float* q;         // [G, D] this item's query heads
  const float* k;         // [P, PS, D] this kv head's pages
  const float* v;
  const int32_t* table;   // [W] the sequence's page ids (clamped into [0, P) when read)
  float* out;             // [G, D]
  int64_t G, D, PS, P, first, len;
  float scale;

  // The index contract shared with the jnp reference: page ids are clamped into [0, P - 1].
  int64_t Page(int64_t j) const { return std::min<int64_t>(std::max<int64_t>(table[j], 0), P - 1); }
};

// One query head's state for any head_dim: the scaled query read in place, the output row in memory.
struct GenericRow {
  const float* q;
  float* o;
  int64_t d;
  float scale;
  GenericRow(const float* q_, float* o_, int64_t d_, float scale_) : q(q_), o(o_), d(d_), scale(scale_) {
    std::fill(o, o + d, 0.f);
  }
  float Score(const float* k) const { return Dot(q, k, d) * scale; }
  v8 Score8(const float* k) const {
    v8 r;
    for (int t = 0; t < 8; ++t) r[t] = Score(k + t * d);
    return r;
  }
  void Rescale(float c) { for (int64_t i = 0; i < d; ++i) o[i] *= c; }
  void Add(float p, const float* v) { Axpy(p, v, o, d); }
  void Finish(float inv) { Rescale(inv); }
};

// head_dim = 8 * DV: the scaled query and the output accumulator as vectors. Eight tokens' scores
// take one query vector at a time (dimensions outside, tokens inside), so at head_dim 128 the
// query need not stay in registers beside the eight sums.
template <int DV>
struct VecRow {
  v8 q[DV], acc[DV];
  float* o;
  VecRow(const float* q_, float* o_, int64_t, float scale) : o(o_) {
    const v8 sv = splat8(scale);
    for (int i = 0; i < DV; ++i) q[i] = load8(q_ + 8 * i) * sv, acc[i] = splat8(0.f);
  }
  float Score(const float* k) const {
    v8 d = q[0] * load8(k);
    for (int i = 1; i < DV; ++i) d += q[i] * load8(k + 8 * i);
    return HSum(d);
  }
  // Scores of eight consecutive tokens (rows 8 * DV floats apart).
  v8 Score8(const float* k) const {
    v8 s[8];
    for (int t = 0; t < 8; ++t) s[t] = q[0] * load8(k + t * 8 * DV);
    for (int i = 1; i < DV; ++i) {
      const v8 qi = q[i];
      for (int t = 0; t < 8; ++t) s[t] += qi * load8(k + t * 8 * DV + 8 * i);
    }
    return TransposeSum(s);
  }
  void Rescale(float c) {
    const v8 cv = splat8(c);
    for (int i = 0; i < DV; ++i) acc[i] *= cv;
  }
  void Add(float p, const float* v) {
    const v8 pv = splat8(p);
    for (int i = 0; i < DV; ++i) acc[i] += pv * load8(v + 8 * i);
  }
  void Finish(float inv) {
    const v8 iv = splat8(inv);
    for (int i = 0; i < DV; ++i) store8(o + 8 * i, acc[i] * iv);
  }
};

// One online-softmax update of `row` (running max m, running sum l) with n <= 16 valid tokens
// (rows beyond the sequence's length are never read): scores eight at a time where there are
// eight, one rescale, then the weighted values.
template <typename Row>
inline void Update(Row& row, float& m, float& l, const float* k0, const float* v0, int64_t n, int64_t D) {
  alignas(32) float sc[16];
  alignas(32) float pr[16];
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) store8(sc + t, row.Score8(k0 + t * D));
  for (; t < n; ++t) sc[t] = row.Score(k0 + t * D);
  float mx = m;
  for (t = 0; t < n; ++t) mx = std::max(mx, sc[t]);
  const float corr = std::exp(m - mx);
  row.Rescale(corr);
  l *= corr;
  for (t = 0; t + 8 <= n; t += 8) {
    const v8 p = Exp8(load8(sc + t) - splat8(mx));
    store8(pr + t, p);
    l += HSum(p);
  }
  for (; t < n; ++t) l += (pr[t] = std::exp(sc[t] - mx));
  for (t = 0; t < n; ++t) row.Add(pr[t], v0 + t * D);
  m = mx;
}

// Query heads of one item taken together per page: each page is read from memory once for the
// whole group (up to kHeadBlock heads at a time), the other heads find it in L1.
constexpr int kHeadBlock = 8;

template <typename Row>
void Attend(const DecodeItem& it) {
  const int64_t D = it.D, PS = it.PS;
  for (int64_t g0 = 0; g0 < it.G; g0 += kHeadBlock) {
    const int64_t ng = std::min<int64_t>(kHeadBlock, it.G - g0);
    std::optional<Row> rows[kHeadBlock];
    float m[kHeadBlock], l[kHeadBlock];
    for (int64_t g = 0; g < ng; ++g) {
      rows[g].emplace(it.q + (g0 + g) * D, it.out + (g0 + g) * D, D, it.scale);
      m[g] = kMask;
      l[g] = 0.f;
    }
    for (int64_t j = it.first / PS; j * PS < it.len; ++j) {
      const int64_t t0 = std::max(it.first, j * PS), t1 = std::min(it.len, (j + 1) * PS);
      const float* kb = it.k + it.Page(j) * PS * D;  // token t at kb + (t - j * PS) * D
      const float* vb = it.v + it.Page(j) * PS * D;
      if ((j + 1) * PS < it.len) {
        // The next page sits anywhere in the cache (the hardware prefetchers cannot guess it):
        // ask for it now, so its lines arrive while this page is being scored.
        const int64_t off = it.Page(j + 1) * PS * D;
        for (int64_t b = 0; b < PS * D; b += 16) {
          __builtin_prefetch(it.k + off + b);
          __builtin_prefetch(it.v + off + b);
        }
      }
      for (int64_t tc = t0; tc < t1; tc += 16) {
        const int64_t n = std::min<int64_t>(t1 - tc, 16);
        for (int64_t g = 0; g < ng; ++g)
          Update(*rows[g], m[g], l[g], kb + (tc - j * PS) * D, vb + (tc - j * PS) * D, n, D);
      }
    }
    for (int64_t g = 0; g < ng; ++g) rows[g]->Finish(l[g] > 0.f ? 1.f / l[g] : 0.f);
  }
}

ffi::Error PagedDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                           ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> block_tables,
                           ffi::Buffer<ffi::S32> lengths, float scale, int32_t window,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k_pages.dimensions(), bd = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || bd.size() != 2 || bd[0] != qd[0] || kd[3] != qd[2] ||
      qd[1] % kd[0] != 0 || lengths.element_count() != static_cast<size_t>(qd[0]))
    return ffi::Error::InvalidArgument("paged_decode: inconsistent shapes");
  const int64_t S = qd[0], Hq = qd[1], D = qd[2];
  const int64_t Hkv = kd[0], P = kd[1], PS = kd[2], W = bd[1];
  const int64_t G = Hq / Hkv;
  const int32_t* bt = block_tables.typed_data();
  const int32_t* lens = lengths.typed_data();
  void (*attend)(const DecodeItem&) = Attend<GenericRow>;
  switch (D) {
    case 64: attend = Attend<VecRow<8>>; break;
    case 80: attend = Attend<VecRow<10>>; break;
    case 96: attend = Attend<VecRow<12>>; break;
    case 128: attend = Attend<VecRow<16>>; break;
    default: break;
  }
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data();
  const float* vp = v_pages.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, S * Hkv, [&](int64_t item) {
    const int64_t s = item / Hkv, h = item % Hkv;
    float* o = op + (s * Hq + h * G) * D;
    const int64_t len = std::min<int64_t>(lens[s], W * PS);
    if (len <= 0) {
      std::fill(o, o + G * D, 0.f);
      return;
    }
    const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    attend(DecodeItem{qp + (s * Hq + h * G) * D, kp + h * P * PS * D, vp + h * P * PS * D, bt + s * W, o,
                      G, D, PS, P, first, len, scale});
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------- KV write

ffi::Error WriteKVImpl(ffi::Buffer<ffi::F32> k_pages, ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::F32> k,
                       ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> slots, ffi::ResultBuffer<ffi::F32> k_out,
                       ffi::ResultBuffer<ffi::F32> v_out) {
  auto kd = k_pages.dimensions(), nd = k.dimensions();
  if (kd.size() != 4 || nd.size() != 3 || nd[1] != kd[0] || nd[2] != kd[3] ||
      slots.element_count() != static_cast<size_t>(nd[0]))
    return ffi::Error::InvalidArgument("write_kv: inconsistent shapes");
  const int64_t Hkv = kd[0], P = kd[1], PS = kd[2], D = kd[3], T = nd[0];
  float* ko = k_out->typed_data();
  float* vo = v_out->typed_data();
  // The outputs alias the inputs (input_output_aliases); copy only when XLA gave us fresh buffers.
  if (ko != k_pages.typed_data()) std::memcpy(ko, k_pages.typed_data(), k_pages.size_bytes());
  if (vo != v_pages.typed_data()) std::memcpy(vo, v_pages.typed_data(), v_pages.size_bytes());
  const int32_t* sl = slots.typed_data();
  const float* kn = k.typed_data();
  const float* vn = v.typed_data();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = sl[t];
    if (slot < 0 || slot >= P * PS) continue;  // the index contract: writes outside the cache are dropped
    for (int64_t h = 0; h < Hkv; ++h) {
      std::memcpy(ko + (h * P * PS + slot) * D, kn + (t * Hkv + h) * D, D * sizeof(float));
      std::memcpy(vo + (h * P * PS + slot) * D, vn + (t * Hkv + h) * D, D * sizeof(float));
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------- page gather / scatter

// Copies whole pages between a page array `[H, P, PS, D]` and a block list `[H, n, PS, D]`:
// block i is page ids[i] of every head. `to_blocks` picks the direction (gather when true).
// With repeated ids, a scatter's last block wins. The index contract of the jnp reference: a
// gather clamps ids into [0, P - 1], a scatter drops blocks whose id is outside [0, P).
ffi::Error MovePages(ffi::ThreadPool& pool, const char* name, ffi::Span<const int64_t> pd,
                     ffi::Span<const int64_t> bd, const int32_t* ids, int64_t n, float* pages, float* blocks,
                     bool to_blocks) {
  if (pd.size() != 4 || bd.size() != 4 || bd[0] != pd[0] || bd[1] != n || bd[2] != pd[2] || bd[3] != pd[3])
    return ffi::Error::InvalidArgument(std::string(name) + ": inconsistent shapes");
  const int64_t H = pd[0], P = pd[1], page = pd[2] * pd[3];
  ParallelFor(pool, H, [&](int64_t h) {
    for (int64_t i = 0; i < n; ++i) {
      int64_t id = ids[i];
      if (id < 0 || id >= P) {
        if (!to_blocks) continue;
        id = std::min<int64_t>(std::max<int64_t>(id, 0), P - 1);
      }
      float* pg = pages + (h * P + id) * page;
      float* bl = blocks + (h * n + i) * page;
      std::memcpy(to_blocks ? bl : pg, to_blocks ? pg : bl, page * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

// out[h, i] = pages[h, ids[i]]: pages `[H, P, PS, D]`, ids `[n]`, out `[H, n, PS, D]`.
ffi::Error GatherPagesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> pages, ffi::Buffer<ffi::S32> ids,
                           ffi::ResultBuffer<ffi::F32> out) {
  return MovePages(pool, "gather_pages", pages.dimensions(), out->dimensions(), ids.typed_data(),
                   ids.element_count(), pages.typed_data(), out->typed_data(), true);
}

// pages[h, ids[i]] = blocks[h, i], in place (the output aliases `pages`); with repeated ids the
// last block wins. pages `[H, P, PS, D]`, blocks `[H, n, PS, D]`, ids `[n]`.
ffi::Error ScatterPagesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> pages, ffi::Buffer<ffi::F32> blocks,
                            ffi::Buffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> out) {
  float* dst = out->typed_data();
  auto pd = pages.dimensions();
  if (dst != pages.typed_data())  // XLA gave a fresh buffer instead of the aliased pages
    std::memcpy(dst, pages.typed_data(), pages.size_bytes());
  return MovePages(pool, "scatter_pages", pd, blocks.dimensions(), ids.typed_data(), ids.element_count(), dst,
                   blocks.typed_data(), false);
}

}  // namespace

// The instruction-set path of this build (see the header): a static string, never freed.
extern "C" __attribute__((visibility("default"))) const char* DistserveSimdPath() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#elif defined(__AVX2__)
  return "avx2-nofma";
#elif defined(__AVX__)
  return "avx";
#elif defined(__SSE2__)
  return "sse2";
#else
  return "generic";
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DistserveGatherPagesF32, GatherPagesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DistserveScatterPagesF32, ScatterPagesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DistservePagedDecodeF32, PagedDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Attr<int32_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DistserveWriteKVF32, WriteKVImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
