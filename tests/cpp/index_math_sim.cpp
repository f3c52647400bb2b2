// Checks the division-free index math of the CUDA elementwise kernels (common/bn_add_relu_math.h:
// FastDivmod, ChannelMap, ChannelWalker) on the CPU against plain 64-bit division: divisors and
// dividends at the boundaries where a multiply-high method could go wrong (powers of two and
// their neighbours, 2^31, 2^32, 2^63 - 1), random ones, and the walker of every memory offset of
// small [outer, C, inner] geometries (C = 1, inner = 1, C not a multiple of 8) and of offsets
// near 2^31, 2^32 and 2^62 in geometries that large (nothing is allocated).
//
// Built and run by tests/test_hot_path.py; prints "N passed, M failed".
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "common/bn_add_relu_math.h"

using namespace fused_resnet;

namespace {

int passed = 0, failed = 0;

void check(bool ok, const char* what, long long a, long long b) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    if (failed <= 20) std::printf("FAILED %s (%lld, %lld)\n", what, a, b);
  }
}

constexpr int64_t kMax = INT64_MAX;  // 2^63 - 1: the largest dividend FastDivmod takes

std::vector<int64_t> boundaries() {
  std::vector<int64_t> v = {1, 2, 3, 5, 7, 8, 9, 63, 64, 65, 255, 256, 257, 1000, 4095, 4096};
  for (int k = 5; k <= 62; ++k) {
    const int64_t p = int64_t{1} << k;
    v.push_back(p - 1);
    v.push_back(p);
    v.push_back(p + 1);
  }
  v.push_back(kMax - 1);
  v.push_back(kMax);
  return v;
}

void check_divisor(int64_t d, std::mt19937_64& rng) {
  const FastDivmod f = make_fast_divmod(d);
  std::vector<int64_t> n = {0, 1, d - 1, d, kMax, kMax - 1, kMax - d};
  if (d < kMax) n.push_back(d + 1);
  for (int64_t b : boundaries()) n.push_back(b);
  for (int64_t k : {int64_t{1}, int64_t{2}, int64_t{3}, kMax / d - 1, kMax / d}) {
    if (k < 1 || k > kMax / d) continue;
    n.push_back(k * d);  // exact multiples and their neighbours: where rounding up shows
    n.push_back(k * d - 1);
    if (k * d < kMax) n.push_back(k * d + 1);
  }
  for (int r = 0; r < 200; ++r) n.push_back(static_cast<int64_t>(rng() >> 1));
  for (int64_t x : n) {
    if (x < 0) continue;
    check(f.div(x) == x / d, "div", x, d);
    check(f.mod(x) == x % d, "mod", x, d);
  }
}

// walker_at(i) for every i, and next() from 0, against (i / inner) % C and i % inner.
void check_geometry_exhaustively(Geometry g) {
  const ChannelMap map = make_channel_map(g);
  ChannelWalker w = map.walker_at(0);
  bool ok_at = true, ok_next = true;
  for (int64_t i = 0; i < g.numel(); ++i) {
    const ChannelWalker at = map.walker_at(i);
    ok_at &= at.c == (i / g.inner) % g.channels && at.s == i % g.inner;
    ok_next &= w.c == at.c && w.s == at.s;
    w.next();
  }
  check(ok_at, "walker_at over a whole tensor (C, inner)", g.channels, g.inner);
  check(ok_next, "next() over a whole tensor (C, inner)", g.channels, g.inner);
}

// Offsets around `around` (which must lie in the tensor) and 8-element walks from each.
void check_geometry_near(Geometry g, int64_t around) {
  const ChannelMap map = make_channel_map(g);
  bool ok = true;
  for (int64_t i = around - 40; i <= around + 40; ++i) {
    if (i < 0 || i + 8 > g.numel()) continue;
    ChannelWalker w = map.walker_at(i);
    for (int64_t k = i; k < i + 8; ++k) {
      ok &= w.c == (k / g.inner) % g.channels && w.s == k % g.inner;
      w.next();
    }
  }
  check(ok, "walker near a large offset (C, inner)", g.channels, g.inner);
}

}  // namespace

int main() {
  std::mt19937_64 rng(20240518);
  for (int64_t d : boundaries()) check_divisor(d, rng);
  for (int r = 0; r < 300; ++r) check_divisor(static_cast<int64_t>(rng() >> (1 + rng() % 62)) | 1,
                                              rng);

  // Small tensors, every offset: C = 1, inner = 1 (NHWC), C not a multiple of 8, odd planes.
  for (int64_t outer : {1, 2, 3})
    for (int64_t c : {1, 3, 7, 8, 9, 64})
      for (int64_t inner : {1, 2, 5, 8, 49})
        check_geometry_exhaustively(Geometry{outer, c, inner});

  // Large geometries (never allocated): offsets around 2^31, 2^32 and 2^62.
  const int64_t near[] = {(int64_t{1} << 31) - 8, int64_t{1} << 31, (int64_t{1} << 32) - 8,
                          int64_t{1} << 32, (int64_t{1} << 62) + 3};
  const Geometry big[] = {
      Geometry{int64_t{1} << 40, 3, 1},           // NHWC, C = 3
      Geometry{int64_t{1} << 38, 64, 1},          // NHWC, C = 64
      Geometry{int64_t{1} << 30, 7, 56 * 56},     // NCHW, C and plane not multiples of 8
      Geometry{int64_t{1} << 28, 2048, 49},       // NCHW, ResNet's last stage
      Geometry{(int64_t{1} << 45) + 1, 1, 1 << 17},  // C = 1, past 2^62 elements
      Geometry{3, (int64_t{1} << 31) + 1, 1 << 20},  // more channels than 2^31
  };
  for (const Geometry& g : big)
    for (int64_t i : near)
      if (i < g.numel()) check_geometry_near(g, i);

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
