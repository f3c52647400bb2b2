#!/bin/bash
# A/B of the NaN-guard change on CPU inference: old build (753ac24, /tmp/wt) vs new (working tree), alternating processes.
out=/tmp/s27/ab_inf; mkdir -p $out
for i in 1 2; do
  for v in old new; do
    if [ $v = old ]; then export PYTHONPATH=/tmp/wt; else unset PYTHONPATH; fi
    (cd /tmp && timeout 600 /work/main/.venv/bin/python -m fused_resnet bench --device cpu --model resnet50 --mode inference --image-size 224 --batch-size 8 --providers eager_cl fused --repeats 15 --out $out/$v-$i > $out/$v-$i.log 2>&1)
    grep "^| fused \|^| eager_cl " $out/$v-$i/report.md | head -2 | sed "s/^/$v-$i /"
  done
done
