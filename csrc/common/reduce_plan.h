// How the CUDA kernels split a per-channel reduction over a dense [outer, C, inner] tensor, as
// __host__ __device__ code: the kernels in csrc/cuda run it on the GPU, and
// tests/cpp/cuda_reduce_sim.cpp runs the very same functions on the CPU, block by block and
// lane by lane, to check coverage, offsets and merge order without a GPU.
//
// Lanes read items: single elements (the scalar path, any shape and alignment) or 16-byte
// vectors of 8 consecutive elements (ReducePath). The plan sees the tensor as a tensor of items
// [outer, C', inner'] (ReducePlan::items) and splits that one exactly as the scalar path splits
// the tensor itself:
//
// Grid: (channel_tiles, splits) blocks of kReduceThreads lanes. A block covers channel_lanes
// consecutive item channels (up to 32 where channels are contiguous, inner' == 1; 1 otherwise,
// where one channel's plane is) and row_lanes = kReduceThreads / channel_lanes lanes along the
// channel's items. Lane (tx, ty) of block (tile, split) visits items j = split*row_lanes + ty,
// stepping by splits*row_lanes, of item channel tile*channel_lanes + tx, in groups of items
// loaded before any is used (then single items for the rest).
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "common/types.h"

namespace fused_resnet {

constexpr int kReduceThreads = 256;
constexpr int kVectorElements = 8;  // one 16-byte vector of a 16-bit type (two for fp32)
// Loads a lane issues before it uses any (latency hiding): a group of kLoadsInFlight / tensors
// items, for a reduction that reads `tensors` tensors. More would cost registers (occupancy).
constexpr int kLoadsInFlight = 4;

enum class ReducePath : int {
  Scalar,          // items are single elements: every shape, every alignment
  ChannelVectors,  // inner == 1 (NHWC), C % 8 == 0: items are 8 consecutive channels of a row
  PlaneVectors,    // inner % 8 == 0 (NCHW): items are 8 consecutive elements of a channel plane
};

FR_HD int item_elements(ReducePath path) {
  return path == ReducePath::Scalar ? 1 : kVectorElements;
}
// Channels an item spans: its element e belongs to the item channel's channel e % this.
FR_HD int item_channels(ReducePath path) {
  return path == ReducePath::ChannelVectors ? kVectorElements : 1;
}

// The tensor as a tensor of items: items of one item channel are what a lane reduces.
FR_HD Geometry item_geometry(Geometry g, ReducePath path) {
  switch (path) {
    case ReducePath::ChannelVectors: return Geometry{g.outer, g.channels / kVectorElements, 1};
    case ReducePath::PlaneVectors: return Geometry{g.outer, g.channels, g.inner / kVectorElements};
    default: return g;
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The 16-byte path needs whole vectors that never straddle two channels' runs (NHWC: C % 8 == 0;
// otherwise inner % 8 == 0), so every vector starts at a multiple of 8 elements, and 16-byte
// aligned base pointers (nullptr: absent, as an empty tensor's may be).
inline ReducePath reduce_path(Geometry g, std::initializer_list<const void*> ptrs) {
  const bool whole = g.inner == 1 ? g.channels % kVectorElements == 0
                                  : g.inner % kVectorElements == 0;
  bool aligned = true;
  for (const void* p : ptrs) aligned &= aligned16(p);
  if (!whole || !aligned) return ReducePath::Scalar;
  return g.inner == 1 ? ReducePath::ChannelVectors : ReducePath::PlaneVectors;
}

struct ReducePlan {
  ReducePath path;
  Geometry items;  // the tensor as items (the tensor itself on the scalar path)
  int channel_lanes;
  int64_t channel_tiles;
  int64_t splits;
  FR_HD int row_lanes() const { return kReduceThreads / channel_lanes; }
};

// Smallest power of two >= n, at most `cap` (a power of two).
inline int64_t pow2_at_least(int64_t n, int64_t cap) {
  int64_t p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

// Enough blocks to fill a large GPU a few times over (an H100 has 132 SMs), at least
// kMinElementsPerLane elements or kMinVectorsPerLane vectors per lane, and gridDim.y <= 65535.
// Vector lanes get more bytes each: a wide block (up to 256 channels) writes a partial state per
// channel, which should stay a small fraction of the bytes it reads.
inline ReducePlan reduce_plan(Geometry g, ReducePath path) {
  constexpr int64_t kTargetBlocks = 2048;
  constexpr int64_t kMinElementsPerLane = 8;
  constexpr int64_t kMinVectorsPerLane = 16;
  const int64_t min_items_per_lane =
      path == ReducePath::Scalar ? kMinElementsPerLane : kMinVectorsPerLane;
  ReducePlan p;
  p.path = path;
  p.items = item_geometry(g, path);
  // Contiguous channels: as many lanes across them as there are (a warp reads whole rows when
  // there are fewer than 32), up to a warp.
  p.channel_lanes = p.items.inner == 1 ? static_cast<int>(pow2_at_least(p.items.channels, 32)) : 1;
  p.channel_tiles = (p.items.channels + p.channel_lanes - 1) / p.channel_lanes;
  const int64_t per_lane_block = int64_t{p.row_lanes()} * min_items_per_lane;
  const int64_t per_channel = std::max<int64_t>(p.items.per_channel(), 1);
  const int64_t by_work = (per_channel + per_lane_block - 1) / per_lane_block;
  const int64_t by_occupancy =
      std::max<int64_t>(kTargetBlocks / std::max<int64_t>(p.channel_tiles, 1), 1);
  p.splits = std::max<int64_t>(1, std::min<int64_t>(std::min(by_work, by_occupancy), 65535));
  return p;
}

// Splits the workspace must hold partial states for, whichever path the pointers allow.
inline int64_t max_reduce_splits(Geometry g) {
  const ReducePath vector = reduce_path(g, {});  // no pointers: as if aligned
  return std::max(reduce_plan(g, ReducePath::Scalar).splits, reduce_plan(g, vector).splits);
}

// Memory offset of the j-th element (0 <= j < outer*inner) of channel c.
FR_HD int64_t channel_element_offset(Geometry g, int64_t j, int64_t c) {
  if (g.inner == 1) return j * g.channels + c;
  const int64_t n = j / g.inner;
  return (n * g.channels + c) * g.inner + (j - n * g.inner);
}

// The offsets of elements j, j + step, j + 2*step, ... of channel c: divisions when created,
// none per element after (channel_element_offset divides per call).
struct ChannelStrider {
  int64_t offset;     // of the current element j
  int64_t r;          // j % inner
  int64_t inner;
  int64_t step_r;     // step % inner
  int64_t step_skip;  // offset change for a step that does not wrap r
  int64_t wrap_skip;  // extra change when r wraps: one more outer index, back (C-1) planes
  FR_HD void advance() {
    offset += step_skip;
    r += step_r;
    if (r >= inner) {
      r -= inner;
      offset += wrap_skip;
    }
  }
};

FR_HD ChannelStrider channel_strider(Geometry g, int64_t c, int64_t j, int64_t step) {
  ChannelStrider s;
  s.offset = channel_element_offset(g, j, c);
  s.r = j % g.inner;
  s.inner = g.inner;
  s.step_r = step % g.inner;
  s.step_skip = (step / g.inner) * g.channels * g.inner + s.step_r;
  s.wrap_skip = (g.channels - 1) * g.inner;
  return s;
}

// The memory offsets of N items of E consecutive elements each (what accumulators receive).
template <int E, int N>
struct ItemGroup {
  int64_t first[N];
};

// What one lane accumulates over its items. acc.for_item_channel<K>(c) gives the accumulator of
// item channel c (K = State::kChannels), holding what is constant along the lane (a channel's
// mean) in registers; that one is called as lane_acc(State&, ItemGroup<E, N>) with
// N = kLoadsInFlight / Acc::kTensorsRead while whole groups remain, then N = 1.
// E must be item_elements(p.path).
template <int E, typename State, typename Acc>
FR_HD State accumulate_lane(const ReducePlan& p, int64_t tile, int64_t split, int lane,
                            const Acc& acc, State state) {
  constexpr int kGroup = kLoadsInFlight / Acc::kTensorsRead;
  static_assert(kGroup >= 1, "at least one item per group");
  const Geometry& g = p.items;
  const int tx = lane % p.channel_lanes;
  const int ty = lane / p.channel_lanes;
  const int64_t c = tile * p.channel_lanes + tx;
  const int64_t m = g.per_channel();
  int64_t j = split * p.row_lanes() + ty;
  if (c >= g.channels || j >= m) return state;  // (also keeps inner == 0 from the strider)
  const int64_t step = p.splits * p.row_lanes();
  ChannelStrider at = channel_strider(g, c, j, step);
  const auto lane_acc = acc.template for_item_channel<State::kChannels>(c);
  for (; j + (kGroup - 1) * step < m; j += kGroup * step) {
    ItemGroup<E, kGroup> group;
    FR_UNROLL
    for (int k = 0; k < kGroup; ++k) {
      group.first[k] = at.offset * E;
      at.advance();
    }
    lane_acc(state, group);
  }
  for (; j < m; j += step) {
    const ItemGroup<E, 1> one{{at.offset * E}};
    at.advance();
    lane_acc(state, one);
  }
  return state;
}

// One step of the block's tree merge over row lanes (strides row_lanes/2, ..., 1, with a
// barrier between steps); afterwards lane tx holds item channel tx's result. A step reads lanes
// >= stride and writes lanes < stride, so running the lanes one after another (the CPU
// simulation) gives the same result as running them in parallel.
template <typename State, typename Merge>
FR_HD void merge_lanes_step(State* lanes, int lane, int stride, int channel_lanes,
                            const Merge& merge) {
  if (lane / channel_lanes < stride) merge(lanes[lane], lanes[lane + stride * channel_lanes]);
}

// Stores a lane's merged result, the states of the State::kChannels channels of item channel c,
// as per-channel partial states (out: one split's row of C of them).
template <typename State, typename Partial>
FR_HD void store_lane_result(const State& s, int64_t c, Partial* out) {
  FR_UNROLL
  for (int k = 0; k < State::kChannels; ++k) out[c * State::kChannels + k] = channel_state(s, k);
}

}  // namespace fused_resnet
