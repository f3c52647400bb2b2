#!/usr/bin/env bash
# Everything a lent GPU session should run, in one device call (build, full test suite with the
# GPU cases, compute-sanitizer on the CUDA kernels, benchmarks + report). Run from the repository
# root on the device machine:  bash benchmarks/gpu_session.sh
# Results go to $OUT (or ./gpu-out); the markdown report also to benchmarks/results/.
# The device machine cannot download: carry CUTLASS's headers with the call, prepared here by
#   python3 -c "import cutlass_library, os, shutil; shutil.copytree(os.path.join(
#     os.path.dirname(cutlass_library.__file__), 'source', 'include'), '.cutlass/include')"
# (after pip install --no-deps -r requirements-build.txt; .cutlass/ is git-ignored, ~27 MB)
# and the device tool's carry=[".cutlass"]; without them the CUTLASS kernels are left out.
set -uo pipefail
OUT=${OUT:-gpu-out}
if [ -d .cutlass/include ]; then export FUSED_RESNET_CUTLASS_INCLUDE=$PWD/.cutlass/include; fi
mkdir -p "$OUT"
log() { echo "=== $* ===" | tee -a "$OUT/summary.txt"; }

log "build"
pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1; echo "build rc=$?" | tee -a "$OUT/summary.txt"
python3 -m fused_resnet info | tee "$OUT/info.txt"

log "tests"
python3 -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/summary.txt"; tail -3 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

log "compute-sanitizer"
for tool in memcheck racecheck initcheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 python3 tests/gpu_sanitize.py \
    > "$OUT/sanitizer-$tool.log" 2>&1
  echo "$tool rc=$? $(tail -1 "$OUT/sanitizer-$tool.log")" | tee -a "$OUT/summary.txt"
done

log "benchmarks"
device=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
stamp=$(date -u +%Y-%m-%d)
bench() {  # bench NAME: benchmarks/test_bench_NAME.py -> $OUT/NAME.json and a markdown report
  local name=$1 cmd="pytest benchmarks/test_bench_$1.py --benchmark-json=$OUT/$1.json"
  python3 -m pytest "benchmarks/test_bench_$name.py" -q -p no:cacheprovider \
    --benchmark-json="$OUT/$name.json" > "$OUT/bench-$name.log" 2>&1
  echo "bench $name rc=$?" | tee -a "$OUT/summary.txt"
  python3 benchmarks/report.py "$OUT/$name.json" --command "$cmd" \
    -o "benchmarks/results/$name-$device-$stamp.md" --plot "$OUT/$name-$device-$stamp.png"
  cp "benchmarks/results/$name-$device-$stamp.md" "$OUT/"
}
bench bn_add_relu
bench conv
bench blocks
log "fused-resnet bench (the README's main job: resnet50, bf16, batch 256)"
timeout 580 python3 -m fused_resnet bench --out "$OUT/bench-$device-$stamp" > "$OUT/bench-cli.log" 2>&1
echo "fused-resnet bench rc=$?" | tee -a "$OUT/summary.txt"; tail -40 "$OUT/bench-cli.log"
cat "$OUT/summary.txt"
cat "benchmarks/results/bn_add_relu-$device-$stamp.md" "benchmarks/results/conv-$device-$stamp.md"
