// pldr_jax native XLA:CPU kernel: a matmul over a weight packed in 16-output panels, for decoding.
//
//   y[m, n] = sum_k x[m, k] * w[n, k] + bias[n]        x [M, K], y [M, N], bias [N]
//
// The weight is stored packed, once, when the decode weights are prepared
// (`pldr_jax.kernels.packed_matmul.pack_kernel`): [P, K, 16] with P = ceil(N / 16), panel p holding
// outputs 16p .. 16p+15 (zeros past N), each k's 16 weights contiguous.  A panel is then one
// contiguous stream, read once per call whatever M is (M <= 8 rows at a time share one read of it;
// more rows re-read it from cache), which is what a decode step's small M needs: XLA:CPU's float32
// products of 8-32 rows run at a fraction of the memory bandwidth that the weights' bytes allow
// (experiments/README.md "A packed-panel matmul for the float32 decode weights").
//
// Arithmetic: every y[m, n] is a float32 sum over k in a fixed order -- partial sums of 128
// consecutive terms (fused multiply-adds where the compiler emits them), added in order -- so the
// result does not depend on the thread count or on how rows are blocked.  The weight is float32 or bfloat16; x has the weight's dtype.
// bfloat16: products of bfloat16 values are exact in float32 and accumulate in float32 (as
// XLA's bfloat16 dot with a float32 result), the sum is rounded to bfloat16 and the bias added in
// bfloat16 (as `ops.layers.linear` computes it: dot -> bfloat16, then + bias).
//
// Threads: pairs of panels are claimed from an atomic counter by the calling thread and XLA's
// intra-op thread pool (`ffi::ThreadPool`).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
constexpr int kPanel = 16;   // outputs per panel
constexpr int kRows = 8;     // rows of x sharing one pass over a panel pair
constexpr int kChunk = 128;  // terms of a partial sum (see rows_by_panels)

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {   // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline v16 load_panel(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v16 load_panel(const uint16_t* p) {   // 16 bfloat16 -> float32 (exact)
  typedef uint32_t u16x32 __attribute__((vector_size(64)));
  typedef uint16_t h16 __attribute__((vector_size(32)));
  h16 h;
  std::memcpy(&h, p, sizeof(h));
  u16x32 u = __builtin_convertvector(h, u16x32) << 16;
  v16 v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) { return bf16_to_f32(v); }

template <typename T>
struct Job {
  const T* x;
  const T* w;
  const T* bias;
  T* y;
  int64_t M, K, N, panels, pairs;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

inline void store(float* y, const float* acc, const float* bias, int n) {
  for (int i = 0; i < n; ++i) y[i] = acc[i] + bias[i];
}

inline void store(uint16_t* y, const float* acc, const uint16_t* bias, int n) {
  for (int i = 0; i < n; ++i) y[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(acc[i])) + bf16_to_f32(bias[i]));
}

// Rows m0 .. m0 + R of x against np (1 or 2) panels starting at panel p0.  The sum over k runs in
// chunks of kChunk terms, each chunk's partial sum added to the running total in order: a sequential
// sum's rounding error grows with K, a chunked one's with kChunk + K / kChunk.
template <int R, typename T>
void rows_by_panels(const Job<T>& j, int64_t p0, int np, int64_t m0) {
  v16 total[R][2];
  for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = v16{};
  const int64_t K = j.K;
  const T* w0 = j.w + p0 * K * kPanel;
  const T* w1 = w0 + K * kPanel;
  const T* x = j.x + m0 * K;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min<int64_t>(K, k0 + kChunk);
    v16 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = v16{};
    if (np == 2) {
      for (int64_t k = k0; k < k1; ++k) {
        const v16 a = load_panel(w0 + k * kPanel), b = load_panel(w1 + k * kPanel);
        for (int r = 0; r < R; ++r) {
          const float s = scalar(x[r * K + k]);
          acc[r][0] += a * s;
          acc[r][1] += b * s;
        }
      }
    } else {
      for (int64_t k = k0; k < k1; ++k) {
        const v16 a = load_panel(w0 + k * kPanel);
        for (int r = 0; r < R; ++r) acc[r][0] += a * scalar(x[r * K + k]);
      }
    }
    for (int r = 0; r < R; ++r) {
      total[r][0] += acc[r][0];
      total[r][1] += acc[r][1];
    }
  }
  for (int q = 0; q < np; ++q) {
    const int64_t n0 = (p0 + q) * kPanel;
    const int n = static_cast<int>(std::min<int64_t>(kPanel, j.N - n0));
    for (int r = 0; r < R; ++r) {
      float out[kPanel];
      std::memcpy(out, &total[r][q], sizeof(out));
      store(j.y + (m0 + r) * j.N + n0, out, j.bias + n0, n);
    }
  }
}

template <typename T>
void pair_all_rows(const Job<T>& j, int64_t pair) {
  const int64_t p0 = 2 * pair;
  const int np = static_cast<int>(std::min<int64_t>(2, j.panels - p0));
  int64_t m0 = 0;
  for (; m0 + kRows <= j.M; m0 += kRows) rows_by_panels<kRows>(j, p0, np, m0);
  switch (j.M - m0) {
    case 1: rows_by_panels<1>(j, p0, np, m0); break;
    case 2: rows_by_panels<2>(j, p0, np, m0); break;
    case 3: rows_by_panels<3>(j, p0, np, m0); break;
    case 4: rows_by_panels<4>(j, p0, np, m0); break;
    case 5: rows_by_panels<5>(j, p0, np, m0); break;
    case 6: rows_by_panels<6>(j, p0, np, m0); break;
    case 7: rows_by_panels<7>(j, p0, np, m0); break;
    default: break;
  }
}

template <typename T>
void work(Job<T>& j) {
  for (;;) {
    const int64_t pair = j.next.fetch_add(1);
    if (pair >= j.pairs) return;
    pair_all_rows(j, pair);
    if (j.done.fetch_add(1) + 1 == j.pairs) {
      std::lock_guard<std::mutex> lock(j.mu);
      j.cv.notify_all();
    }
  }
}

template <typename T>
void run(ffi::ThreadPool& pool, const T* x, const T* w, const T* bias, T* y, int64_t M, int64_t K, int64_t N,
         int64_t panels, int64_t threads) {
  auto j = std::make_shared<Job<T>>();
  j->x = x; j->w = w; j->bias = bias; j->y = y;
  j->M = M; j->K = K; j->N = N; j->panels = panels; j->pairs = (panels + 1) / 2;
  if (M == 0 || j->pairs == 0) return;
  int64_t n = threads > 0 ? threads : pool.num_threads();
  n = std::max<int64_t>(1, std::min<int64_t>(n, j->pairs));
  for (int64_t t = 1; t < n; ++t) pool.Schedule([j] { work(*j); });
  work(*j);
  std::unique_lock<std::mutex> lock(j->mu);
  j->cv.wait(lock, [&] { return j->done.load() == j->pairs; });
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                        ffi::Result<ffi::AnyBuffer> y, int64_t threads) {
  auto xd = x.dimensions(), wd = w.dimensions(), bd = bias.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || bd.size() != 1 || yd.size() != 2)
    return ffi::Error::InvalidArgument("pldr_packed_matmul: expected x [M, K], w [P, K, 16], bias [N], y [M, N]");
  const int64_t M = xd[0], K = xd[1], P = wd[0], N = bd[0];
  if (wd[1] != K || wd[2] != kPanel || yd[0] != M || yd[1] != N || N > P * kPanel || N <= (P - 1) * kPanel)
    return ffi::Error::InvalidArgument("pldr_packed_matmul: inconsistent shapes");
  const auto dt = w.element_type();
  if (x.element_type() != dt || bias.element_type() != dt || y->element_type() != dt)
    return ffi::Error::InvalidArgument("pldr_packed_matmul: x, w, bias and y must share one dtype");
  if (dt == ffi::DataType::F32) {
    run(pool, static_cast<const float*>(x.untyped_data()), static_cast<const float*>(w.untyped_data()),
        static_cast<const float*>(bias.untyped_data()), static_cast<float*>(y->untyped_data()), M, K, N, P, threads);
  } else if (dt == ffi::DataType::BF16) {
    run(pool, static_cast<const uint16_t*>(x.untyped_data()), static_cast<const uint16_t*>(w.untyped_data()),
        static_cast<const uint16_t*>(bias.untyped_data()), static_cast<uint16_t*>(y->untyped_data()), M, K, N, P,
        threads);
  } else {
    return ffi::Error::InvalidArgument("pldr_packed_matmul: float32 or bfloat16 only");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PldrPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()   // x [M, K]
                                  .Arg<ffi::AnyBuffer>()   // w [P, K, 16]
                                  .Arg<ffi::AnyBuffer>()   // bias [N]
                                  .Ret<ffi::AnyBuffer>()   // y [M, N]
                                  .Attr<int64_t>("threads"));
