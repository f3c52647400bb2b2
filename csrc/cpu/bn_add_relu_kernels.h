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
#ifndef FR_CPU_LANES_IN_ONE_REGISTER  // 16 floats fit one vector register (AVX-512)
#define FR_CPU_LANES_IN_ONE_REGISTER 0
#endif

namespace fused_resnet {
namespace cpu {
namespace FR_CPU_ISA {
namespace {

// Fixed work sizes (not derived from the thread count), so results are bitwise reproducible
// whatever the number of threads.
constexpr int64_t kChunk = 4096;            // elements per elementwise chunk (multiple of 8)
constexpr int64_t kChunksPerTask = 4;       // grain of the elementwise parallel loop
// NHWC reductions: rows per partial result ~ this / C. Big: every chunk costs a partial result
// of C entries and its merge (at 32768, when chunks also took divisions per channel, the
// statistics of a 1024-channel layer were ~2.5x slower than ATen's); the sums are double, whose
// rounding does not need short chunks.
constexpr int64_t kNhwcChunkElements = 131072;
constexpr int64_t kPlaneChunk = 4096;       // NCHW reductions: plane elements per partial
constexpr int64_t kMergesPerTask = 32768;   // NHWC reductions: partial results merged per task

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

// A channel's statistics over n contiguous elements in one pass: double sums (per-lane partial
// sums) of the deviations from the first element and of their squares, then mean = shift +
// s1/n and m2 = s2 - s1^2/n. The subtraction amplifies s2's relative rounding (~n 2^-53) by
// s2 / m2 = 1 + n (x[0] - mean)^2 / m2 <= 1 + n, since (x[0] - mean)^2 is one of m2's terms:
// for n <= kPlaneChunk, below 2^-28, far under the fp32 result's rounding.
template <typename T>
StatsAcc chunk_stats(const T* __restrict__ x, int64_t n) {
  // an infinite first value would make every deviation NaN: its mean is +-inf (or NaN) anyway
  const double first = static_cast<float>(x[0]);
  const double shift = std::isfinite(first) ? first : 0.0;
  double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t k = 0; k < n; ++k) {
    const double d = static_cast<double>(static_cast<float>(x[k])) - shift;
    s1 += d;
    s2 += d * d;
  }
  const double offset = s1 / static_cast<double>(n);
  return StatsAcc{shift + offset, s2 - s1 * offset, n};
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
  if (C == 0) return {};  // no channels: nothing to reduce
  const int64_t rows = std::max<int64_t>(1, kNhwcChunkElements / C);
  const int64_t chunks = (g.outer + rows - 1) / rows;
  std::vector<Acc> partial(chunks * C);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch)
      chunk_fn(ch * rows, std::min(g.outer, (ch + 1) * rows), partial.data() + ch * C);
  });
  // Nothing to merge: one chunk, or none (no rows, an empty batch: every channel empty)
  if (chunks <= 1) return chunks == 1 ? partial : std::vector<Acc>(C);
  std::vector<Acc> result(C);
  // Threads only for a merge worth a parallel region (each costs ~10 us of wake-up and barrier
  // on a 2-core machine, more than merging a few thousand partial results)
  const int64_t grain = std::max<int64_t>(1, kMergesPerTask / chunks);
  at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
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

// s1[c] += x[r*C + c] - shift[c] and s2[c] += (x[r*C + c] - shift[c])^2 over `rows` rows:
// deviations from a value near the channel's mean, so a channel whose mean is large against its
// spread sums small numbers.
template <typename T>
void deviation_sums_rows(const T* __restrict__ x, int64_t rows, int64_t C,
                         const float* __restrict__ shift, float* __restrict__ s1,
                         float* __restrict__ s2) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const float d = static_cast<float>(x[r * C + c]) - shift[c];
      s1[c] += d;
      s2[c] += d * d;
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

// A channel's sums of deviations from a shift and of their squares (NHWC statistics).
struct DeviationSums {
  double s1 = 0.0;
  double s2 = 0.0;
};

void merge(DeviationSums& a, const DeviationSums& b) {
  a.s1 += b.s1;
  a.s2 += b.s2;
}

// Rows whose mean is the shift of the NHWC statistics (stats_nhwc).
constexpr int64_t kShiftRows = 32;

// The cancelled share of the squares' sum above which stats_nhwc sums again around the mean:
// m2 = s2 - s1^2/n amplifies the fp32 block sums' relative rounding by s2 / m2, here at most 2x.
constexpr double kMaxCancelled = 0.5;

// The deviation sums of rows [r0, r1) around shift[c], in fp32 blocks of kBlockRows rows added
// to double totals.
template <typename T>
void deviation_sums_chunk(const T* x, int64_t r0, int64_t r1, int64_t C, const float* shift,
                          DeviationSums* out) {
  std::vector<float> p1(C, 0.f), p2(C, 0.f);
  std::vector<double> s1(C, 0.0), s2(C, 0.0);
  for_each_block(r0, r1, [&](int64_t r, int64_t rows) {
    deviation_sums_rows(x + r * C, rows, C, shift, p1.data(), p2.data());
    flush_block(s1.data(), p1.data(), C);
    flush_block(s2.data(), p2.data(), C);
  });
  for (int64_t c = 0; c < C; ++c) out[c] = DeviationSums{s1[c], s2[c]};
}

// The per-channel mean of the first kShiftRows rows, rounded to fp32 (summed in double: values
// near fp32's largest do not overflow).
template <typename T>
std::vector<float> first_rows_mean(const T* x, int64_t rows, int64_t C) {
  const int64_t n = std::min(kShiftRows, rows);
  std::vector<double> sum(C, 0.0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<float>(x[r * C + c]);
  std::vector<float> mean(C);
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = static_cast<float>(sum[c] / static_cast<double>(n));
    if (!std::isfinite(mean[c])) mean[c] = 0.f;  // an inf there: an infinite shift makes
                                                 // every deviation NaN; shift by 0
  }
  return mean;
}

// Whether some channel's sums cancel past kMaxCancelled (a NaN or inf sum does not: its
// statistics are NaN either way).
bool sums_cancel(const std::vector<DeviationSums>& sums, double n) {
  for (const DeviationSums& d : sums)
    if (d.s1 * (d.s1 / n) > kMaxCancelled * d.s2) return true;
  return false;
}

// The statistics of a channels_last tensor in one pass: the sums of every channel's deviations
// from a shift near its mean (its first rows' mean) and of their squares, by chunks of rows
// (chunk_sums(shift, r0, r1, out)) merged in chunk order, then mean = shift + s1/n and
// m2 = s2 - s1^2/n. s1^2/n is the share of s2 that the shift's distance from the mean adds (at
// most n/kShiftRows times m2; above m2 in a fraction ~1.5e-8 of normal channels): where it passes
// kMaxCancelled of s2 in some channel, the sums are taken again around the means.
template <typename T, typename ChunkSums>
std::vector<StatsAcc> stats_nhwc(const T* x, Geometry g, ChunkSums chunk_sums) {
  const int64_t C = g.channels, rows = g.outer;
  if (rows == 0 || C == 0) return std::vector<StatsAcc>(C);  // no values: count 0, NaN
  const double n = static_cast<double>(rows);
  std::vector<float> shift = first_rows_mean(x, rows, C);
  const auto sums_around = [&](const std::vector<float>& centre) {
    return reduce_nhwc<DeviationSums>(g, [&](int64_t r0, int64_t r1, DeviationSums* out) {
      chunk_sums(centre.data(), r0, r1, out);
    });
  };
  std::vector<DeviationSums> sums = sums_around(shift);
  if (sums_cancel(sums, n)) {
    for (int64_t c = 0; c < C; ++c)
      shift[c] = static_cast<float>(static_cast<double>(shift[c]) + sums[c].s1 / n);
    sums = sums_around(shift);
  }
  std::vector<StatsAcc> result(C);
  for (int64_t c = 0; c < C; ++c) {
    const double offset = sums[c].s1 / n;  // the mean's distance from the shift
    result[c] = StatsAcc{static_cast<double>(shift[c]) + offset,
                         sums[c].s2 - sums[c].s1 * offset, rows};
  }
  return result;
}

// NCHW gradient sums: each channel's planes in runs of up to kPlaneChunk elements, a run's
// elements taken as rows of kPlaneLanes lanes, per-element math and per-lane sums in double (as
// before, and as exact), lanes added up at the end. The lanes are what vectorises it: a
// per-element reduction into one double had made this ~9x slower than the NHWC reduction
// (compute-bound); by lanes it runs at memory speed like the NHWC one.
constexpr int64_t kPlaneLanes = 16;
typedef double PlaneTotals[3][kPlaneLanes];  // sum dz, sum dz*(x - mean), sum (x - mean)

// Channels in parallel; add_run(c, first element, length, totals) adds a run's sums.
template <typename AddRun>
std::vector<SumsAcc> grad_sums_nchw_by_runs(Geometry g, AddRun add_run) {
  std::vector<SumsAcc> result(g.channels);
  at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      PlaneTotals totals = {};
      for (int64_t n = 0; n < g.outer; ++n)
        for (int64_t s = 0; s < g.inner; s += kPlaneChunk)
          add_run(c, (n * g.channels + c) * g.inner + s, std::min(kPlaneChunk, g.inner - s),
                  totals);
      for (int64_t l = 0; l < kPlaneLanes; ++l)
        merge(result[c], SumsAcc{totals[0][l], totals[1][l], totals[2][l]});
    }
  });
  return result;
}

// One run of n elements, its ReLU flags one byte per element.
template <typename T>
void plane_grad_sums(const T* __restrict__ grad, const uint8_t* __restrict__ flags,
                     const T* __restrict__ x, float mean, bool relu, int64_t n,
                     PlaneTotals& totals) {
  double sdz[kPlaneLanes] = {}, sdzx[kPlaneLanes] = {}, sxmu[kPlaneLanes] = {};
  for (int64_t k = 0; k < n; ++k) {
    const int64_t l = k % kPlaneLanes;
    const double dz = relu_backward(static_cast<float>(grad[k]), flags[k], relu);
    const double xmu = static_cast<double>(static_cast<float>(x[k])) - mean;
    sdz[l] += dz;
    sdzx[l] += dz * xmu;
    sxmu[l] += xmu;
  }
  for (int64_t l = 0; l < kPlaneLanes; ++l) {
    totals[0][l] += sdz[l];
    totals[1][l] += sdzx[l];
    totals[2][l] += sxmu[l];
  }
}

template <typename T>
std::vector<SumsAcc> grad_sums_nchw(const T* grad, const uint8_t* mask, const T* x,
                                    const float* mean, bool relu, Geometry g) {
  return grad_sums_nchw_by_runs(g, [&](int64_t c, int64_t first, int64_t len,
                                       PlaneTotals& totals) {
    uint8_t flags[kPlaneChunk + 8] = {};  // stays 0 without ReLU: unused then
    const int64_t aligned = first / 8 * 8, lead = first - aligned;
    if (relu) unpack_mask(mask, aligned, lead + len, flags);
    plane_grad_sums(grad + first, flags + lead, x + first, mean[c], relu, len, totals);
  });
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


// ---- fp32 channels_last, C a multiple of 16: tiles of 16 channels ------------------------------
// The general loops above go through a byte-per-element copy of the ReLU mask (unpacked before,
// packed after) and runs of per-channel arrays. Here each row is walked in tiles of 16 channels,
// one vector each (GCC's vector extensions: one AVX-512 register, two AVX2 or four SSE2 ones,
// whatever this file is compiled for), and the mask is read and written as bits, 16 per tile:
// measured on a 2-core AVX-512 machine (ResNet-50 shapes, fp32), the gradient pieces ~25% and
// the forward apply ~10% faster. Rows stay in memory order (tiles inside a row): streaming
// order, which a channel-major walk down the rows lost. Every channel's arithmetic, and the order
// of its sums, is the general loops': the results are bitwise the same (checked against them).
#if defined(__GNUC__) && !defined(__clang__)
#define FR_CPU_TILES 1
constexpr int64_t kLanes = 16;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t LaneInts __attribute__((vector_size(kLanes * sizeof(int32_t))));

Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

void store_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof(v)); }

Lanes broadcast(float v) { return Lanes{} + v; }

const LaneInts kLaneBit = {1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7,
                           1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14, 1 << 15};

// The 16 mask bits of the elements at e..e+15 (e a multiple of 8), as lanes of all ones / zeros.
LaneInts mask_lanes(const uint8_t* mask, int64_t e) {
  uint16_t bits;
  std::memcpy(&bits, mask + e / 8, sizeof(bits));  // bit k: element e + k (little-endian bytes)
  return (LaneInts{} + static_cast<int32_t>(bits) & kLaneBit) != 0;
}

typedef uint8_t LaneBytes __attribute__((vector_size(kLanes)));

// The 16 bits of lanes that are all ones (lane k: bit k): narrowed to a byte per lane, then
// packed 8 at a time (pack8), with no serial chain through the lanes.
uint16_t lanes_to_bits(LaneInts on) {
  const LaneBytes flags = __builtin_convertvector(on & 1, LaneBytes);
  uint8_t bytes[kLanes];
  std::memcpy(bytes, &flags, sizeof(bytes));
  return static_cast<uint16_t>(pack8(bytes) | pack8(bytes + 8) << 8);
}

// relu_backward on 16 lanes: the gradient where the ReLU passed it (or always, without one).
// A bitwise and with the lanes' all-ones / zeros, not a select: GCC compiles the select into a
// zero-masking load of grad, on which the reduction spent ~70% of its time on the 2-core AMD
// machine (the plain load and an and: the same bits, +0 where the ReLU blocked).
Lanes lanes_relu_backward(Lanes grad, LaneInts on, bool relu) {
  if (!relu) return grad;
#if FR_CPU_LANES_IN_ONE_REGISTER
  asm("" : "+v"(grad));  // loaded whole: the and cannot become a masked load
#endif
  LaneInts bits;
  std::memcpy(&bits, &grad, sizeof(bits));
  bits &= on;
  std::memcpy(&grad, &bits, sizeof(grad));
  return grad;
}

// total[k] += part[k] (a block's fp32 sums into the double totals), k < 16.
void add_lanes_to(double* __restrict__ total, Lanes part) {
  for (int k = 0; k < kLanes; ++k) total[k] += part[k];
}

bool tiles_apply(Geometry g) { return g.inner == 1 && g.channels % kLanes == 0; }

// Rows per elementwise task: whole rows (whole mask bytes), ~kChunk elements.
int64_t tile_rows_per_task(int64_t C) { return std::max<int64_t>(1, kChunk * kChunksPerTask / C); }

template <typename Rows>
void for_each_row_range(Geometry g, Rows rows) {
  const int64_t per_task = tile_rows_per_task(g.channels);
  const int64_t tasks = (g.outer + per_task - 1) / per_task;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      rows(t * per_task, std::min(g.outer, (t + 1) * per_task));
  });
}

// Rows [r0, r1) of apply_tiles (a function of its own: the __restrict__ pointers let the compiler
// keep them, and the per-channel tiles, in registers down the rows).
template <bool HAS_RES, bool HAS_MEAN>
void apply_tile_rows(const float* __restrict__ x, const float* __restrict__ res,
                     const float* __restrict__ mean, const float* __restrict__ scale,
                     const float* __restrict__ shift, bool relu, float mask_floor, int64_t C,
                     int64_t r0, int64_t r1, float* __restrict__ out,
                     uint8_t* __restrict__ mask) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < C; c += kLanes) {
      const Lanes m = HAS_MEAN ? load_lanes(mean + c) : Lanes{};
      const Lanes sc = load_lanes(scale + c), sh = load_lanes(shift + c);
      const int64_t e = r * C + c;
      Lanes y = (load_lanes(x + e) - m) * sc + sh + (HAS_RES ? load_lanes(res + e) : Lanes{});
      if (relu) y = y != y ? y : (y > 0.f ? y : Lanes{});  // relu_keep_nan
      store_lanes(out + e, y);
      if (mask) {
        const uint16_t bits = lanes_to_bits(y > mask_floor);
        std::memcpy(mask + e / 8, &bits, sizeof(bits));
      }
    }
  }
}

template <bool HAS_RES, bool HAS_MEAN>
void apply_tiles(const float* x, const float* res, const float* mean, const float* scale,
                 const float* shift, bool relu, float mask_floor, Geometry g, float* out,
                 uint8_t* mask) {
  for_each_row_range(g, [=](int64_t r0, int64_t r1) {
    apply_tile_rows<HAS_RES, HAS_MEAN>(x, res, mean, scale, shift, relu, mask_floor,
                                       g.channels, r0, r1, out, mask);
  });
}

template <bool RES_GRAD>
void grad_apply_tile_rows(const float* __restrict__ grad, const uint8_t* __restrict__ mask,
                          const float* __restrict__ x, const float* __restrict__ mean,
                          const float* __restrict__ kc, const float* __restrict__ bc,
                          const float* __restrict__ cc, bool relu, int64_t C, int64_t r0,
                          int64_t r1, float* __restrict__ dx, float* __restrict__ dres) {
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < C; c += kLanes) {
      const Lanes m = load_lanes(mean + c), k = load_lanes(kc + c), b = load_lanes(bc + c),
                  c0 = load_lanes(cc + c);
      const int64_t e = r * C + c;
      const Lanes dz = lanes_relu_backward(load_lanes(grad + e),
                                           relu ? mask_lanes(mask, e) : LaneInts{}, relu);
      store_lanes(dx + e, k * dz + b * (load_lanes(x + e) - m) + c0);  // bn_backward_input
      if (RES_GRAD) store_lanes(dres + e, dz);
    }
  }
}

template <bool RES_GRAD>
void grad_apply_tiles(const float* grad, const uint8_t* mask, const float* x, const float* mean,
                      const float* kc, const float* bc, const float* cc, bool relu, Geometry g,
                      float* dx, float* dres) {
  for_each_row_range(g, [=](int64_t r0, int64_t r1) {
    grad_apply_tile_rows<RES_GRAD>(grad, mask, x, mean, kc, bc, cc, relu, g.channels, r0, r1,
                                   dx, dres);
  });
}

// The deviation sums of G tiles (channels c .. c + 16G) over `rows` rows, added to the double
// totals. The G tiles' sums are independent chains: one tile alone waits on its adds' latency
// row after row (about half the speed of a plain sum).
template <int G>
void add_tile_group_sums(const float* __restrict__ x, int64_t rows, int64_t C, int64_t c,
                         const float* __restrict__ shift, double* __restrict__ s1,
                         double* __restrict__ s2) {
  Lanes m[G], p1[G], p2[G];
  for (int j = 0; j < G; ++j) {
    m[j] = load_lanes(shift + c + j * kLanes);
    p1[j] = Lanes{};
    p2[j] = Lanes{};
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int j = 0; j < G; ++j) {
      const Lanes d = load_lanes(x + i * C + c + j * kLanes) - m[j];
      p1[j] += d;
      p2[j] += d * d;
    }
  for (int j = 0; j < G; ++j) {
    add_lanes_to(s1 + c + j * kLanes, p1[j]);
    add_lanes_to(s2 + c + j * kLanes, p2[j]);
  }
}

// deviation_sums_chunk by tiles: each tile's two fp32 block sums in registers down the rows,
// four tiles at a time.
void deviation_sums_tiles_chunk(const float* x, int64_t r0, int64_t r1, int64_t C,
                                const float* shift, DeviationSums* out) {
  constexpr int kGroup = 4;
  std::vector<double> s1(C, 0.0), s2(C, 0.0);
  for_each_block(r0, r1, [&](int64_t r, int64_t rows) {
    const float* block = x + r * C;
    int64_t c = 0;
    for (; c + kGroup * kLanes <= C; c += kGroup * kLanes)
      add_tile_group_sums<kGroup>(block, rows, C, c, shift, s1.data(), s2.data());
    for (; c < C; c += kLanes)
      add_tile_group_sums<1>(block, rows, C, c, shift, s1.data(), s2.data());
  });
  for (int64_t c = 0; c < C; ++c) out[c] = DeviationSums{s1[c], s2[c]};
}

// Gradient sums of rows [r0, r1): as grad_sums_nhwc's chunk function, the ReLU mask read as
// bits (no unpacked copy).
void grad_sums_tile_block(const float* __restrict__ grad, const uint8_t* __restrict__ mask,
                          const float* __restrict__ x, const float* __restrict__ mean, bool relu,
                          int64_t r, int64_t rows, int64_t C, float* __restrict__ part) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < C; c += kLanes) {
      const int64_t e = (r + i) * C + c;
      const Lanes dz = lanes_relu_backward(load_lanes(grad + e),
                                           relu ? mask_lanes(mask, e) : LaneInts{}, relu);
      const Lanes xmu = load_lanes(x + e) - load_lanes(mean + c);
      float* a = part + 3 * c;  // the tile's three partial sums, side by side
      store_lanes(a, load_lanes(a) + dz);
      store_lanes(a + kLanes, load_lanes(a + kLanes) + dz * xmu);
      store_lanes(a + 2 * kLanes, load_lanes(a + 2 * kLanes) + xmu);
    }
}

void grad_sums_tiles_chunk(const float* grad, const uint8_t* mask, const float* x,
                           const float* mean, bool relu, int64_t r0, int64_t r1, int64_t C,
                           SumsAcc* out) {
  std::vector<double> sdz(C, 0.0), sdzx(C, 0.0), sxmu(C, 0.0);
  std::vector<float> part(3 * C);
  for_each_block(r0, r1, [&](int64_t r, int64_t rows) {
    std::fill(part.begin(), part.end(), 0.f);
    grad_sums_tile_block(grad, mask, x, mean, relu, r, rows, C, part.data());
    for (int64_t c = 0; c < C; c += kLanes) {
      add_lanes_to(sdz.data() + c, load_lanes(part.data() + 3 * c));
      add_lanes_to(sdzx.data() + c, load_lanes(part.data() + 3 * c + kLanes));
      add_lanes_to(sxmu.data() + c, load_lanes(part.data() + 3 * c + 2 * kLanes));
    }
  });
  for (int64_t c = 0; c < C; ++c) out[c] = SumsAcc{sdz[c], sdzx[c], sxmu[c]};
}

static_assert(kPlaneLanes == kLanes, "a plane row of lanes is one tile");

// The 16 mask bits of the elements at e..e+15, e any index (an NCHW plane starts anywhere in a
// mask byte), as lanes of all ones / zeros.
LaneInts mask_lanes_at(const uint8_t* mask, int64_t e) {
  // Byte by byte into a register (a variable-length memcpy went through the stack, and its
  // byte stores stalled the word's load); the third byte only where the bits reach it (the
  // shift is one per run: a predictable branch), never past the mask's end.
  const uint8_t* p = mask + e / 8;
  const int shift = static_cast<int>(e % 8);
  uint32_t word = p[0] | static_cast<uint32_t>(p[1]) << 8;
  if (shift) word |= static_cast<uint32_t>(p[2]) << 16;
  return (LaneInts{} + static_cast<int32_t>(word >> shift) & kLaneBit) != 0;
}

// plane_grad_sums on vectors (16 lanes of fp32 widened to double), the ReLU mask read as bits:
// the same lanes, math and order of sums.
void plane_grad_sums_tiles(const float* __restrict__ grad, const uint8_t* __restrict__ mask,
                           const float* __restrict__ x, float mean, bool relu, int64_t first,
                           int64_t n, PlaneTotals& totals) {
  typedef double DLanes __attribute__((vector_size(kLanes * sizeof(double))));
  const DLanes m = DLanes{} + static_cast<double>(mean);
  DLanes sdz{}, sdzx{}, sxmu{};
  const int64_t rows = n / kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t e = first + r * kLanes;
    const DLanes dz = __builtin_convertvector(
        lanes_relu_backward(load_lanes(grad + e), relu ? mask_lanes_at(mask, e) : LaneInts{},
                            relu), DLanes);
    const DLanes xmu = __builtin_convertvector(load_lanes(x + e), DLanes) - m;
    sdz += dz;
    sdzx += dz * xmu;
    sxmu += xmu;
  }
  for (int64_t l = 0; l < n - rows * kLanes; ++l) {  // the run's last, partial row
    const int64_t e = first + rows * kLanes + l;
    const bool on = relu && (mask[e / 8] >> (e % 8)) & 1;  // no mask without a ReLU
    const double dz = relu_backward(grad[e], on, relu);
    const double xmu = static_cast<double>(x[e]) - mean;
    sdz[l] += dz;
    sdzx[l] += dz * xmu;
    sxmu[l] += xmu;
  }
  for (int l = 0; l < kLanes; ++l) {
    totals[0][l] += sdz[l];
    totals[1][l] += sdzx[l];
    totals[2][l] += sxmu[l];
  }
}
#else
#define FR_CPU_TILES 0
#endif

// The channels_last reductions: fp32 with C a multiple of 16 by tiles, anything else by runs.
template <typename T>
std::vector<StatsAcc> stats_nhwc_any(const T* x, Geometry g) {
  const int64_t C = g.channels;
#if FR_CPU_TILES
  if constexpr (std::is_same_v<T, float>) {
    if (tiles_apply(g))
      return stats_nhwc(x, g, [&](const float* shift, int64_t r0, int64_t r1, DeviationSums* out) {
        deviation_sums_tiles_chunk(x, r0, r1, C, shift, out);
      });
  }
#endif
  return stats_nhwc(x, g, [&](const float* shift, int64_t r0, int64_t r1, DeviationSums* out) {
    deviation_sums_chunk(x, r0, r1, C, shift, out);
  });
}

template <typename T>
std::vector<SumsAcc> grad_sums_nhwc_any(const T* grad, const uint8_t* mask, const T* x,
                                        const float* mean, bool relu, Geometry g) {
#if FR_CPU_TILES
  if constexpr (std::is_same_v<T, float>) {
    if (tiles_apply(g))
      return reduce_nhwc<SumsAcc>(g, [&](int64_t r0, int64_t r1, SumsAcc* out) {
        grad_sums_tiles_chunk(grad, mask, x, mean, relu, r0, r1, g.channels, out);
      });
  }
#endif
  return grad_sums_nhwc(grad, mask, x, mean, relu, g);
}

template <typename T>
std::vector<SumsAcc> grad_sums_nchw_any(const T* grad, const uint8_t* mask, const T* x,
                                        const float* mean, bool relu, Geometry g) {
#if FR_CPU_TILES
  if constexpr (std::is_same_v<T, float>)
    return grad_sums_nchw_by_runs(g, [&](int64_t c, int64_t first, int64_t len,
                                         PlaneTotals& totals) {
      plane_grad_sums_tiles(grad, mask, x, mean[c], relu, first, len, totals);
    });
#endif
  return grad_sums_nchw(grad, mask, x, mean, relu, g);
}

// The fp32 channels_last elementwise kernels by tiles; false if they don't apply.
bool apply_by_tiles(const void* x, const void* res, const float* mean, const float* scale,
                    const float* shift, bool relu, float floor, Geometry g, void* out,
                    uint8_t* mask) {
#if FR_CPU_TILES
  if (!tiles_apply(g)) return false;
  const float* xf = static_cast<const float*>(x);
  const float* rf = static_cast<const float*>(res);
  float* of = static_cast<float*>(out);
  if (res && mean)
    apply_tiles<true, true>(xf, rf, mean, scale, shift, relu, floor, g, of, mask);
  else if (res)
    apply_tiles<true, false>(xf, rf, mean, scale, shift, relu, floor, g, of, mask);
  else if (mean)
    apply_tiles<false, true>(xf, rf, mean, scale, shift, relu, floor, g, of, mask);
  else
    apply_tiles<false, false>(xf, rf, mean, scale, shift, relu, floor, g, of, mask);
  return true;
#else
  return false;
#endif
}

bool grad_apply_by_tiles(const void* grad, const uint8_t* mask, const void* x,
                         const float* mean, const float* k, const float* b, const float* c,
                         bool relu, Geometry g, void* dx, void* dres) {
#if FR_CPU_TILES
  if (!tiles_apply(g)) return false;
  const float* gf = static_cast<const float*>(grad);
  const float* xf = static_cast<const float*>(x);
  if (dres)
    grad_apply_tiles<true>(gf, mask, xf, mean, k, b, c, relu, g, static_cast<float*>(dx),
                           static_cast<float*>(dres));
  else
    grad_apply_tiles<false>(gf, mask, xf, mean, k, b, c, relu, g, static_cast<float*>(dx),
                            nullptr);
  return true;
#else
  return false;
#endif
}

}  // namespace

void bn_stats(DType dtype, const void* x_, Geometry g, const float* weight, const float* bias,
              float eps, StatsOutputs out) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(x_);
    const auto states = g.inner == 1 ? stats_nhwc_any(x, g) : stats_nchw(x, g);
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
  const float floor = relu_mask_floor(dtype);
  if (dtype == DType::Float32 &&
      apply_by_tiles(x_, res_, mean, scale, shift, relu, floor, g, out_, mask))
    return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(x_);
    const T* res = static_cast<const T*>(res_);
    T* out = static_cast<T*>(out_);
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
    const auto sums = g.inner == 1 ? grad_sums_nhwc_any(grad, mask, x, mean, relu, g)
                                   : grad_sums_nchw_any(grad, mask, x, mean, relu, g);
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
  if (dtype == DType::Float32 &&
      grad_apply_by_tiles(grad_, mask, x_, mean, k, b, c, relu, g, dx_, dres_))
    return;
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
