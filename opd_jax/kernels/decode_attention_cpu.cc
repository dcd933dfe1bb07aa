// One-token grouped-query attention over the filled slots of a stacked KV cache, for XLA:CPU (an FFI handler).
//
// Why a kernel: XLA:CPU hands every dot to a library that wants each operand in its own buffer, so a cache block
// read at a traced (layer, block) offset is first copied out and then read again. This reads the cache where it
// lies, once, and splits the (row, kv head) pairs over XLA's intra-op thread pool. Layout matches KVCache:
//   q      f32 [B, KV, G, D]   already scaled by 1/sqrt(D)
//   kc     f32 [L, B, KV, NB, D, BLK]   K transposed within each block of BLK slots
//   vc     f32 [L, B, KV, S, D]         S = NB * BLK
//   layer  s32 []  which layer of the stack
//   valid  pred [B, S]  slot holds a real token
//   n      s32 []  slots [0, n) are filled
//   out    f32 [B, KV, G, D]
// A row with no valid filled slot gets zeros, as the JAX path does.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Dims {
  int64_t B, KV, G, D, NB, BLK, S;
};

// exp(x) for x <= 0 (scores minus their row maximum), written so the compiler vectorizes it: Cody-Waite range
// reduction and a degree-6 polynomial (the Cephes expf), about 1 ulp. Below -87 it returns 0.
inline float ExpNonPositive(float x) {
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  const float scale = std::bit_cast<float>((e > 0 ? e : 0) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

// scores[g, j*BLK + s] = q[g] . k[j*BLK + s] for the blocks j < nblocks. Within a block K is [D, BLK]: the
// slots are contiguous, and a compile-time BLK lets each query head's BLK sums stay in registers.
template <int64_t kBlk>
void Scores(const float* qh, const float* kh, int64_t G, int64_t D, int64_t blk_rt, int64_t nblocks, int64_t width,
            float* scores) {
  const int64_t BLK = kBlk > 0 ? kBlk : blk_rt;
  for (int64_t j = 0; j < nblocks; ++j) {
    const float* kb = kh + j * D * BLK;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qh + g * D;
      float* out = scores + g * width + j * BLK;
      if constexpr (kBlk > 0) {
        float acc[kBlk] = {};
        for (int64_t e = 0; e < D; ++e) {
          const float qe = qg[e];
          const float* krow = kb + e * kBlk;
          for (int64_t s = 0; s < kBlk; ++s) acc[s] += qe * krow[s];
        }
        std::copy(acc, acc + kBlk, out);
      } else {
        std::fill(out, out + BLK, 0.0f);
        for (int64_t e = 0; e < D; ++e) {
          const float qe = qg[e];
          const float* krow = kb + e * BLK;
          for (int64_t s = 0; s < BLK; ++s) out[s] += qe * krow[s];
        }
      }
    }
  }
}

// Attention for one (row b, kv head h): its G query heads share every K/V read.
void AttendOne(const Dims& d, const float* q, const float* kc, const float* vc, const bool* valid, int64_t layer,
               int64_t n, int64_t b, int64_t h, float* out, std::vector<float>& scores) {
  const int64_t G = d.G, D = d.D, BLK = d.BLK;
  const int64_t nblocks = (n + BLK - 1) / BLK;
  const int64_t width = nblocks * BLK;
  scores.resize(G * width);
  const float* qh = q + (b * d.KV + h) * G * D;
  const float* kh = kc + ((layer * d.B + b) * d.KV + h) * d.NB * D * BLK;
  const float* vh = vc + ((layer * d.B + b) * d.KV + h) * d.S * D;
  const bool* ok = valid + b * d.S;
  float* oh = out + (b * d.KV + h) * G * D;
  std::fill(oh, oh + G * D, 0.0f);

  if (BLK == 64)
    Scores<64>(qh, kh, G, D, BLK, nblocks, width, scores.data());
  else
    Scores<0>(qh, kh, G, D, BLK, nblocks, width, scores.data());

  // Probabilities in place, zero for pad and unfilled slots.
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * width;
    float m = kNegInf;
    for (int64_t s = 0; s < n; ++s) m = std::max(m, ok[s] ? sg[s] : kNegInf);
    if (m == kNegInf) {  // no valid key: this head's output stays zero
      std::fill(sg, sg + n, 0.0f);
      continue;
    }
    float denom = 0.0f;
    for (int64_t s = 0; s < n; ++s) {
      const float p = ok[s] ? ExpNonPositive(sg[s] - m) : 0.0f;
      sg[s] = p;
      denom += p;
    }
    const float inv = 1.0f / denom;
    for (int64_t s = 0; s < n; ++s) sg[s] *= inv;
  }
  // out[g] = sum_s p[g, s] v[s]: each V row is read once for all G heads.
  for (int64_t s = 0; s < n; ++s) {
    if (!ok[s]) continue;
    const float* vs = vh + s * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * width + s];
      float* og = oh + g * D;
      for (int64_t e = 0; e < D; ++e) og[e] += p * vs[e];
    }
  }
}

// Work shared by the calling thread and the pool's helpers. Helpers hold it by shared_ptr: one that starts after
// the work is gone finds nothing left to claim and returns without touching the (by then stale) buffers.
struct Work {
  Dims d;
  const float *q, *kc, *vc;
  const bool* valid;
  int64_t layer, n;
  float* out;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    std::vector<float> scores;
    const int64_t total = d.B * d.KV;
    for (int64_t i; (i = next.fetch_add(1)) < total;) {
      AttendOne(d, q, kc, vc, valid, layer, n, i / d.KV, i % d.KV, out, scores);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kc,
                           ffi::Buffer<ffi::F32> vc, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::PRED> valid,
                           ffi::Buffer<ffi::S32> n_filled, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = kc.dimensions(), vd = vc.dimensions();
  if (qd.size() != 4 || kd.size() != 6 || vd.size() != 5)
    return ffi::Error::InvalidArgument("decode attention: q, kc, vc must have rank 4, 6, 5");
  Dims d{qd[0], qd[1], qd[2], qd[3], kd[3], kd[5], vd[3]};
  if (kd[1] != d.B || kd[2] != d.KV || kd[4] != d.D || vd[1] != d.B || vd[2] != d.KV || vd[4] != d.D ||
      d.NB * d.BLK != d.S || kd[0] != vd[0])
    return ffi::Error::InvalidArgument("decode attention: cache shapes do not match q");
  auto md = valid.dimensions();
  if (md.size() != 2 || md[0] != d.B || md[1] != d.S)
    return ffi::Error::InvalidArgument("decode attention: valid must be [B, S]");
  const int64_t L = kd[0];
  const int64_t l = layer.typed_data()[0];
  const int64_t n = std::min<int64_t>(n_filled.typed_data()[0], d.S);
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("decode attention: layer index out of range");

  auto work = std::make_shared<Work>();
  work->d = d;
  work->q = q.typed_data();
  work->kc = kc.typed_data();
  work->vc = vc.typed_data();
  work->valid = valid.typed_data();
  work->layer = l;
  work->n = std::max<int64_t>(n, 0);
  work->out = out->typed_data();

  const int64_t total = d.B * d.KV;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  // Every claimed item is being finished by a running thread; wait for those.
  while (work->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OpdDecodeAttentionF32, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q
                                  .Arg<ffi::Buffer<ffi::F32>>()    // kc
                                  .Arg<ffi::Buffer<ffi::F32>>()    // vc
                                  .Arg<ffi::Buffer<ffi::S32>>()    // layer
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // valid
                                  .Arg<ffi::Buffer<ffi::S32>>()    // n_filled
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
