// pldr_jax's one-token decode step over a heads-first KV-cache, for XLA:CPU (a jax.ffi custom call):
// write this step's key and value into the cache, then attend over the cache.
//
// Built and registered by pldr_jax/kernels/build.py; called by pldr_jax/kernels/decode_attention.py,
// whose docstring is the contract.  For every (row b, head h):
//
//   k_buf[b, h, pos[b]] = k_new[b, h];  v_buf[b, h, pos[b]] = v_new[b, h]   (0 <= pos[b] < S; else no write)
//   qg        = rnd(q[b, h] @ G[b | 0, h])                      (float32 products and sums)
//   logits[s] = (qg . k_buf[b, h, s]) * scale                   (mask[b, s]; masked slots are not read)
//   p         = rnd(softmax(logits))                            (float32 max, exp, sum; masked p = 0)
//   out[b, h] = p @ v_buf[b, h]                                 (float32 accumulation)
//
// rnd() rounds to bfloat16 (nearest even) and back when `round_bf16`, else is the identity: the casts
// of q @ G_LM and of the probabilities to a 16-bit model's dtype in pldr_jax.ops.attention.plga_attention.
// Shapes: q [B, H, dk] f32; g [Bg, H, dk, dk] f32 (Bg = 1 or B); k_new / v_new [B, H, dk] and
// k_buf / v_buf [B, H, S, dk], float32 or bfloat16 (all four the same); pos [B] s32; mask [B, S] pred
// (true = may attend; every row keeps at least one slot).  Results: out [B, H, dk] f32, then k_buf and
// v_buf (aliased to the inputs by the caller: updated in place).
//
// A masked slot's key and value are never read, so a step reads only the live part of the cache.
// The (row, head) pairs are split over XLA's intra-op thread pool: the calling thread and the tasks
// it schedules claim pairs from one atomic counter, so the call never waits for a task that has not
// started (a busy pool only means the caller does more of the pairs itself).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kMasked = -0.7f * 3.4028234663852886e38f;   // jax.nn.dot_product_attention's

inline float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) {           // inf / nan: truncate (a nan stays a nan)
    if (u & 0x007fffffu) u |= 0x00400000u;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
  }
  u &= 0xffff0000u;
  float y;
  std::memcpy(&y, &u, 4);
  return y;
}

struct BF16 { uint16_t bits; };

inline float to_f32(float x) { return x; }
inline float to_f32(BF16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float y;
  std::memcpy(&y, &u, 4);
  return y;
}

template <typename T>
struct Problem {
  const float* q; const float* g; const T* k_new; const T* v_new; const int32_t* pos; const bool* mask;
  T* k; T* v; float* out;
  int64_t B, H, S, dk, Bg;
  float scale;
  bool round;
};

// This step's key and value of (row b, head) `pair` into its buffers K, V [S, dk] at slot pos[b]
// (nothing outside [0, S)).
template <typename T>
inline void write_new(const Problem<T>& P, int64_t pair, int64_t b, int64_t dk, T* K, T* V) {
  const int32_t pb = P.pos[b];
  if (pb >= 0 && pb < P.S) {
    std::memcpy(K + pb * dk, P.k_new + pair * dk, dk * sizeof(T));
    std::memcpy(V + pb * dk, P.v_new + pair * dk, dk * sizeof(T));
  }
}

// One (row, head) pair, any dk (the scalar path); `scratch` holds at least S + dk floats.
template <typename T>
void one_pair(const Problem<T>& P, int64_t pair, float* scratch, bool /*warm*/) {
  const int64_t b = pair / P.H, h = pair % P.H, dk = P.dk, S = P.S;
  T* K = P.k + pair * S * dk;
  T* V = P.v + pair * S * dk;
  write_new(P, pair, b, dk, K, V);
  float* qg = scratch;
  float* logits = scratch + dk;
  const float* q = P.q + pair * dk;
  const float* g = P.g + ((P.Bg == 1 ? 0 : b) * P.H + h) * dk * dk;
  for (int64_t e = 0; e < dk; ++e) qg[e] = 0.f;
  for (int64_t d = 0; d < dk; ++d) {
    const float qd = q[d];
    const float* gr = g + d * dk;
#pragma omp simd
    for (int64_t e = 0; e < dk; ++e) qg[e] += qd * gr[e];
  }
  if (P.round)
    for (int64_t e = 0; e < dk; ++e) qg[e] = round_bf16(qg[e]);
  const bool* m = P.mask + b * S;
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (!m[s]) { logits[s] = kMasked; continue; }
    const T* kr = K + s * dk;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < dk; ++d) acc += qg[d] * to_f32(kr[d]);
    logits[s] = acc * P.scale;
    mx = std::max(mx, logits[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const float e = m[s] ? std::exp(logits[s] - mx) : 0.f;
    logits[s] = e;
    total += e;
  }
  float* o = P.out + pair * dk;
  for (int64_t d = 0; d < dk; ++d) o[d] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (!m[s]) continue;
    float p = logits[s] / total;
    if (P.round) p = round_bf16(p);
    if (p == 0.f) continue;
    const T* vr = V + s * dk;
#pragma omp simd
    for (int64_t d = 0; d < dk; ++d) o[d] += p * to_f32(vr[d]);
  }
}


// ---- the fast path: dk a multiple of 8 up to 256, 8-lane vectors (GCC / Clang vector extensions:
// AVX-512 / AVX2 / NEON as -march=native provides), every accumulator in registers ----
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));          // unaligned loads / stores
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h_u __attribute__((vector_size(16), aligned(2)));
typedef uint32_t v8u __attribute__((vector_size(32)));

inline v8f load8(const float* p) { return *reinterpret_cast<const v8f_u*>(p); }
inline v8f load8(const BF16* p) {
#if defined(__AVX2__)
  // one zero-extending load and a shift (GCC splits the generic form below into two 4-lane halves)
  const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<v8f>(_mm256_castsi256_ps(w));
#else
  const v8h_u h = *reinterpret_cast<const v8h_u*>(p);
  const v8u w = __builtin_convertvector(h, v8u) << 16;
  v8f f;
  std::memcpy(&f, &w, 32);
  return f;
#endif
}
inline float hsum(v8f a) {
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// The live slots of row b: [lo, hi) holds every slot its mask keeps (hi = lo = 0 if none).
inline void live_range(const bool* m, int64_t S, int64_t& lo, int64_t& hi) {
  lo = 0;
  while (lo < S && !m[lo]) ++lo;
  hi = S;
  while (hi > lo && !m[hi - 1]) --hi;
  if (lo == S) lo = hi = 0;
}

// One software-prefetch cursor over the bytes a thread reads, in the order it reads them: this
// pair's G [dk, dk], its live keys, its live values, then the next pair's three -- kept `kAhead`
// bytes in front of the reads (one 64-byte line per line consumed).  A pair's streams are a few
// KB each and start on a new 4 KB page every few KB, where the hardware prefetchers stop; a
// cursor that runs on across them and into the next pair took a plain read of these bytes from
// ~13 to ~21 GB/s on one core (experiments/README.md "Decode attention on CPU: forms and the native kernel").
// Prefetching never reads values: a masked slot inside [lo, hi) is fetched, never used.
constexpr int64_t kAhead = 8192;

struct PrefetchStream {
  const char* p[6];
  int64_t n[6];
  int count = 0, s = 0;
  int64_t o = 0;

  void add(const void* ptr, int64_t bytes) {
    if (bytes <= 0) return;
    p[count] = static_cast<const char*>(ptr);
    n[count++] = bytes;
  }
  // issue `lines` prefetches at the cursor and move it on
  inline void run(int64_t lines) {
    for (; lines > 0 && s < count; --lines) {
      __builtin_prefetch(p[s] + o, 0, 2);
      o += 64;
      if (o >= n[s]) { ++s; o = 0; }
    }
  }
  // move the cursor `bytes` on, prefetching only when `fetch` (the start of a cold run of pairs)
  inline void skip(int64_t bytes, bool fetch) {
    if (fetch) { run((bytes + 63) / 64); return; }
    while (bytes > 0 && s < count) {
      const int64_t take = std::min(bytes, n[s] - o);
      o += take; bytes -= take;
      if (o >= n[s]) { ++s; o = 0; }
    }
  }
};

// The stream of pair `pair` followed by pair `pair + 1` (if any).
template <typename T>
PrefetchStream stream_for(const Problem<T>& P, int64_t pair) {
  PrefetchStream st;
  const int64_t dk = P.dk, S = P.S;
  for (int64_t q = pair; q < std::min(pair + 2, P.B * P.H); ++q) {
    const int64_t b = q / P.H, h = q % P.H;
    int64_t lo, hi;
    live_range(P.mask + b * S, S, lo, hi);
    st.add(P.g + ((P.Bg == 1 ? 0 : b) * P.H + h) * dk * dk, dk * dk * int64_t(sizeof(float)));
    st.add(P.k + (q * S + lo) * dk, (hi - lo) * dk * int64_t(sizeof(T)));
    st.add(P.v + (q * S + lo) * dk, (hi - lo) * dk * int64_t(sizeof(T)));
  }
  return st;
}

// exp(x) for x <= 0 (logits minus their maximum): Cephes' expf (range reduction by ln 2, degree-6
// polynomial), ~1 ulp; below -87.3 it returns ~1e-38 instead of the denormals / 0 (only ever a
// masked-out or negligible probability).
inline v8f exp8(v8f x) {
  x = x < splat(-87.3365447f) ? splat(-87.3365447f) : x;
  v8f fx = x * splat(1.44269504088896341f) + splat(0.5f);
  v8i n = __builtin_convertvector(fx, v8i);
  v8f fn = __builtin_convertvector(n, v8f);
  fn = fn > fx ? fn - splat(1.f) : fn;                       // floor
  n = __builtin_convertvector(fn, v8i);
  x = x - fn * splat(0.693359375f) - fn * splat(-2.12194440e-4f);
  v8f y = splat(1.9875691500E-4f);
  y = y * x + splat(1.3981999507E-3f);
  y = y * x + splat(8.3334519073E-3f);
  y = y * x + splat(4.1665795894E-2f);
  y = y * x + splat(1.6666665459E-1f);
  y = y * x + splat(5.0000001201E-1f);
  y = y * x * x + x + splat(1.f);
  const v8i e = (n + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &e, 32);
  return y * scale;
}

template <int C, typename T>   // C = dk / 8 lanes
void one_pair_fast(const Problem<T>& P, int64_t pair, float* scratch, bool warm) {
  constexpr int64_t dk = 8 * C;
  constexpr int64_t row_lines = dk * sizeof(float) / 64, slot_lines = (dk * sizeof(T) + 63) / 64;
  const int64_t b = pair / P.H, h = pair % P.H, S = P.S;
  T* K = P.k + pair * S * dk;
  T* V = P.v + pair * S * dk;
  write_new(P, pair, b, dk, K, V);
  // warm: the previous pair on this thread was pair - 1, whose stream already fetched our first
  // kAhead bytes; else fetch them now
  PrefetchStream ps = stream_for(P, pair);
  ps.skip(kAhead, !warm);
  // qg = rnd(q @ G)
  v8f qg[C];
  for (int c = 0; c < C; ++c) qg[c] = splat(0.f);
  const float* q = P.q + pair * dk;
  const float* g = P.g + ((P.Bg == 1 ? 0 : b) * P.H + h) * dk * dk;
  for (int64_t d = 0; d < dk; ++d) {
    ps.run(row_lines);
    const v8f qd = splat(q[d]);
    for (int c = 0; c < C; ++c) qg[c] += qd * load8(g + d * dk + 8 * c);
  }
  if (P.round)
    for (int c = 0; c < C; ++c)
      for (int l = 0; l < 8; ++l) qg[c][l] = round_bf16(qg[c][l]);
  // logits over the live slots, four slots per pass (independent accumulator chains)
  const bool* m = P.mask + b * S;
  float* logits = scratch;
  int32_t* live = reinterpret_cast<int32_t*>(scratch + S);
  int64_t n = 0;
  for (int64_t s = 0; s < S; ++s) if (m[s]) live[n++] = int32_t(s);
  float mx = -INFINITY;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ps.run(4 * slot_lines);
    const T* k0 = K + live[i] * dk; const T* k1 = K + live[i + 1] * dk;
    const T* k2 = K + live[i + 2] * dk; const T* k3 = K + live[i + 3] * dk;
    v8f a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
    for (int c = 0; c < C; ++c) {
      a0 += qg[c] * load8(k0 + 8 * c); a1 += qg[c] * load8(k1 + 8 * c);
      a2 += qg[c] * load8(k2 + 8 * c); a3 += qg[c] * load8(k3 + 8 * c);
    }
    logits[i] = hsum(a0) * P.scale; logits[i + 1] = hsum(a1) * P.scale;
    logits[i + 2] = hsum(a2) * P.scale; logits[i + 3] = hsum(a3) * P.scale;
  }
  for (; i < n; ++i) {
    ps.run(slot_lines);
    const T* k0 = K + live[i] * dk;
    v8f a0 = splat(0.f);
    for (int c = 0; c < C; ++c) a0 += qg[c] * load8(k0 + 8 * c);
    logits[i] = hsum(a0) * P.scale;
  }
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, logits[j]);
  // exp and sum, eight at a time
  float total = 0.f;
  {
    v8f tot = splat(0.f);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const v8f e = exp8(load8(logits + j) - splat(mx));
      *reinterpret_cast<v8f_u*>(logits + j) = e;
      tot += e;
    }
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = j; t < n; ++t) tail[t - j] = logits[t] - mx;
    v8f e = exp8(load8(tail));
    for (int64_t t = j; t < n; ++t) { logits[t] = e[t - j]; }
    for (int64_t t = n - j; t < 8; ++t) e[t] = 0.f;
    tot += e;
    // XLA sums the row in a different order; float32 rounding only
    total = hsum(tot);
  }
  // out = rnd(p) @ V over the live slots
  v8f o[C];
  for (int c = 0; c < C; ++c) o[c] = splat(0.f);
  for (int64_t j = 0; j < n; ++j) {
    ps.run(slot_lines);
    float p = logits[j] / total;
    if (P.round) p = round_bf16(p);
    const v8f pv = splat(p);
    const T* vr = V + live[j] * dk;
    for (int c = 0; c < C; ++c) o[c] += pv * load8(vr + 8 * c);
  }
  float* out = P.out + pair * dk;
  for (int c = 0; c < C; ++c) *reinterpret_cast<v8f_u*>(out + 8 * c) = o[c];
}

template <typename T>
using PairFn = void (*)(const Problem<T>&, int64_t, float*, bool);

template <typename T>
PairFn<T> pick(int64_t dk) {
  switch (dk) {
    case 32: return one_pair_fast<4, T>;
    case 64: return one_pair_fast<8, T>;
    case 96: return one_pair_fast<12, T>;
    case 128: return one_pair_fast<16, T>;
    default: return one_pair<T>;
  }
}

template <typename T>
struct Shared {
  Problem<T> P;
  int64_t pairs = 0, per_claim = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename T>
void work(Shared<T>& st) {
  std::vector<float> scratch(2 * st.P.S + st.P.dk + 8);
  const PairFn<T> fn = pick<T>(st.P.dk);
  int64_t last = -2;
  for (;;) {
    const int64_t start = st.next.fetch_add(st.per_claim);
    if (start >= st.pairs) return;
    const int64_t end = std::min(st.pairs, start + st.per_claim);
    for (int64_t p = start; p < end; ++p) {
      fn(st.P, p, scratch.data(), p == last + 1);
      last = p;
    }
    if (st.done.fetch_add(end - start) + (end - start) == st.pairs) {
      std::lock_guard<std::mutex> lock(st.mu);
      st.cv.notify_all();
    }
  }
}

template <typename T>
void run(ffi::ThreadPool& pool, const Problem<T>& problem, int64_t threads) {
  auto st = std::make_shared<Shared<T>>();
  st->P = problem;
  st->pairs = problem.B * problem.H;
  int64_t n = threads > 0 ? threads : pool.num_threads();
  n = std::max<int64_t>(1, std::min<int64_t>(n, st->pairs));
  st->per_claim = std::max<int64_t>(1, st->pairs / (8 * n));
  for (int64_t t = 1; t < n; ++t) pool.Schedule([st] { work(*st); });
  work(*st);
  std::unique_lock<std::mutex> lock(st->mu);
  st->cv.wait(lock, [&] { return st->done.load() == st->pairs; });
}

bool dims_are(ffi::AnyBuffer::Dimensions d, std::initializer_list<int64_t> want) {
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want) if (d[i++] != w) return false;
  return true;
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> g,
                           ffi::AnyBuffer k_new, ffi::AnyBuffer v_new, ffi::Buffer<ffi::S32> pos,
                           ffi::Buffer<ffi::PRED> mask, ffi::AnyBuffer k_in, ffi::AnyBuffer v_in,
                           ffi::ResultBuffer<ffi::F32> out, ffi::Result<ffi::AnyBuffer> k_buf,
                           ffi::Result<ffi::AnyBuffer> v_buf, float scale, bool round_bf16, int64_t threads) {
  auto kd = k_in.dimensions();
  if (kd.size() != 4) return ffi::Error::InvalidArgument("pldr_decode_attention: k_buf must be [B, H, S, dk]");
  const int64_t B = kd[0], H = kd[1], S = kd[2], dk = kd[3];
  const int64_t Bg = g.dimensions().size() == 4 ? g.dimensions()[0] : -1;
  if (!dims_are(q.dimensions(), {B, H, dk}) || (Bg != 1 && Bg != B) || !dims_are(g.dimensions(), {Bg, H, dk, dk}) ||
      !dims_are(k_new.dimensions(), {B, H, dk}) || !dims_are(v_new.dimensions(), {B, H, dk}) ||
      !dims_are(pos.dimensions(), {B}) || !dims_are(mask.dimensions(), {B, S}) || !dims_are(v_in.dimensions(), {B, H, S, dk}) ||
      !dims_are(out->dimensions(), {B, H, dk}))
    return ffi::Error::InvalidArgument("pldr_decode_attention: inconsistent shapes");
  const auto dt = k_in.element_type();
  if (v_in.element_type() != dt || k_new.element_type() != dt || v_new.element_type() != dt ||
      k_buf->element_type() != dt || v_buf->element_type() != dt)
    return ffi::Error::InvalidArgument("pldr_decode_attention: keys / values of different dtypes");
  // XLA aliases k_buf / v_buf to k_in / v_in; if it gave fresh buffers, start them as copies
  if (k_buf->untyped_data() != k_in.untyped_data()) std::memcpy(k_buf->untyped_data(), k_in.untyped_data(), k_in.size_bytes());
  if (v_buf->untyped_data() != v_in.untyped_data()) std::memcpy(v_buf->untyped_data(), v_in.untyped_data(), v_in.size_bytes());
  if (dt == ffi::DataType::F32) {
    Problem<float> P{q.typed_data(), g.typed_data(), static_cast<const float*>(k_new.untyped_data()),
                     static_cast<const float*>(v_new.untyped_data()), pos.typed_data(), mask.typed_data(),
                     static_cast<float*>(k_buf->untyped_data()), static_cast<float*>(v_buf->untyped_data()),
                     out->typed_data(), B, H, S, dk, Bg, scale, round_bf16};
    run(pool, P, threads);
  } else if (dt == ffi::DataType::BF16) {
    Problem<BF16> P{q.typed_data(), g.typed_data(), static_cast<const BF16*>(k_new.untyped_data()),
                    static_cast<const BF16*>(v_new.untyped_data()), pos.typed_data(), mask.typed_data(),
                    static_cast<BF16*>(k_buf->untyped_data()), static_cast<BF16*>(v_buf->untyped_data()),
                    out->typed_data(), B, H, S, dk, Bg, scale, round_bf16};
    run(pool, P, threads);
  } else {
    return ffi::Error::InvalidArgument("pldr_decode_attention: keys / values must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PldrDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q
                                  .Arg<ffi::Buffer<ffi::F32>>()    // g
                                  .Arg<ffi::AnyBuffer>()           // k_new
                                  .Arg<ffi::AnyBuffer>()           // v_new
                                  .Arg<ffi::Buffer<ffi::S32>>()    // pos
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // mask
                                  .Arg<ffi::AnyBuffer>()           // k_buf (in)
                                  .Arg<ffi::AnyBuffer>()           // v_buf (in)
                                  .Ret<ffi::Buffer<ffi::F32>>()    // out
                                  .Ret<ffi::AnyBuffer>()           // k_buf (out, aliased)
                                  .Ret<ffi::AnyBuffer>()           // v_buf (out, aliased)
                                  .Attr<float>("scale")
                                  .Attr<bool>("round_bf16")
                                  .Attr<int64_t>("threads"));
