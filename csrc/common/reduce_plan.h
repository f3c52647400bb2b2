// How the CUDA kernels split a per-channel reduction over a dense [outer, C, inner] tensor, as
// __host__ __device__ code: the kernels in csrc/cuda run it on the GPU, and
// tests/cpp/cuda_reduce_sim.cpp runs the very same functions on the CPU, block by block and
// lane by lane, to check coverage, offsets and merge order without a GPU.
//
// Grid: (channel_tiles, splits) blocks of kReduceThreads lanes. A block covers channel_lanes
// consecutive channels (32 for NHWC, where channels are contiguous; 1 for NCHW, where one
// channel's plane is) and row_lanes = kReduceThreads / channel_lanes lanes along the channel's
// elements. Lane (tx, ty) of block (tile, split) visits elements j = split*row_lanes + ty,
// stepping by splits*row_lanes, of channel tile*channel_lanes + tx.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/types.h"

namespace fused_resnet {

constexpr int kReduceThreads = 256;

struct ReducePlan {
  int channel_lanes;
  int64_t channel_tiles;
  int64_t splits;
  FR_HD int row_lanes() const { return kReduceThreads / channel_lanes; }
};

// Enough blocks to fill a large GPU a few times over (an H100 has 132 SMs), at least
// kMinElementsPerLane elements per lane, and gridDim.y <= 65535.
inline ReducePlan reduce_plan(Geometry g) {
  constexpr int64_t kTargetBlocks = 2048;
  constexpr int64_t kMinElementsPerLane = 8;
  ReducePlan p;
  p.channel_lanes = g.inner == 1 ? 32 : 1;
  p.channel_tiles = (g.channels + p.channel_lanes - 1) / p.channel_lanes;
  const int64_t per_lane_block = int64_t{p.row_lanes()} * kMinElementsPerLane;
  const int64_t per_channel = std::max<int64_t>(g.per_channel(), 1);
  const int64_t by_work = (per_channel + per_lane_block - 1) / per_lane_block;
  const int64_t by_occupancy = std::max<int64_t>(kTargetBlocks / p.channel_tiles, 1);
  p.splits = std::max<int64_t>(1, std::min<int64_t>(std::min(by_work, by_occupancy), 65535));
  return p;
}

// Memory offset of the j-th element (0 <= j < outer*inner) of channel c.
FR_HD int64_t channel_element_offset(Geometry g, int64_t j, int64_t c) {
  if (g.inner == 1) return j * g.channels + c;
  const int64_t n = j / g.inner;
  return (n * g.channels + c) * g.inner + (j - n * g.inner);
}

// What one lane accumulates: acc(State&, offset, channel) over its elements.
template <typename State, typename Acc>
FR_HD State accumulate_lane(Geometry g, const ReducePlan& p, int64_t tile, int64_t split,
                            int lane, const Acc& acc, State state) {
  const int tx = lane % p.channel_lanes;
  const int ty = lane / p.channel_lanes;
  const int64_t c = tile * p.channel_lanes + tx;
  if (c >= g.channels) return state;
  const int64_t m = g.per_channel();
  const int64_t step = p.splits * p.row_lanes();
  for (int64_t j = split * p.row_lanes() + ty; j < m; j += step)
    acc(state, channel_element_offset(g, j, c), c);
  return state;
}

// One step of the block's tree merge over row lanes (strides row_lanes/2, ..., 1, with a
// barrier between steps); afterwards lane tx holds channel tx's result. A step reads lanes
// >= stride and writes lanes < stride, so running the lanes one after another (the CPU
// simulation) gives the same result as running them in parallel.
template <typename State, typename Merge>
FR_HD void merge_lanes_step(State* lanes, int lane, int stride, int channel_lanes,
                            const Merge& merge) {
  if (lane / channel_lanes < stride) merge(lanes[lane], lanes[lane + stride * channel_lanes]);
}

}  // namespace fused_resnet
