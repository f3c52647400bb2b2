"""Roofline table per layer of a torchvision ResNet (ResNet-50 by default): for every fused op
this project runs on every conv (inference, training forward, training backward), its FLOPs,
the fewest bytes it must move, its arithmetic intensity and its time floor
max(FLOPs / peak FLOP/s, bytes / bandwidth); per-block, per-mode and whole-network totals; and,
where benchmark JSON from a matching device is given, the measured time and the fraction of
the floor reached.

    python -m fused_resnet.bench.roofline [--batch-size 256] [--dtype bf16] [--bandwidth 3.0e12]
        [--flops 790e12] [--device-name H100] [--measured JSON ...] [-o out.md] [--json out.json]

One module per job: shapes (the convs and residual blocks of the model), costs (the peaks and
each op's FLOPs and bytes), rows (which op runs on which conv in each mode, following
fused_resnet.modules and the ops they call), measurements (benchmark JSON matched to rows) and
report (build, render, command line). The floors are lower bounds: see ASSUMPTIONS, which the
report repeats in its header. fused_resnet.bench.floors holds the coarser whole-model floors
`fused-resnet bench` reports against; the report shows them next to this table's totals.
"""

# The public names of every part, so `from fused_resnet.bench import roofline` serves them all
from fused_resnet.bench.roofline.costs import (  # noqa: F401
    ASSUMPTIONS, BANDWIDTH, ELEMENT_SIZES, FP32, PEAK_FLOPS, Cost, Peaks,
    bn_add_relu_apply_cost, bn_add_relu_backward_cost, bn_relu_apply_cost,
    bn_relu_conv2d_bn_stats_cost, bn_stats_cost, conv2d_bn_stats_cost, conv2d_dual_epilogue_cost,
    conv2d_epilogue_cost, conv_dgrad_cost, conv_wgrad_cost, grad_sum_cost)
from fused_resnet.bench.roofline.measurements import (  # noqa: F401
    BENCH_DTYPES, Measurement, attach_measurements, block_key, load_measurements,
    measured_entry, usable_measurements)
from fused_resnet.bench.roofline.report import (  # noqa: F401
    NOT_MEASURED, OTHER_BANDWIDTHS, ROW_HEADER, Report, build, command_line, main, parse_args,
    render_json, render_markdown, report_from_args)
from fused_resnet.bench.roofline.rows import (  # noqa: F401
    FUSED, INFERENCE, LIBRARY, MODES, TRAIN_BWD, TRAIN_FWD, TRAIN_STEP, BenchTarget, Row,
    block_rows, bn_add_relu_target, conv_target, dual_target, inference_rows, mode_rows,
    stem_rows, summary, total_cost, training_backward_rows, training_forward_rows)
from fused_resnet.bench.roofline.shapes import (  # noqa: F401
    Activation, Block, Conv, meta_model, residual_blocks, trace_convs)
