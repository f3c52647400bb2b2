// The CPU kernels of the fused BatchNorm + add + ReLU op, compiled once per instruction set:
// bn_add_relu_{base,avx2,avx512}.cpp each define FR_CPU_ISA (the namespace) and include this
// file after every header it needs, and after the `#pragma GCC target` of their ISA, so that
// only these kernels (internal to that namespace) are compiled for it; bn_add_relu.cpp picks one
// at run time. Deliberately no include guard: included once per such file.
//
// Per-element math comes from common/bn_add_relu_math.h, the same functions the CUDA kernels
// run. Memory is walked in "runs": maximal stretches of consecutive elements whose channels
// follow a simple pattern (NCHW: one channel for a whole run; NHWC: channels c0, c0+1, ... along
// a pixel), so the inner loops are plain, branch-free and vectorisable. The ReLU mask is packed
// from / unpacked to a byte-per-element buffer eight elements at a time.
#ifndef FR_CPU_ISA
#error "define FR_CPU_ISA (the instruction set's namespace) before including this file"
#endif

namespace fused_resnet {
namespace cpu {
namespace FR_CPU_ISA {
namespace {

// Fixed work sizes (not derived from the thread count), so results are bitwise reproducible
// whatever the number of threads.
constexpr int64_t kChunk = 4096;            // elements per elementwise chunk (multiple of 8)
constexpr int64_t kChunksPerTask = 4;       // grain of the elementwise parallel loop
// NHWC reductions: rows per partial result ~ this / C (big: statistics merge partials with
// Chan's formula, a division each; the sums are double, whose rounding does not need short
// chunks).
constexpr int64_t kNhwcChunkElements = 32768;
constexpr int64_t kPlaneChunk = 4096;       // NCHW reductions: plane elements per partial

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); break;
    case DType::Float16: f(c10::Half{}); break;
    case DType::BFloat16: f(c10::BFloat16{}); break;
  }
}

// Calls f(offset, length, channel, same_channel) for the runs covering [begin, end): with
// same_channel every element of the run has channel `channel`, otherwise element k has channel
// `channel + k` (NHWC). Divisions place the first run only (once per call, i.e. per chunk);
// each run after it starts where the previous one ended (NHWC: channel 0 of the next pixel;
// NCHW: the next channel's plane).
template <typename F>
void for_each_run(Geometry g, int64_t begin, int64_t end, F&& f) {
  if (g.inner == 1) {
    int64_t c0 = begin % g.channels;
    for (int64_t i = begin; i < end; c0 = 0) {
      const int64_t len = std::min(g.channels - c0, end - i);
      f(i, len, c0, false);
      i += len;
    }
    return;
  }
  const int64_t q = begin / g.inner;
  int64_t s = begin - q * g.inner;  // position inside the current plane
  int64_t c = q % g.channels;
  for (int64_t i = begin; i < end; s = 0) {
    const int64_t len = std::min(g.inner - s, end - i);
    f(i, len, c, true);
    i += len;
    if (++c == g.channels) c = 0;
  }
}

// 8 bytes of 0/1 flags -> one mask byte (bit k = flag k), and back.
uint8_t pack8(const uint8_t* flags) {
  uint64_t v;
  std::memcpy(&v, flags, 8);
  return static_cast<uint8_t>((v * 0x0102040810204080ULL) >> 56);
}

const std::array<uint64_t, 256>& spread_table() {
  static const std::array<uint64_t, 256> table = [] {
    std::array<uint64_t, 256> t{};
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) t[b] |= static_cast<uint64_t>((b >> k) & 1) << (8 * k);
    return t;
  }();
  return table;
}

// flags[k] = bit (first + k) of the mask, for k < count; first is a multiple of 8.
void unpack_mask(const uint8_t* mask, int64_t first, int64_t count, uint8_t* flags) {
  const auto& spread = spread_table();
  const int64_t full = count / 8;
  for (int64_t j = 0; j < full; ++j) std::memcpy(flags + 8 * j, &spread[mask[first / 8 + j]], 8);
  if (count % 8) {
    const uint64_t v = spread[mask[first / 8 + full]];
    std::memcpy(flags + 8 * full, &v, static_cast<size_t>(count % 8));
  }
}

void pack_mask(const uint8_t* flags, int64_t first, int64_t count, uint8_t* mask) {
  const int64_t full = count / 8;
  for (int64_t j = 0; j < full; ++j) mask[first / 8 + j] = pack8(flags + 8 * j);
  if (count % 8) {
    uint8_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tail, flags + 8 * full, static_cast<size_t>(count % 8));
    mask[first / 8 + full] = pack8(tail);
  }
}

// Parallel over chunks of kChunk elements (whole mask bytes, so no two threads share one).
template <typename Body>
void for_each_chunk(int64_t numel, Body body) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, kChunksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch)
      body(ch * kChunk, std::min(numel, (ch + 1) * kChunk));
  });
}

// ---- forward ------------------------------------------------------------------------------------
// __restrict__: without it the compiler gives up vectorising loops with this many pointers.
// HAS_MEAN: the centred form (x - mean) * scale + shift; otherwise x * scale + shift.
template <typename T, bool HAS_RES, bool HAS_MEAN>
void apply_run(const T* __restrict__ x, const T* __restrict__ res,
               const float* __restrict__ mean, const float* __restrict__ scale,
               const float* __restrict__ shift, bool relu, float mask_floor, int64_t len,
               bool same_channel, T* __restrict__ out, uint8_t* __restrict__ flags) {
  if (same_channel) {
    const float m = HAS_MEAN ? mean[0] : 0.f, sc = scale[0], sh = shift[0];
    for (int64_t k = 0; k < len; ++k) {
      const float r = HAS_RES ? static_cast<float>(res[k]) : 0.f;
      const float y = bn_add_relu_forward(static_cast<float>(x[k]), m, sc, sh, r, relu);
      out[k] = static_cast<T>(y);
      flags[k] = y > mask_floor;
    }
  } else {
    for (int64_t k = 0; k < len; ++k) {
      const float r = HAS_RES ? static_cast<float>(res[k]) : 0.f;
      const float y = bn_add_relu_forward(static_cast<float>(x[k]), HAS_MEAN ? mean[k] : 0.f,
                                          scale[k], shift[k], r, relu);
      out[k] = static_cast<T>(y);
      flags[k] = y > mask_floor;
    }
  }
}

// ---- backward -----------------------------------------------------------------------------------
template <typename T, bool RES_GRAD>
void grad_apply_run(const T* __restrict__ grad, const uint8_t* __restrict__ flags,
                    const T* __restrict__ x, const float* __restrict__ mean,
                    const float* __restrict__ kc, const float* __restrict__ bc,
                    const float* __restrict__ cc, bool relu, int64_t len, bool same_channel,
                    T* __restrict__ dx, T* __restrict__ dres) {
  if (same_channel) {
    const float m = mean[0], k0 = kc[0], b0 = bc[0], c0 = cc[0];
    for (int64_t k = 0; k < len; ++k) {
      const float dz = relu_backward(static_cast<float>(grad[k]), flags[k], relu);
      dx[k] = static_cast<T>(bn_backward_input(dz, static_cast<float>(x[k]), m, k0, b0, c0));
      if (RES_GRAD) dres[k] = static_cast<T>(dz);
    }
  } else {
    for (int64_t k = 0; k < len; ++k) {
      const float dz = relu_backward(static_cast<float>(grad[k]), flags[k], relu);
      dx[k] = static_cast<T>(
          bn_backward_input(dz, static_cast<float>(x[k]), mean[k], kc[k], bc[k], cc[k]));
      if (RES_GRAD) dres[k] = static_cast<T>(dz);
    }
  }
}

// ---- reductions ---------------------------------------------------------------------------------
// Accumulated in double, as PyTorch's CPU BatchNorm accumulates: a channel whose mean is large
// against its spread, or that holds many values, keeps its low bits. NHWC (the layout of
// channels_last models) sums short blocks of rows in fp32 at full vector width and adds each
// block to double totals; NCHW sums each plane chunk in double lanes.

// A channel's (or a chunk's) count, mean and sum of squared deviations; merged with Chan et al.
struct StatsAcc {
  double mean = 0.0;
  double m2 = 0.0;
  int64_t count = 0;
};

void merge(StatsAcc& a, const StatsAcc& b) {
  if (b.count == 0) return;
  const int64_t n = a.count + b.count;
  chan_update(a.mean, a.m2, b.mean, b.m2, static_cast<double>(b.count) / static_cast<double>(n),
              static_cast<double>(a.count));
  a.count = n;
}

// sum(dz), sum(dz * (x - mean)) and sum(x - mean) of a channel.
struct SumsAcc {
  double sum_dz = 0.0;
  double sum_dz_xmu = 0.0;
  double sum_xmu = 0.0;
};

void merge(SumsAcc& a, const SumsAcc& b) {
  a.sum_dz += b.sum_dz;
  a.sum_dz_xmu += b.sum_dz_xmu;
  a.sum_xmu += b.sum_xmu;
}

// A channel's statistics over n contiguous elements: the mean, then the sum of squared
// deviations from it (two passes over cache-resident data, per-lane partial sums).
template <typename T>
StatsAcc chunk_stats(const T* __restrict__ x, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += static_cast<double>(static_cast<float>(x[k]));
  const double mean = sum / static_cast<double>(n);
  double m2 = 0.0;
#pragma omp simd reduction(+ : m2)
  for (int64_t k = 0; k < n; ++k) {
    const double d = static_cast<double>(static_cast<float>(x[k])) - mean;
    m2 += d * d;
  }
  return StatsAcc{mean, m2, n};
}

// The gradient sums of one channel over n elements (per-lane partial sums).
template <typename T>
SumsAcc lane_grad_sums(const T* __restrict__ grad, const uint8_t* __restrict__ flags,
                       const T* __restrict__ x, float mean, bool relu, int64_t n) {
  double sum_dz = 0.0, sum_dz_xmu = 0.0, sum_xmu = 0.0;
#pragma omp simd reduction(+ : sum_dz, sum_dz_xmu, sum_xmu)
  for (int64_t k = 0; k < n; ++k) {
    const double dz = relu_backward(static_cast<float>(grad[k]), flags[k], relu);
    const double xmu = static_cast<double>(static_cast<float>(x[k])) - mean;
    sum_dz += dz;
    sum_dz_xmu += dz * xmu;
    sum_xmu += xmu;
  }
  return SumsAcc{sum_dz, sum_dz_xmu, sum_xmu};
}

template <typename T>
std::vector<StatsAcc> stats_nchw(const T* x, Geometry g) {
  std::vector<StatsAcc> result(g.channels);
  at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      for (int64_t n = 0; n < g.outer; ++n) {
        const T* plane = x + (n * g.channels + c) * g.inner;
        for (int64_t s = 0; s < g.inner; s += kPlaneChunk)
          merge(result[c], chunk_stats(plane + s, std::min(kPlaneChunk, g.inner - s)));
      }
  });
  return result;
}

// NHWC: partial results over chunks of rows (pixels), all channels of a row at once
// (independent per-channel accumulators: vectorised across channels), merged in chunk order.
template <typename Acc, typename ChunkFn>
std::vector<Acc> reduce_nhwc(Geometry g, ChunkFn chunk_fn) {
  const int64_t C = g.channels;
  const int64_t rows = std::max<int64_t>(1, kNhwcChunkElements / C);
  const int64_t chunks = (g.outer + rows - 1) / rows;
  std::vector<Acc> partial(chunks * C);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch)
      chunk_fn(ch * rows, std::min(g.outer, (ch + 1) * rows), partial.data() + ch * C);
  });
  std::vector<Acc> result(C);
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      for (int64_t ch = 0; ch < chunks; ++ch) merge(result[c], partial[ch * C + c]);
  });
  return result;
}

// NHWC rows are summed in fp32 over blocks of kBlockRows rows (vectorised across channels: the
// full vector width), and each block's sums are added to the double totals: a block adds few
// enough terms that its fp32 rounding stays far below the double totals' need.
constexpr int64_t kBlockRows = 16;

// total[c] += part[c], part[c] = 0 (a block's fp32 sums into the double totals).
void flush_block(double* __restrict__ total, float* __restrict__ part, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    total[c] += part[c];
    part[c] = 0.f;
  }
}

// sum[c] += x[r*C + c] - shift[c] over `rows` rows: deviations from a value of the channel
// (exact near it), so a channel whose mean is large against its spread sums small numbers.
template <typename T>
void sum_rows(const T* __restrict__ x, int64_t rows, int64_t C, const float* __restrict__ shift,
              float* __restrict__ sum) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<float>(x[r * C + c]) - shift[c];
}

// m2[c] += (x[r*C + c] - mean[c])^2 over `rows` rows.
template <typename T>
void squared_deviations_rows(const T* __restrict__ x, int64_t rows, int64_t C,
                             const float* __restrict__ mean, float* __restrict__ m2) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const float d = static_cast<float>(x[r * C + c]) - mean[c];
      m2[c] += d * d;
    }
}

// The gradient sums of `rows` rows: dz through the ReLU flags (one byte per element).
template <typename T>
void grad_sums_rows(const T* __restrict__ grad, const uint8_t* __restrict__ flags,
                    const T* __restrict__ x, const float* __restrict__ mean, bool relu,
                    int64_t rows, int64_t C, float* __restrict__ sdz, float* __restrict__ sdzx,
                    float* __restrict__ sxmu) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const float dz = relu_backward(static_cast<float>(grad[r * C + c]), flags[r * C + c], relu);
      const float xmu = static_cast<float>(x[r * C + c]) - mean[c];
      sdz[c] += dz;
      sdzx[c] += dz * xmu;
      sxmu[c] += xmu;
    }
}

// Calls block(first row, rows) over [r0, r1) in blocks of kBlockRows rows.
template <typename Block>
void for_each_block(int64_t r0, int64_t r1, Block block) {
  for (int64_t r = r0; r < r1; r += kBlockRows) block(r, std::min(kBlockRows, r1 - r));
}

template <typename T>
std::vector<StatsAcc> stats_nhwc(const T* x, Geometry g) {
  const int64_t C = g.channels;
  return reduce_nhwc<StatsAcc>(g, [&](int64_t r0, int64_t r1, StatsAcc* out) {
    std::vector<double> sum(C, 0.0), m2(C, 0.0);
    std::vector<float> part(C, 0.f), mean(C), shift(C);
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<float>(x[r0 * C + c]);
    for_each_block(r0, r1, [&](int64_t r, int64_t rows) {
      sum_rows(x + r * C, rows, C, shift.data(), part.data());
      flush_block(sum.data(), part.data(), C);
    });
    const double n = static_cast<double>(r1 - r0);
    for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<double>(shift[c]) * n;
    // deviations from the fp32-rounded mean (exact where x is near it), then the rounding's
    // own share taken out: sum (x - m)^2 = sum (x - rounded)^2 - n*(m - rounded)^2
    for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<float>(sum[c] / n);
    for_each_block(r0, r1, [&](int64_t r, int64_t rows) {
      squared_deviations_rows(x + r * C, rows, C, mean.data(), part.data());
      flush_block(m2.data(), part.data(), C);
    });
    for (int64_t c = 0; c < C; ++c) {
      const double m = sum[c] / n, off = m - static_cast<double>(mean[c]);
      out[c] = StatsAcc{m, m2[c] - n * off * off, r1 - r0};
    }
  });
}

template <typename T>
std::vector<SumsAcc> grad_sums_nchw(const T* grad, const uint8_t* mask, const T* x,
                                    const float* mean, bool relu, Geometry g) {
  std::vector<SumsAcc> result(g.channels);
  at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> flags(kPlaneChunk + 16, 0);  // stays 0 without ReLU: unused then
    for (int64_t c = begin; c < end; ++c)
      for (int64_t n = 0; n < g.outer; ++n) {
        const int64_t base = (n * g.channels + c) * g.inner;
        for (int64_t s = 0; s < g.inner; s += kPlaneChunk) {
          const int64_t first = base + s, len = std::min(kPlaneChunk, g.inner - s);
          const int64_t aligned = first / 8 * 8, lead = first - aligned;
          if (relu) unpack_mask(mask, aligned, lead + len, flags.data());
          merge(result[c], lane_grad_sums(grad + first, flags.data() + lead, x + first, mean[c],
                                          relu, len));
        }
      }
  });
  return result;
}

template <typename T>
std::vector<SumsAcc> grad_sums_nhwc(const T* grad, const uint8_t* mask, const T* x,
                                    const float* mean, bool relu, Geometry g) {
  const int64_t C = g.channels;
  return reduce_nhwc<SumsAcc>(g, [&](int64_t r0, int64_t r1, SumsAcc* out) {
    std::vector<double> sdz(C, 0.0), sdzx(C, 0.0), sxmu(C, 0.0);
    std::vector<float> part(3 * C, 0.f);
    const int64_t first = r0 * C, aligned = first / 8 * 8, lead = first - aligned;
    // Without a ReLU every flag passes (relu_backward ignores them): zeros are fine.
    std::vector<uint8_t> flags(lead + (r1 - r0) * C, 0);
    if (relu) unpack_mask(mask, aligned, lead + (r1 - r0) * C, flags.data());
    for_each_block(r0, r1, [&](int64_t r, int64_t rows) {
      grad_sums_rows(grad + r * C, flags.data() + lead + (r - r0) * C, x + r * C, mean, relu,
                     rows, C, part.data(), part.data() + C, part.data() + 2 * C);
      flush_block(sdz.data(), part.data(), C);
      flush_block(sdzx.data(), part.data() + C, C);
      flush_block(sxmu.data(), part.data() + 2 * C, C);
    });
    for (int64_t c = 0; c < C; ++c) out[c] = SumsAcc{sdz[c], sdzx[c], sxmu[c]};
  });
}

}  // namespace

void bn_stats(DType dtype, const void* x_, Geometry g, const float* weight, const float* bias,
              float eps, StatsOutputs out) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(x_);
    const auto states = g.inner == 1 ? stats_nhwc(x, g) : stats_nchw(x, g);
    for (int64_t c = 0; c < g.channels; ++c) {
      // NaN for an empty channel, as torch.var_mean gives
      const StatsAcc& s = states[c];
      out.mean[c] = s.count > 0 ? static_cast<float>(s.mean) : __builtin_nanf("");
      out.var[c] = s.count > 0 ? static_cast<float>(s.m2 / static_cast<double>(s.count))
                               : __builtin_nanf("");
      bn_centred_scale_shift(out.var[c], weight ? weight[c] : 1.f, bias ? bias[c] : 0.f, eps,
                             out.scale[c], out.shift[c]);
    }
  });
}

void bn_add_relu_apply(DType dtype, const void* x_, const void* res_, const float* mean,
                       const float* scale, const float* shift, bool relu, Geometry g, void* out_,
                       uint8_t* mask) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(x_);
    const T* res = static_cast<const T*>(res_);
    T* out = static_cast<T*>(out_);
    const float floor = relu_mask_floor(dtype);
    for_each_chunk(g.numel(), [&](int64_t begin, int64_t end) {
      uint8_t flags[kChunk];
      for_each_run(g, begin, end, [&](int64_t i, int64_t len, int64_t c, bool same) {
        uint8_t* f = flags + (i - begin);
        const float* m = mean ? mean + c : nullptr;
        const T* r = res ? res + i : nullptr;
        const float* sc = scale + c;
        const float* sh = shift + c;
        if (res && mean)
          apply_run<T, true, true>(x + i, r, m, sc, sh, relu, floor, len, same, out + i, f);
        else if (res)
          apply_run<T, true, false>(x + i, r, m, sc, sh, relu, floor, len, same, out + i, f);
        else if (mean)
          apply_run<T, false, true>(x + i, r, m, sc, sh, relu, floor, len, same, out + i, f);
        else
          apply_run<T, false, false>(x + i, r, m, sc, sh, relu, floor, len, same, out + i, f);
      });
      if (mask) pack_mask(flags, begin, end - begin, mask);
    });
  });
}

void bn_add_relu_grad_reduce(DType dtype, const void* grad_, const uint8_t* mask, const void* x_,
                             const float* mean, const float* var, const float* weight,
                             float eps, bool relu, bool training, Geometry g,
                             BackwardOutputs out) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* grad = static_cast<const T*>(grad_);
    const T* x = static_cast<const T*>(x_);
    const auto sums = g.inner == 1 ? grad_sums_nhwc(grad, mask, x, mean, relu, g)
                                   : grad_sums_nchw(grad, mask, x, mean, relu, g);
    for (int64_t c = 0; c < g.channels; ++c) {
      const BackwardCoefficients r =
          bn_backward_coefficients(sums[c].sum_dz, sums[c].sum_dz_xmu, sums[c].sum_xmu, var[c],
                                   weight ? weight[c] : 1.f, eps, g.per_channel(), training);
      out.k[c] = r.k;
      out.b[c] = r.b;
      out.c[c] = r.c;
      out.grad_weight[c] = r.grad_weight;
      out.grad_bias[c] = r.grad_bias;
    }
  });
}

void bn_add_relu_grad_apply(DType dtype, const void* grad_, const uint8_t* mask, const void* x_,
                            const float* mean, const float* k, const float* b, const float* c,
                            bool relu, Geometry g, void* dx_, void* dres_) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* grad = static_cast<const T*>(grad_);
    const T* x = static_cast<const T*>(x_);
    T* dx = static_cast<T*>(dx_);
    T* dres = static_cast<T*>(dres_);
    for_each_chunk(g.numel(), [&](int64_t begin, int64_t end) {
      uint8_t flags[kChunk];
      if (relu)
        unpack_mask(mask, begin, end - begin, flags);
      else
        std::memset(flags, 0, sizeof(flags));  // relu_backward ignores them without a ReLU
      for_each_run(g, begin, end, [&](int64_t i, int64_t len, int64_t ch, bool same) {
        const uint8_t* f = flags + (i - begin);
        if (dres)
          grad_apply_run<T, true>(grad + i, f, x + i, mean + ch, k + ch, b + ch, c + ch, relu,
                                  len, same, dx + i, dres + i);
        else
          grad_apply_run<T, false>(grad + i, f, x + i, mean + ch, k + ch, b + ch, c + ch, relu,
                                   len, same, dx + i, nullptr);
      });
    });
  });
}

}  // namespace FR_CPU_ISA
}  // namespace cpu
}  // namespace fused_resnet
