// Runs the CUDA reductions' split / lane / merge logic (common/reduce_plan.h) and their per-group
// math (common/bn_add_relu_math.h) on the CPU, block by block and lane by lane, exactly as
// bn_add_relu.cu composes them, and checks them against a float64 reference: every element
// visited once by the right channel, vectors whole and aligned, statistics and gradient sums
// correct, for NCHW and NHWC geometries of many shapes, on the path the pointers allow (16-byte
// vectors from an aligned base, single elements from a misaligned one). Also checks the plan's
// limits and int64 offsets for tensors far beyond 2^31 elements (without allocating them).
//
// Built and run by tests/test_cuda_logic_on_cpu.py; prints "N passed, M failed".
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "common/bn_add_relu_math.h"
#include "common/reduce_plan.h"

using namespace fused_resnet;

namespace {

int passed = 0, failed = 0;

const char* path_name(ReducePath path) {
  switch (path) {
    case ReducePath::Scalar: return "scalar";
    case ReducePath::ChannelVectors: return "channel vectors";
    case ReducePath::PlaneVectors: return "plane vectors";
  }
  return "?";
}

void check(bool ok, const char* what, Geometry g, ReducePath path = ReducePath::Scalar) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED %s for outer=%lld C=%lld inner=%lld (%s path)\n", what,
                (long long)g.outer, (long long)g.channels, (long long)g.inner, path_name(path));
  }
}

int64_t channel_of(Geometry g, int64_t i) { return (i / g.inner) % g.channels; }

// What the simulated accumulators saw: each element's visits, and whether every item had the
// kernel's preconditions (whole, starting at a multiple of its size, elements of the channels
// the lane owns).
struct Coverage {
  Geometry g;
  std::vector<int> visits;
  bool right_channel = true;
  bool whole_aligned_items = true;

  explicit Coverage(Geometry geometry) : g(geometry), visits(geometry.numel(), 0) {}
  // An item of E elements at `first`, element e belonging to channel first_channel + e % K.
  void visit(int64_t first, int E, int64_t first_channel, int K) {
    whole_aligned_items &= first % E == 0 && first >= 0 && first + E <= g.numel();
    if (!whole_aligned_items) return;
    for (int e = 0; e < E; ++e) {
      visits[first + e] += 1;
      right_channel &= channel_of(g, first + e) == first_channel + e % K;
    }
  }
  bool each_once() const {
    for (int v : visits)
      if (v != 1) return false;
    return true;
  }
};

// The kernel's StatsAccumulate over a float tensor, recording what it visits.
struct SimStats {
  template <int K>
  using Lane = WelfordChannels<K>;
  static constexpr int kTensorsRead = 1;
  const float* x;
  Coverage* seen;

  template <int K>
  struct Bound {
    const SimStats* sim;
    int64_t item_channel;
    template <int E, int N>
    void operator()(WelfordChannels<K>& s, const ItemGroup<E, N>& items) const {
      float v[N][E];
      for (int n = 0; n < N; ++n) {
        sim->seen->visit(items.first[n], E, item_channel * K, K);
        for (int e = 0; e < E; ++e) v[n][e] = sim->x[items.first[n] + e];
      }
      welford_channels_combine(s, welford_of_group<K>(v));
    }
  };
  template <int K>
  Bound<K> for_item_channel(int64_t c) const { return Bound<K>{this, c}; }
};

// The kernel's GradAccumulate over float tensors: the channel means bound per lane, one mask
// byte per vector item (no mask without ReLU).
struct SimGrad {
  template <int K>
  using Lane = GradSumsChannels<K>;
  static constexpr int kTensorsRead = 2;
  const float* grad;
  const uint8_t* mask;  // nullptr without ReLU
  const float* x;
  const float* mean;
  bool relu;
  Coverage* seen;

  template <int K>
  struct Bound {
    const SimGrad* sim;
    int64_t item_channel;
    float mean[K];
    template <int E, int N>
    void operator()(GradSumsChannels<K>& s, const ItemGroup<E, N>& items) const {
      float g[N][E], xv[N][E];
      uint8_t bits[N];
      for (int n = 0; n < N; ++n) {
        sim->seen->visit(items.first[n], E, item_channel * K, K);
        for (int e = 0; e < E; ++e) {
          g[n][e] = sim->grad[items.first[n] + e];
          xv[n][e] = sim->x[items.first[n] + e];
        }
        bits[n] = sim->relu ? item_mask_bits<E>(sim->mask, items.first[n]) : 0;
      }
      grad_sums_channels_combine(s, grad_sums_of_group<K>(g, bits, xv, mean, sim->relu));
    }
  };
  template <int K>
  Bound<K> for_item_channel(int64_t c) const {
    Bound<K> b{this, c, {}};
    for (int k = 0; k < K; ++k) b.mean[k] = mean[c * K + k];
    return b;
  }
};

template <typename State>
void merge_block(std::vector<State>& lanes, int channel_lanes) {
  for (int stride = kReduceThreads / channel_lanes / 2; stride > 0; stride >>= 1)
    for (int lane = 0; lane < kReduceThreads; ++lane)
      merge_lanes_step(lanes.data(), lane, stride, channel_lanes, MergeStates{});
}

// bn_add_relu.cu's reduce_partial_kernel (reduce_block) for lanes of Acc::Lane<K> over items
// of E elements, lanes run one after another; returns the per-channel partial states.
template <int E, int K, typename Acc, typename Partial>
std::vector<Partial> simulate_partials(const ReducePlan& p, int64_t channels, const Acc& acc,
                                       Partial poison, bool& all_written) {
  using Lane = typename Acc::template Lane<K>;
  std::vector<Partial> partial(p.splits * channels, poison);
  std::vector<bool> written(partial.size(), false);
  std::vector<Lane> lanes(kReduceThreads);
  for (int64_t tile = 0; tile < p.channel_tiles; ++tile) {
    for (int64_t split = 0; split < p.splits; ++split) {
      for (int lane = 0; lane < kReduceThreads; ++lane)
        lanes[lane] = accumulate_lane<E>(p, tile, split, lane, acc, Lane{});
      merge_block(lanes, p.channel_lanes);
      for (int lane = 0; lane < p.channel_lanes; ++lane) {
        const int64_t c = tile * p.channel_lanes + lane;
        if (c >= p.items.channels) continue;
        store_lane_result(lanes[lane], c, partial.data() + split * channels);
        for (int k = 0; k < K; ++k) written[split * channels + c * K + k] = true;
      }
    }
  }
  all_written = true;
  for (bool w : written) all_written &= w;
  return partial;
}

// The two kernels of bn_add_relu.cu's reduce_per_channel on the plan's path.
template <typename Acc, typename Partial, typename Finish>
void simulate(Geometry g, const ReducePlan& p, const Acc& acc, Partial empty, Partial poison,
              const Finish& finish) {
  bool all_written = false;
  std::vector<Partial> partial;
  switch (p.path) {  // as reduce_partial_kernel's switch
    case ReducePath::Scalar:
      partial = simulate_partials<1, 1>(p, g.channels, acc, poison, all_written);
      break;
    case ReducePath::ChannelVectors:
      partial = simulate_partials<kVectorElements, kVectorElements>(p, g.channels, acc, poison,
                                                                    all_written);
      break;
    case ReducePath::PlaneVectors:
      partial = simulate_partials<kVectorElements, 1>(p, g.channels, acc, poison, all_written);
      break;
  }
  check(all_written, "every (split, channel) partial state written", g, p.path);
  std::vector<Partial> lanes(kReduceThreads);
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int lane = 0; lane < kReduceThreads; ++lane) {
      Partial s = empty;
      for (int64_t q = lane; q < p.splits; q += kReduceThreads)
        MergeStates{}(s, partial[q * g.channels + c]);
      lanes[lane] = s;
    }
    merge_block(lanes, 1);
    finish(c, lanes[0]);
  }
}

double rel_err(double got, double want) {
  return std::fabs(got - want) / std::max(1e-6, std::fabs(want));
}

// A float buffer whose data() starts 16-byte aligned, or 4 bytes past that (misaligned).
struct Buffer {
  std::vector<float> storage;
  float* data;
  Buffer(const std::vector<float>& values, bool misaligned) : storage(values.size() + 8) {
    float* p = storage.data();
    while (!aligned16(p)) ++p;
    data = p + (misaligned ? 1 : 0);
    std::copy(values.begin(), values.end(), data);
  }
};

ReducePath expected_vector_path(Geometry g) {
  if (g.inner == 1) return g.channels % 8 == 0 ? ReducePath::ChannelVectors : ReducePath::Scalar;
  return g.inner % 8 == 0 ? ReducePath::PlaneVectors : ReducePath::Scalar;
}

void run_geometry(Geometry g) {
  const int64_t n = g.numel();
  std::vector<float> x(n), grad(n);
  std::vector<uint8_t> mask(mask_bytes(n), 0);
  uint32_t state = 12345;
  auto uniform = [&]() {  // deterministic, no <random> differences between platforms
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / 16777216.0f;
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = channel_of(g, i);
    x[i] = 3.0f + 0.5f * static_cast<float>(c % 5) + (uniform() - 0.5f);  // large mean
    grad[i] = uniform() - 0.5f;
    if (uniform() > 0.5f) mask[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
  }
  // float64 reference per channel
  std::vector<double> sum(g.channels, 0), count(g.channels, 0), m2(g.channels, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = channel_of(g, i);
    sum[c] += x[i];
    count[c] += 1;
  }
  const std::vector<double> zeros(g.channels, 0.0);
  std::vector<double> sdz64[2] = {zeros, zeros}, sdzx64[2] = {zeros, zeros};  // [relu]
  std::vector<double> sxmu64 = zeros;  // sum(x - mean): the same with or without ReLU
  std::vector<double> mean64(g.channels);
  for (int64_t c = 0; c < g.channels; ++c) mean64[c] = sum[c] / count[c];
  std::vector<float> mean32(g.channels);
  for (int64_t c = 0; c < g.channels; ++c) mean32[c] = static_cast<float>(mean64[c]);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = channel_of(g, i);
    m2[c] += (x[i] - mean64[c]) * (x[i] - mean64[c]);
    for (int relu = 0; relu < 2; ++relu) {
      const double dz = !relu || mask_bit(mask.data(), i) ? grad[i] : 0.0;
      sdz64[relu][c] += dz;
      sdzx64[relu][c] += dz * (x[i] - mean32[c]);
      if (relu) sxmu64[c] += x[i] - mean32[c];
    }
  }

  for (const bool misaligned : {false, true}) {
    // Stats read x; the gradient sums read grad and x: misalign one of each.
    const Buffer xs(x, misaligned), xg(x, false), gg(grad, misaligned);
    const ReducePath stats_path = reduce_path(g, {xs.data});
    const ReducePath grad_path = reduce_path(g, {gg.data, xg.data});
    const ReducePath want = misaligned ? ReducePath::Scalar : expected_vector_path(g);
    check(stats_path == want && grad_path == want,
          misaligned ? "a misaligned pointer refuses the vector path"
                     : "the vector path exactly where the geometry allows it",
          g, stats_path);

    check(max_reduce_splits(g) >= reduce_plan(g, stats_path).splits,
          "the workspace holds every split", g, stats_path);
    Coverage stats_seen(g);
    std::vector<float> mean(g.channels), var(g.channels);
    const WelfordState poison{NAN, NAN, -1};
    simulate(g, reduce_plan(g, stats_path), SimStats{xs.data, &stats_seen}, welford_empty(),
             poison, [&](int64_t c, const WelfordState& s) {
               mean[c] = welford_mean(s);
               var[c] = welford_biased_var(s);
             });
    check(stats_seen.whole_aligned_items, "items whole and at multiples of their size", g,
          stats_path);
    check(stats_seen.each_once(), "every element visited exactly once", g, stats_path);
    check(stats_seen.right_channel, "every element accumulated into its own channel", g,
          stats_path);
    // Observed at most 1.5e-7 and 1.2e-6 (fp32 rounding) on every path; the bounds leave ~7x.
    bool stats_ok = true;
    for (int64_t c = 0; c < g.channels; ++c)
      stats_ok &= rel_err(mean[c], mean64[c]) < 1e-6 && rel_err(var[c], m2[c] / count[c]) < 1e-5;
    check(stats_ok, "mean and biased variance vs float64", g, stats_path);

    for (const bool relu : {true, false}) {
      Coverage grad_seen(g);
      std::vector<float> sdz(g.channels), sdzx(g.channels), sxmu(g.channels);
      const SimGrad acc{gg.data, relu ? mask.data() : nullptr, xg.data, mean32.data(), relu,
                        &grad_seen};
      simulate(g, reduce_plan(g, grad_path), acc, grad_sums_empty(), GradSums{NAN, NAN, NAN},
               [&](int64_t c, const GradSums& s) {
                 sdz[c] = s.sum_dz;
                 sdzx[c] = s.sum_dz_xmu;
                 sxmu[c] = s.sum_xmu;
               });
      check(grad_seen.whole_aligned_items && grad_seen.each_once() && grad_seen.right_channel,
            "gradient sums: every element once, whole aligned items, own channel", g, grad_path);
      bool grads_ok = true;
      for (int64_t c = 0; c < g.channels; ++c) {
        const double scale = std::sqrt(count[c]) * 0.5 + 1.0;  // sums of count[c] terms of ~0.3
        grads_ok &= std::fabs(sdz[c] - sdz64[relu][c]) < 1e-6 * scale &&  // seen <= 1.4e-7*scale
                    std::fabs(sdzx[c] - sdzx64[relu][c]) < 1e-6 * scale &&
                    std::fabs(sxmu[c] - sxmu64[c]) < 1e-6 * scale;
      }
      check(grads_ok,
            relu ? "sum(dz), sum(dz*(x-mean)), sum(x-mean) through the ReLU mask vs float64"
                 : "sum(dz), sum(dz*(x-mean)), sum(x-mean) without ReLU vs float64",
            g, grad_path);
    }
  }
}

// No elements per channel: every partial written (empty), every channel's statistics NaN.
void run_empty_batch(Geometry g) {
  for (const ReducePath path : {ReducePath::Scalar, expected_vector_path(g)}) {
    Coverage seen(g);
    bool all_nan = true;
    simulate(g, reduce_plan(g, path), SimStats{nullptr, &seen}, welford_empty(),
             WelfordState{NAN, NAN, -1}, [&](int64_t, const WelfordState& s) {
               all_nan &= std::isnan(welford_mean(s)) && std::isnan(welford_biased_var(s));
             });
    check(all_nan, "an empty batch gives NaN statistics", g, path);
  }
}

Geometry nchw(int64_t n, int64_t c, int64_t h, int64_t w) { return Geometry{n, c, h * w}; }
Geometry nhwc(int64_t n, int64_t c, int64_t h, int64_t w) { return Geometry{n * h * w, c, 1}; }

// Plans for tensors far too large to allocate: grid limits, and one full lane walked with the
// division-free strider against the dividing channel_element_offset, in int64.
void check_huge_plan(Geometry g) {
  for (const ReducePath path : {ReducePath::Scalar, expected_vector_path(g)}) {
    const ReducePlan p = reduce_plan(g, path);
    const Geometry& items = p.items;
    check(p.splits >= 1 && p.splits <= 65535, "splits within gridDim.y", g, path);
    check(p.channel_tiles >= 1 && p.channel_tiles <= std::numeric_limits<int32_t>::max(),
          "channel tiles within gridDim.x", g, path);
    check(p.channel_tiles * p.channel_lanes >= items.channels, "channel tiles cover C", g, path);
    check(max_reduce_splits(g) >= p.splits, "the workspace holds every split", g, path);
    check(items.numel() * item_elements(path) == g.numel() &&
              items.channels * item_channels(path) == g.channels,
          "items tile the tensor", g, path);
    const int64_t last = channel_element_offset(items, items.per_channel() - 1, items.channels - 1);
    check(last == items.numel() - 1, "int64 offset of the last item", g, path);
    const int64_t first_of_last_channel = channel_element_offset(items, 0, items.channels - 1);
    check(first_of_last_channel == (items.channels - 1) * items.inner,
          "offset of a channel's first item", g, path);
    // The lane of the last split that owns the last row lane of the last item channel.
    const int64_t c = items.channels - 1;
    const int64_t step = p.splits * p.row_lanes();
    int64_t j = (p.splits - 1) * p.row_lanes() + p.row_lanes() - 1;
    ChannelStrider at = channel_strider(items, c, j, step);
    bool strider_ok = true;
    int64_t visited = 0;
    for (; j < items.per_channel(); j += step, ++visited) {
      strider_ok &= at.offset == channel_element_offset(items, j, c);
      at.advance();
    }
    check(strider_ok && visited > 0, "strider offsets equal channel_element_offset", g, path);
  }
}

}  // namespace

int main() {
  const Geometry shapes[] = {
      nchw(2, 3, 5, 7),     nhwc(2, 3, 5, 7),     nchw(1, 7, 7, 7),     nhwc(1, 7, 7, 7),
      nchw(4, 130, 3, 5),   nhwc(4, 130, 3, 5),   nhwc(2, 70, 4, 4),    nchw(1, 5, 1, 1),
      nhwc(1, 1, 1, 2),     nchw(8, 16, 56, 56),  nhwc(64, 64, 14, 14), nchw(3, 2, 300, 301),
      nhwc(16, 96, 33, 17),
      // C = 8, N = 1, odd H and W: one item channel, one lane across channels (NHWC)
      nhwc(1, 8, 7, 7),     nchw(1, 8, 7, 7),     nchw(1, 8, 4, 6),     nhwc(3, 8, 5, 5),
      // C = 2048: 8 channel tiles of 32 vector lanes (NHWC), 2048 one-channel tiles (NCHW)
      nhwc(2, 2048, 7, 7),  nchw(2, 2048, 7, 7),  nchw(2, 2048, 4, 4),  nhwc(1, 2048, 3, 3),
      // C/8 not a power of two (idle lanes), one vector per plane, 1x1 NCHW = NHWC memory
      nhwc(3, 24, 5, 3),    nhwc(2, 40, 3, 5),    nchw(5, 3, 8, 1),     nchw(2, 16, 1, 1),
      nhwc(1, 16, 1, 1),    nchw(3, 12, 4, 2),
      // C % 4 == 0 but not C % 8, inner % 4 == 0 but not inner % 8: single elements
      nhwc(2, 20, 5, 3),    nhwc(3, 36, 3, 3),    nchw(2, 16, 2, 2),    nchw(3, 8, 6, 2),
      // many splits per channel: groups, tails and rows a split does not reach
      nhwc(256, 64, 9, 9),  nchw(32, 64, 28, 28), nchw(1, 4, 400, 400), nhwc(7, 256, 13, 11),
  };
  for (const Geometry& g : shapes) run_geometry(g);
  run_empty_batch(nhwc(0, 16, 4, 4));
  run_empty_batch(nchw(0, 3, 8, 8));
  run_empty_batch(nchw(2, 16, 0, 4));  // inner == 0
  run_empty_batch(nhwc(2, 16, 3, 0));
  check_huge_plan(nhwc(4096, 2048, 56, 56));
  check_huge_plan(nchw(4096, 2048, 56, 56));
  check_huge_plan(nchw(1, 3, 50000, 50000));
  check_huge_plan(nhwc(65536, 64, 224, 224));
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
