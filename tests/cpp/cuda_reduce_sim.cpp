// Runs the CUDA reductions' split / lane / merge logic (common/reduce_plan.h) on the CPU, block
// by block and lane by lane, exactly as bn_add_relu.cu composes it, and checks it against a
// float64 reference: every element visited once by the right channel, statistics and gradient
// sums correct, for NCHW and NHWC geometries of many shapes. Also checks the plan's limits and
// int64 offsets for tensors far beyond 2^31 elements (without allocating them).
//
// Built and run by tests/test_cuda_logic_on_cpu.py; prints "N passed, M failed".
#include <cmath>
#include <cstdio>
#include <vector>

#include "common/bn_add_relu_math.h"
#include "common/reduce_plan.h"

using namespace fused_resnet;

namespace {

int passed = 0, failed = 0;

void check(bool ok, const char* what, Geometry g) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAILED %s for outer=%lld C=%lld inner=%lld\n", what, (long long)g.outer,
                (long long)g.channels, (long long)g.inner);
  }
}

// The two kernels of bn_add_relu.cu's reduce_per_channel, lanes run one after another.
template <typename State, typename Acc, typename Finish>
void simulate(Geometry g, const Acc& acc, State empty, const Finish& finish) {
  const ReducePlan p = reduce_plan(g);
  std::vector<State> partial(p.splits * g.channels, empty);
  std::vector<State> lanes(kReduceThreads);
  auto merge_block = [&](int channel_lanes) {
    for (int stride = kReduceThreads / channel_lanes / 2; stride > 0; stride >>= 1)
      for (int lane = 0; lane < kReduceThreads; ++lane)
        merge_lanes_step(lanes.data(), lane, stride, channel_lanes, MergeStates{});
  };
  for (int64_t tile = 0; tile < p.channel_tiles; ++tile) {
    for (int64_t split = 0; split < p.splits; ++split) {
      for (int lane = 0; lane < kReduceThreads; ++lane)
        lanes[lane] = accumulate_lane(g, p, tile, split, lane, acc, empty);
      merge_block(p.channel_lanes);
      for (int lane = 0; lane < p.channel_lanes; ++lane) {
        const int64_t c = tile * p.channel_lanes + lane;
        if (c < g.channels) partial[split * g.channels + c] = lanes[lane];
      }
    }
  }
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int lane = 0; lane < kReduceThreads; ++lane) {
      State s = empty;
      for (int64_t q = lane; q < p.splits; q += kReduceThreads)
        MergeStates{}(s, partial[q * g.channels + c]);
      lanes[lane] = s;
    }
    merge_block(1);
    finish(c, lanes[0]);
  }
}

double rel_err(double got, double want) {
  return std::fabs(got - want) / std::max(1e-6, std::fabs(want));
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
    const int64_t c = (i / g.inner) % g.channels;
    x[i] = 3.0f + 0.5f * static_cast<float>(c % 5) + (uniform() - 0.5f);  // large mean
    grad[i] = uniform() - 0.5f;
    if (uniform() > 0.5f) mask[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
  }
  // float64 reference per channel
  std::vector<double> sum(g.channels, 0), count(g.channels, 0), m2(g.channels, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = (i / g.inner) % g.channels;
    sum[c] += x[i];
    count[c] += 1;
  }
  std::vector<double> mean64(g.channels), sdz64(g.channels, 0), sdzx64(g.channels, 0);
  for (int64_t c = 0; c < g.channels; ++c) mean64[c] = sum[c] / count[c];
  std::vector<float> mean32(g.channels);
  for (int64_t c = 0; c < g.channels; ++c) mean32[c] = static_cast<float>(mean64[c]);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = (i / g.inner) % g.channels;
    m2[c] += (x[i] - mean64[c]) * (x[i] - mean64[c]);
    const double dz = mask_bit(mask.data(), i) ? grad[i] : 0.0;
    sdz64[c] += dz;
    sdzx64[c] += dz * (x[i] - mean32[c]);
  }

  std::vector<int> visits(n, 0);
  bool right_channel = true;
  auto stats_acc = [&](WelfordState& s, int64_t i, int64_t c) {
    visits[i] += 1;
    right_channel &= (i / g.inner) % g.channels == c;
    welford_add(s, x[i]);
  };
  std::vector<float> mean(g.channels), var(g.channels);
  simulate(g, stats_acc, welford_empty(), [&](int64_t c, const WelfordState& s) {
    mean[c] = welford_mean(s);
    var[c] = welford_biased_var(s);
  });
  bool once = true;
  for (int v : visits) once &= v == 1;
  check(once, "every element visited exactly once", g);
  check(right_channel, "every element accumulated into its own channel", g);
  bool stats_ok = true;
  for (int64_t c = 0; c < g.channels; ++c)
    stats_ok &= rel_err(mean[c], mean64[c]) < 1e-5 && rel_err(var[c], m2[c] / count[c]) < 1e-4;
  check(stats_ok, "mean and biased variance vs float64", g);

  auto grad_acc = [&](GradSums& s, int64_t i, int64_t c) {
    const float dz = relu_backward(grad[i], mask_bit(mask.data(), i), true);
    grad_sums_add(s, dz, x[i], mean32[c]);
  };
  std::vector<float> sdz(g.channels), sdzx(g.channels);
  simulate(g, grad_acc, grad_sums_empty(), [&](int64_t c, const GradSums& s) {
    sdz[c] = s.sum_dz;
    sdzx[c] = s.sum_dz_xmu;
  });
  bool grads_ok = true;
  for (int64_t c = 0; c < g.channels; ++c) {
    const double scale = std::sqrt(count[c]) * 0.5 + 1.0;  // sums of count[c] terms of ~0.3
    grads_ok &= std::fabs(sdz[c] - sdz64[c]) < 1e-5 * scale &&
                std::fabs(sdzx[c] - sdzx64[c]) < 1e-5 * scale;
  }
  check(grads_ok, "sum(dz) and sum(dz*(x-mean)) vs float64", g);
}

Geometry nchw(int64_t n, int64_t c, int64_t h, int64_t w) { return Geometry{n, c, h * w}; }
Geometry nhwc(int64_t n, int64_t c, int64_t h, int64_t w) { return Geometry{n * h * w, c, 1}; }

void check_huge_plan(Geometry g) {
  const ReducePlan p = reduce_plan(g);
  check(p.splits >= 1 && p.splits <= 65535, "splits within gridDim.y", g);
  check(p.channel_tiles * p.channel_lanes >= g.channels, "channel tiles cover C", g);
  const int64_t last = channel_element_offset(g, g.per_channel() - 1, g.channels - 1);
  check(last == g.numel() - 1, "int64 offset of the last element", g);
  const int64_t first_of_last_channel = channel_element_offset(g, 0, g.channels - 1);
  check(first_of_last_channel == (g.channels - 1) * g.inner, "offset of a channel's first", g);
}

}  // namespace

int main() {
  const Geometry shapes[] = {
      nchw(2, 3, 5, 7),    nhwc(2, 3, 5, 7),    nchw(1, 7, 7, 7),    nhwc(1, 7, 7, 7),
      nchw(4, 130, 3, 5),  nhwc(4, 130, 3, 5),  nhwc(2, 70, 4, 4),   nchw(1, 5, 1, 1),
      nhwc(1, 1, 1, 2),    nchw(8, 16, 56, 56), nhwc(64, 64, 14, 14), nchw(3, 2, 300, 301),
      nhwc(16, 96, 33, 17),
  };
  for (const Geometry& g : shapes) run_geometry(g);
  check_huge_plan(nhwc(4096, 2048, 56, 56));
  check_huge_plan(nchw(4096, 2048, 56, 56));
  check_huge_plan(nchw(1, 3, 50000, 50000));
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
