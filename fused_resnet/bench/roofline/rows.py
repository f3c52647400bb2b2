"""The rows of the roofline table: which op the fused model runs on every conv in each mode
(inference, training forward, training backward), with its cost and the benchmark row that
times it; and the per-mode totals of a list of rows. Which op runs where follows
fused_resnet.modules (blocks.py, stem.py, conv_bn_act.py) and the ops they call (ops/conv.py,
ops/bn_relu_conv.py, ops/bn_add_relu.py)."""

import dataclasses
import math
from typing import Iterable, NamedTuple, Optional

from fused_resnet.bench.roofline.costs import (
    Cost, Peaks, bn_add_relu_apply_cost, bn_add_relu_backward_cost, bn_relu_apply_cost,
    bn_relu_conv2d_bn_stats_cost, bn_stats_cost, conv2d_bn_stats_cost, conv2d_dual_epilogue_cost,
    conv2d_epilogue_cost, conv_dgrad_cost, conv_wgrad_cost, grad_sum_cost)
from fused_resnet.bench.roofline.shapes import Activation, Block, Conv

INFERENCE, TRAIN_FWD, TRAIN_BWD = "inference", "training forward", "training backward"
TRAIN_STEP = "training step"
MODES = (INFERENCE, TRAIN_FWD, TRAIN_BWD)
FUSED, LIBRARY = "fused", "library"


class BenchTarget(NamedTuple):
    """A benchmark row that times this op (or a superset of it): which suite, its key, its
    mode, what it times (in words) and the floor cost of what it times."""
    kind: str
    key: tuple
    mode: str
    timed: str
    cost: Cost


@dataclasses.dataclass
class Row:
    block: str
    layer: str
    mode: str
    op: str
    shape: str
    cost: Cost
    path: str = FUSED
    target: Optional[BenchTarget] = None
    measured: Optional[dict] = None  # see measured_entry, once a benchmark row matched


def conv_target(conv: Conv, mode: str, e: int) -> BenchTarget:
    """test_bench_conv.py's rows: eval times conv2d_epilogue with a residual on every layer;
    train_fwd times conv2d_bn_stats + BN-apply + residual + ReLU (no grad: no mask)."""
    if mode == "eval":
        return BenchTarget("conv", conv.geometry, mode, "test_bench_conv eval (+ residual)",
                           conv2d_epilogue_cost(conv, e, residual=True))
    return BenchTarget("conv", conv.geometry, mode,
                       "test_bench_conv train_fwd (conv2d_bn_stats + apply + residual)",
                       conv2d_bn_stats_cost(conv, e) + bn_add_relu_apply_cost(
                           conv.output, e, residual=True, relu=True, mask=False))


def dual_target(conv: Conv, shortcut: Conv, e: int) -> BenchTarget:
    """test_bench_conv.py's eval_dual rows, keyed (C_mid, C_out, C_in, stride, input H)."""
    key = (conv.c_in, conv.c_out, shortcut.c_in, shortcut.stride[0], shortcut.height)
    return BenchTarget("dual", key, "eval_dual", "test_bench_conv eval_dual",
                       conv2d_dual_epilogue_cost(conv, shortcut, e))


def bn_add_relu_target(z: Activation, mode: str, e: int) -> BenchTarget:
    """test_bench_bn_add_relu.py's rows (always with a residual): train_fwd times the
    statistics pass + apply (no grad: no mask); train_fwdbwd that with the mask, plus the
    backward."""
    key = (z.channels, z.height, z.width)
    if mode == "train_fwd":
        return BenchTarget("bn_add_relu", key, mode,
                           "test_bench_bn_add_relu train_fwd (stats + apply)",
                           bn_stats_cost(z, e) + bn_add_relu_apply_cost(
                               z, e, residual=True, relu=True, mask=False))
    return BenchTarget("bn_add_relu", key, mode, "test_bench_bn_add_relu train_fwdbwd",
                       bn_stats_cost(z, e)
                       + bn_add_relu_apply_cost(z, e, residual=True, relu=True, mask=True)
                       + bn_add_relu_backward_cost(z, e, relu=True, residual_grad=True))


def _conv_with_stats_rows(block: str, conv: Conv, previous: Optional[Conv], e: int) -> list:
    """The training forward of one conv: conv2d_bn_stats on a tensor, or (previous given)
    bn_relu_conv2d_bn_stats applying the previous BN + ReLU on load; with the library path's
    extra passes (the activation written, the statistics pass)."""
    rows = []
    if previous is None:
        op, cost = "conv2d_bn_stats", conv2d_bn_stats_cost(conv, e)
    else:
        op, cost = "bn_relu_conv2d_bn_stats", bn_relu_conv2d_bn_stats_cost(conv, e)
        rows.append(Row(block, conv.name, TRAIN_FWD, "bn_relu apply, a written",
                        str(previous.output), bn_relu_apply_cost(previous.output, e,
                                                                 mask=False), LIBRARY))
    return rows + [
        Row(block, conv.name, TRAIN_FWD, op, conv.describe(), cost,
            target=conv_target(conv, "train_fwd", e)),
        Row(block, conv.name, TRAIN_FWD, "bn_stats", str(conv.output),
            bn_stats_cost(conv.output, e), LIBRARY)]


def _conv_backward_rows(block: str, conv: Conv, e: int, dgrad: bool = True) -> list:
    rows = [Row(block, conv.name, TRAIN_BWD, "conv dgrad", conv.describe(),
                conv_dgrad_cost(conv, e))] if dgrad else []
    return rows + [Row(block, conv.name, TRAIN_BWD, "conv wgrad", conv.describe(),
                       conv_wgrad_cost(conv, e))]


def stem_rows(conv: Conv, e: int) -> list:
    """FusedStem: relu(bn(conv(x))) by conv_bn_act; the image needs no gradient."""
    z = conv.output
    return [
        Row("stem", conv.name, INFERENCE, "conv2d_epilogue (relu)", conv.describe(),
            conv2d_epilogue_cost(conv, e, residual=False), target=conv_target(conv, "eval", e)),
        *_conv_with_stats_rows("stem", conv, None, e),
        Row("stem", conv.name, TRAIN_FWD, "bn_add_relu apply (relu, mask)", str(z),
            bn_add_relu_apply_cost(z, e, residual=False, relu=True, mask=True)),
        Row("stem", conv.name, TRAIN_BWD, "bn_add_relu backward (relu)", str(z),
            bn_add_relu_backward_cost(z, e, relu=True, residual_grad=False)),
        *_conv_backward_rows("stem", conv, e, dgrad=False),
    ]


def inference_rows(block: Block, e: int) -> list:
    """BN folded: one conv2d_epilogue per conv, the residual and ReLU in the last one's
    epilogue; a bottleneck's projection and conv3 as one conv2d_dual_epilogue."""
    *chain, last = block.convs
    rows = [Row(block.name, c.name, INFERENCE, "conv2d_epilogue (relu)", c.describe(),
                conv2d_epilogue_cost(c, e, residual=False), target=conv_target(c, "eval", e))
            for c in chain]
    s = block.shortcut
    if block.dual:
        return rows + [Row(block.name, f"{last.name} + {s.name}", INFERENCE,
                           "conv2d_dual_epilogue (relu)",
                           f"{last.input} + {s.input}/{s.stride[0]} -> {last.output}",
                           conv2d_dual_epilogue_cost(last, s, e),
                           target=dual_target(last, s, e))]
    if s is not None:  # the projection written, then read as the last conv's residual
        rows.append(Row(block.name, s.name, INFERENCE, "conv2d_epilogue (no relu)",
                        s.describe(), conv2d_epilogue_cost(s, e, residual=False),
                        target=conv_target(s, "eval", e)))
    return rows + [Row(block.name, last.name, INFERENCE, "conv2d_epilogue (residual, relu)",
                       last.describe(), conv2d_epilogue_cost(last, e, residual=True),
                       target=conv_target(last, "eval", e))]


def training_forward_rows(block: Block, e: int) -> list:
    """conv_bn_relu_chain: the shortcut first (its BN applied, no ReLU), then the chain; the
    last BN + residual + ReLU in one apply that keeps the mask for backward."""
    rows = []
    s = block.shortcut
    if s is not None:
        rows += _conv_with_stats_rows(block.name, s, None, e)
        rows.append(Row(block.name, s.name, TRAIN_FWD, "bn_add_relu apply (no relu)",
                        str(s.output), bn_add_relu_apply_cost(s.output, e, residual=False,
                                                              relu=False, mask=False)))
    for previous, conv in zip([None] + block.convs, block.convs):
        rows += _conv_with_stats_rows(block.name, conv, previous, e)
    z = block.convs[-1].output
    return rows + [Row(block.name, block.convs[-1].name, TRAIN_FWD,
                       "bn_add_relu apply (residual, relu, mask)", str(z),
                       bn_add_relu_apply_cost(z, e, residual=True, relu=True, mask=True),
                       target=bn_add_relu_target(z, "train_fwd", e))]


def training_backward_rows(block: Block, e: int) -> list:
    """In autograd's order: the last BN-add-ReLU backward; per later conv the BN + ReLU of
    its input recomputed (with the mask), its dgrad and wgrad, then that BN's backward; the
    first conv's dgrad and wgrad; the shortcut's BN backward and conv backward; the sum of
    the block input's two gradient branches."""
    last = block.convs[-1]
    rows = [Row(block.name, last.name, TRAIN_BWD, "bn_add_relu backward (residual, relu)",
                str(last.output), bn_add_relu_backward_cost(last.output, e, relu=True,
                                                            residual_grad=True),
                target=bn_add_relu_target(last.output, "train_fwdbwd", e))]
    for previous, conv in reversed(list(zip(block.convs, block.convs[1:]))):
        z = previous.output
        rows.append(Row(block.name, conv.name, TRAIN_BWD, "bn_relu recompute (a, mask)",
                        str(z), bn_relu_apply_cost(z, e, mask=True)))
        rows += _conv_backward_rows(block.name, conv, e)
        rows.append(Row(block.name, previous.name, TRAIN_BWD, "bn_add_relu backward (relu)",
                        str(z), bn_add_relu_backward_cost(z, e, relu=True,
                                                          residual_grad=False)))
    rows += _conv_backward_rows(block.name, block.convs[0], e)
    s = block.shortcut
    if s is not None:
        rows.append(Row(block.name, s.name, TRAIN_BWD, "bn_add_relu backward (no relu)",
                        str(s.output), bn_add_relu_backward_cost(s.output, e, relu=False,
                                                                 residual_grad=False)))
        rows += _conv_backward_rows(block.name, s, e)
    x = block.convs[0].input
    return rows + [Row(block.name, block.name, TRAIN_BWD, "grad sum (autograd)", str(x),
                       grad_sum_cost(x, e))]


def block_rows(block: Block, e: int) -> list:
    return inference_rows(block, e) + training_forward_rows(block, e) \
        + training_backward_rows(block, e)


def total_cost(rows: Iterable) -> Cost:
    return sum((row.cost for row in rows), Cost(0, 0))


def summary(rows: list, peaks: Peaks) -> dict:
    """FLOPs, bytes, both aggregate floors, the sum of the ops' floors and the share of that
    sum spent in memory-bound ops."""
    cost = total_cost(rows)
    floors_s = [peaks.floor_seconds(*row.cost) for row in rows]
    # math.fsum: correctly rounded, so the committed tables do not depend on the Python
    # version (3.12's sum() of floats compensates, 3.11's does not)
    memory_bound = math.fsum(f for f, row in zip(floors_s, rows)
                             if peaks.bound(*row.cost) == "memory")
    total = math.fsum(floors_s)
    return {"flops": cost.flops, "bytes": cost.bytes,
            "compute_seconds": peaks.compute_seconds(cost.flops),
            "memory_seconds": peaks.memory_seconds(cost.bytes),
            "aggregate_floor_seconds": peaks.floor_seconds(*cost),
            "floor_seconds": total,
            "memory_bound_share": memory_bound / total if total else 0.0}


def mode_rows(rows: list, mode: str, path: str = FUSED) -> list:
    modes = (TRAIN_FWD, TRAIN_BWD) if mode == TRAIN_STEP else (mode,)
    return [row for row in rows if row.mode in modes and row.path == path]
