#!/usr/bin/env bash
# A GPU visit in calls that each fit a lent machine's limits (docs/gpu.md: "GPU session").
#
#   bash benchmarks/gpu_session.sh [--dry-run] [--budget S] CALL|PHASE...
#
# A visit is two calls of the device tool (15 device-minutes in all: machine start, idle time
# and every command counted), each under 7 minutes, results in $OUT as they are produced:
#   call1   env build check test_first
#   call2   build model caches          (send it at once: the machine stays warm 30 s)
# A later visit runs the rest, a phase per call: sanitize, ops, test.
# Phases:
#   env        versions, nvidia-smi, device nodes, what torch sees
#   build      rebuild _C (sm_90 only, MAX_JOBS = all cores) unless the installed _C carries
#              this tree's source stamp; then `fused-resnet info` must show cuda_ext,
#              cutlass_conv and triton usable, else the call STOPS (no later phase runs)
#   check      benchmarks/gpu_check.py: every kernel the dispatcher can pick (BN pieces of both
#              backends, every CUTLASS and Triton conv variant and tile config ResNet-50 bf16/fp16
#              uses, train and eval) against a float64 reference, on edge-tile and batch-256
#              layer shapes, a local (per 64x32 block) comparison; one JSON line per check
#   test_first the GPU tests that matter most (TEST_FIRST), a timeout per test, junit XML
#   test       the other GPU tests (pytest -m gpu), likewise
#   sanitize   compute-sanitizer memcheck + racecheck on tests/gpu_sanitize.py
#   ops        benchmarks/test_bench_{bn_add_relu,conv,blocks}.py + benchmarks/report.py, and the
#              roofline table (python -m fused_resnet.bench.roofline) with the measured times
#   model      fused-resnet bench: resnet50, bf16, batch 256, inference then training,
#              providers eager_cl fused compile (fused before compile: a cut loses compile);
#              results.json rewritten after every row
#   caches     the tuning choices ($FUSED_RESNET_CACHE_DIR) and the Triton cache
#              ($TRITON_CACHE_DIR) as caches-TAG.tar.gz, for a later visit to carry
#   all        every phase, in the order above
# A GPU test phase fails when its junit XML shows a test skipped for want of a GPU, or none
# ran (benchmarks/gpu_junit.py), whatever pytest says.
#
# Time: a call stops itself within the sum of its phases' estimates (EST_* below; call1 370 s,
# call2 320 s); each phase within its estimate (the last one of a call: what is left). A step
# that would overrun is interrupted (SIGINT: pytest still writes its XML) and says "timeout".
# --budget S: the last line printed is "plan: N calls, estimated T s of S" (a visit: machine
# start, transfers, call1, the idle gap, call2, give-back); the exit status is 1 if T > S.
# Without a CALL or PHASE, --budget runs call1 and call2.
#
# $OUT (default ./gpu-out; the device tool returns at most 8 files, 2 folders down):
#   summary.txt   one line per phase: "PHASE: ok|failed|timeout|skipped (...) - detail"
#   PHASE.log     everything the phase ran and printed
#   gpu-check.jsonl                        check: one JSON line per check, as it finishes
#   test_first-junit.xml, test-junit.xml   the test phases' results
#   bench-inference/, bench-training/      model: results.json (every row, as measured) and
#                                          report.md
#   caches-TAG.tar.gz                      caches: untar into .gpu-cache/ here and carry it
#   report-TAG.md, results-TAG.tar.gz      ops: the reports, laid out for benchmarks/results/
# Exit status: 0 if every phase is ok or skipped, 1 otherwise, 2 for a usage error.
#
# --dry-run (or DRY_RUN=1): on a CPU (CUDA hidden), the same code paths at tiny sizes; GPU-only
# steps are reported as "skipped (no GPU)" (tests/test_gpu_session.py runs it in CI).
#
# The device machine cannot download: carry CUTLASS's headers with the call, prepared here by
#   python3 -c "import cutlass_library, os, shutil; shutil.copytree(os.path.join(
#     os.path.dirname(cutlass_library.__file__), 'source', 'include'), '.cutlass/include')"
# (after pip install --no-deps -r requirements-build.txt; .cutlass/ is git-ignored, ~27 MB)
# and the device tool's carry=[".cutlass"]; without them the build phase fails. Caches from
# an earlier visit: .gpu-cache/caches-*.tar.gz (git-ignored; carry=[".cutlass", ".gpu-cache"]).
#
# Knobs (environment): OUT, PYTHON (default python3), DRY_RUN, SESSION_S, PHASE_S (without a
# CALL: 560 and 460), TEST_TIMEOUT_S (per test, default 120), BENCH_TIMEOUT_S (per benchmark,
# default 300), CHECK_JOBS (default 8), OPS_SUITES (default "bn_add_relu conv blocks"),
# TEST_FIRST, SANITIZE_PARTS (tests/gpu_sanitize.py --parts, e.g. "cutlass,triton"),
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS, GPU_CACHE_DIR.
set -uo pipefail

# ------------------------------------------------------------------------------- estimates
# Seconds each step of a visit is expected to take on a fresh H200 machine, [basis]. They are
# also the phases' time caps within a call. Not yet measured on GPU: correct them from the
# "[N s]" each summary line ends with.
EST_START=120      # a machine's start [device README: "a minute or more"; briefs: 1-2 min]
EST_TRANSFER=15    # the tree + .cutlass (~30 MB) there and $OUT back [guess]
EST_GAP=30         # idle between call1's end and call2 [the machine stays warm 30 s]
EST_RELEASE=10     # give-back after call2 [guess]
EST_BUILD_WARM=10  # build in call2, on the machine call1 built on: the stamp matches, no rebuild
declare -A EST=(
  [env]=10          # a few version queries and nvidia-smi
  [build]=130       # _C with CUDA + CUTLASS for sm_90: 1.5 min on 2 cores (ARCHITECTURE.md,
                    # 2026-12-01); 16 cores: the largest CUTLASS unit bounds it; + pip, info
  [check]=130       # gpu_check.py's own time limit (110 s) + start-up and the last checks
  [test_first]=100  # what is left of call1: TEST_FIRST's GPU tests, ~1-5 s each
  [model]=300       # bench: inference 130 (eager_cl 10, fused 40 with call1's Triton cache,
                    # compile 2 x 40: check batch, then batch 256), training 170 (compile
                    # 2 x 60 with backward) [guess: compile times seen elsewhere]
  [caches]=10       # tar of a few MB
  [test]=460 [sanitize]=460 [ops]=460   # later visits: a call each
)
declare -A CALLS=([call1]="env build check test_first" [call2]="build model caches")
VISIT=(call1 call2)
WARM_CALLS=" call2 "       # calls that find the previous call's machine (and its _C)
MODEL_INFERENCE_SHARE=43   # percent of the model phase for inference (130 of 300)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-120}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-300}
CHECK_JOBS=${CHECK_JOBS:-8}
OPS_SUITES=${OPS_SUITES:-bn_add_relu conv blocks}
# pytest node ids (prefixes): end-to-end, autograd, NaN, graphs first (~90 tests); gpu_check
# already runs each kernel alone, so the large per-shape sweeps wait for the test phase
TEST_FIRST=${TEST_FIRST:-tests/test_fuse.py tests/test_reliability_nan.py tests/test_bn_relu_conv.py tests/test_conv_ops.py::test_training_chain_cuda tests/test_bn_add_relu.py::test_variants_cuda tests/test_devices.py}
MIN_STEP_S=15    # a step with less time left than this is not started
REPORT_S=30      # kept back in the ops phase for rendering and packing results
ALL_PHASES=(env build check test_first test sanitize ops model caches)

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

wanted=" " BUDGET="" CALL_MODE=0 CALL_NAMES=()
while (( $# )); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --budget) BUDGET=${2:-}; shift
      [[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_session.sh: --budget needs seconds" >&2; exit 2; } ;;
    -h|--help) usage; exit 0 ;;
    all) wanted+="${ALL_PHASES[*]} " ;;
    call1|call2) wanted+="${CALLS[$1]} " CALL_MODE=1 CALL_NAMES+=("$1") ;;
    env|build|check|test_first|test|sanitize|ops|model|caches) wanted+="$1 " ;;
    *) echo "gpu_session.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [[ $wanted == " " && -n $BUDGET ]]; then
  for call in "${VISIT[@]}"; do wanted+="${CALLS[$call]} "; done
  CALL_MODE=1 CALL_NAMES=("${VISIT[@]}")
fi
PHASES=()
for phase in "${ALL_PHASES[@]}"; do  # canonical order, each once
  [[ $wanted == *" $phase "* ]] && PHASES+=("$phase")
done
if (( ${#PHASES[@]} == 0 )); then usage >&2; exit 2; fi

# call_estimate CALL: its phases' estimated seconds (a warm call's build finds _C built)
call_estimate() {
  local total=0 phase
  for phase in ${CALLS[$1]}; do
    if [[ $phase == build && $WARM_CALLS == *" $1 "* ]]; then
      total=$((total + EST_BUILD_WARM))
    else
      total=$((total + EST[$phase]))
    fi
  done
  echo $total
}
# visit_estimate: a fresh machine, call1, the idle gap, call2 (warm), the give-back
visit_estimate() {
  local total=$((EST_START + EST_GAP + EST_RELEASE)) call
  for call in "${VISIT[@]}"; do total=$((total + EST_TRANSFER + $(call_estimate "$call"))); done
  echo $total
}

if (( CALL_MODE )); then  # the calls' own caps: the sum of their estimates (and of any
  cap=0 in_calls=" "      # phase named beside them)
  for call in "${CALL_NAMES[@]}"; do
    cap=$((cap + $(call_estimate "$call"))) in_calls+="${CALLS[$call]} "
  done
  for phase in "${PHASES[@]}"; do
    [[ $in_calls == *" $phase "* ]] || cap=$((cap + EST[$phase]))
  done
  SESSION_S=${SESSION_S:-$cap}
else
  SESSION_S=${SESSION_S:-560}
fi
PHASE_S_DEFAULT=${PHASE_S:-460}

OUT=${OUT:-gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/results   # results laid out for benchmarks/results/, packed into $OUT
mkdir -p "$STAGE"
SUMMARY=$OUT/summary.txt
if (( DRY_RUN )); then
  export CUDA_VISIBLE_DEVICES=""   # a dry run behaves as on a CPU machine, GPU or not
fi
if [[ -z ${FUSED_RESNET_CUTLASS_INCLUDE:-} && -d $ROOT/.cutlass/include ]]; then
  export FUSED_RESNET_CUTLASS_INCLUDE=$ROOT/.cutlass/include
fi
# Triton's compiled kernels and the tuning choices: in one place that outlives a call on the
# same machine (call1's check compiles what call2's bench runs), seeded from a carried tarball
CACHE_ROOT=${GPU_CACHE_DIR:-$( ((DRY_RUN)) && echo "$WORK/cache" || echo /tmp/fused_resnet_gpu_cache)}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE_ROOT/triton}
export FUSED_RESNET_CACHE_DIR=${FUSED_RESNET_CACHE_DIR:-$CACHE_ROOT/tuning}
mkdir -p "$TRITON_CACHE_DIR" "$FUSED_RESNET_CACHE_DIR"
for carried in "$ROOT"/.gpu-cache/caches-*.tar.gz; do
  [[ -f $carried && ! -e $CACHE_ROOT/.seeded ]] || continue
  tar -xzf "$carried" -C "$CACHE_ROOT" 2>/dev/null && touch "$CACHE_ROOT/.seeded"
done
export PYTHONUNBUFFERED=1
START=$SECONDS
EXIT=0
RESULT_TAG=""

# ---------------------------------------------------------------------------------- helpers
note() { echo "$*" | tee -a "$SUMMARY"; }

# summary PHASE STATUS DETAIL: the phase's line in summary.txt (and on stdout)
summary() {
  local phase=$1 status=$2 detail=$3
  note "$phase: $status - $detail [$((SECONDS - PHASE_START)) s]"
  case $status in ok|"skipped (no GPU)") ;; *) EXIT=1 ;; esac
}

# time_left CAP: seconds a step may run: CAP, within the phase's and the session's budgets
time_left() {
  local left=$1 phase=$((PHASE_START + PHASE_S - SECONDS)) session=$((START + SESSION_S - SECONDS))
  (( phase < left )) && left=$phase
  (( session < left )) && left=$session
  echo $((left - 5))
}

# run_step LOG CAP CMD...: run CMD in $WORK (so python imports the installed package, not the
# source tree) with a time limit; output appended to LOG. Sets STEP_RC (124: timed out, 125:
# not started, no time left) and STEP_STATUS (ok, failed, timeout, skipped (no time left)).
run_step() {
  local log=$1 cap=$2 limit start
  shift 2
  limit=$(time_left "$cap")
  if (( limit < MIN_STEP_S )); then
    echo "### not run (${limit} s left): $*" >> "$log"
    STEP_RC=125 STEP_STATUS="skipped (no time left)"
    return
  fi
  echo "### $(date -u +%H:%M:%S) (limit ${limit} s): $*" >> "$log"
  start=$SECONDS
  (cd "$WORK" && timeout -s INT -k 20 "$limit" "$@") >> "$log" 2>&1
  STEP_RC=$?
  case $STEP_RC in
    0) STEP_STATUS=ok ;;
    124|137) STEP_RC=124 STEP_STATUS=timeout ;;
    *) STEP_STATUS=failed ;;
  esac
  echo "### rc=$STEP_RC ($STEP_STATUS) after $((SECONDS - start)) s" >> "$log"
}

# run_pytest LOG CAP PYTEST-ARGS...: run_step for pytest. It stops between tests before the
# limit (pytest-timeout's --session-timeout), so its junit XML / benchmark JSON is written;
# a session cut short has STEP_STATUS timeout.
run_pytest() {
  local log=$1 limit margin stop mark
  limit=$(time_left "$2")
  shift 2
  # no test starts after `stop`: a sixth of the limit (15 to 60 s) is left for the last one
  margin=$((limit / 6))
  (( margin < 15 )) && margin=15
  (( margin > 60 )) && margin=60
  stop=$((limit - margin))
  mark=$(stat -c %s "$log" 2>/dev/null || echo 0)
  run_step "$log" $((limit + 5)) "$PY" -m pytest -p no:cacheprovider $(timeout_options "$stop") "$@"
  if [[ $STEP_STATUS == failed ]] &&
      tail -c +$((mark + 1)) "$log" | grep -q "session-timeout: .* exceeded"; then
    STEP_STATUS=timeout
  fi
}

# timeout_options STOP_S: pytest-timeout's options, as far as the installed version has them
# (--session-timeout: 2.3 and later; none at all without the plugin: the limit still holds)
TIMEOUT_PLUGIN=$("$PY" -c 'import pytest_timeout as p
print("session" if "session_timeout" in open(p.__file__).read() else "test")' 2>/dev/null)
timeout_options() {
  case $TIMEOUT_PLUGIN in
    session) echo "--timeout=$PER_TEST_S --timeout-method=signal --session-timeout=$1" ;;
    test) echo "--timeout=$PER_TEST_S --timeout-method=signal" ;;
  esac
}

join_by() {  # join_by SEPARATOR WORD...
  local sep=$1 out=$2
  shift 2
  for word in "$@"; do out+="$sep$word"; done
  echo "$out"
}

# worst STATUS...: the worst of several step statuses
worst() {
  local s result=ok
  for s in "$@"; do
    case $s in
      failed) result=failed ;;
      timeout|"skipped (no time left)") [[ $result == failed ]] || result=timeout ;;
      skipped*) [[ $result == ok ]] && result=$s ;;
    esac
  done
  echo "$result"
}

# cap_file FILE: keep a file under the device tool's 16 MiB (head and tail of a huge log)
cap_file() {
  local f=$1 max=$((15 * 1024 * 1024))
  [[ -f $f ]] && (( $(stat -c %s "$f") > max )) || return 0
  { head -c $((2 * 1024 * 1024)) "$f"; printf '\n[... cut to fit 16 MiB ...]\n'
    tail -c $((12 * 1024 * 1024)) "$f"; } > "$f.cut" && mv "$f.cut" "$f"
}

# pytest_tally LOG: pytest's final "N passed, M skipped ..." line
pytest_tally() {
  grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)' "$1" | tail -1 |
    sed -E 's/=+//g; s/^ +| +$//g'
}

# set_tag: RESULT_TAG="DEVICE-DATE" names the results, e.g. NVIDIA-H200-2026-11-24 (dry run:
# dryrun-cpu-2cores-2026-11-24)
set_tag() {
  [[ -n ${RESULT_TAG} ]] && return
  local device
  if (( DRY_RUN )); then
    device="dryrun-cpu-$(nproc)cores"
  else
    device=$(cd "$WORK" && "$PY" -c "import torch; print(torch.cuda.get_device_name(0) \
      if torch.cuda.is_available() else 'cpu')" 2>/dev/null | tail -1)
    device=$(echo "${device:-unknown}" | tr ' ' '-' | tr -cd 'A-Za-z0-9.-')
  fi
  RESULT_TAG=$device-$(date -u +%Y-%m-%d)
}

# publish: the staged results into $OUT as one markdown report and one tarball (atomically)
publish() {
  local tag=$RESULT_TAG md files
  md=$OUT/report-$tag.md
  {
    echo "# GPU session results: $tag"
    echo
    echo "\`bash benchmarks/gpu_session.sh\` ($( ((DRY_RUN)) && echo 'dry run, ')tree stamp $TREE_STAMP)"
    for f in "$STAGE"/*-"$tag".md "$STAGE"/bench-"$tag"/report.md; do  # roofline-TAG.md too
      if [[ -f $f ]]; then echo; cat "$f"; fi
    done
  } > "$md.tmp" && mv "$md.tmp" "$md"
  files=$(cd "$STAGE" && ls -d -- *"$tag"* 2>/dev/null)
  if [[ -n $files ]]; then
    (cd "$STAGE" && tar -czf "$OUT/results-$tag.tar.gz.tmp" $files) &&
      mv "$OUT/results-$tag.tar.gz.tmp" "$OUT/results-$tag.tar.gz"
  fi
}

# roofline LOG: the per-layer roofline table (fused_resnet.bench.roofline) with what this
# session measured so far filled in: $STAGE/roofline-TAG.md, rendered into the report
roofline() {
  local log=$1 name bandwidth measured=()
  name=$(cd "$WORK" && "$PY" -c "import torch; print(torch.cuda.get_device_name(0) \
    if torch.cuda.is_available() else 'cpu')" 2>/dev/null | tail -1)
  case $name in *H200*) bandwidth=4.3e12 ;; *) bandwidth=3.0e12 ;; esac  # measured copy rates
  measured=("$STAGE"/*-"$RESULT_TAG".json "$STAGE"/bench-"$RESULT_TAG"/results.json)
  run_step "$log" 60 "$PY" -m fused_resnet.bench.roofline --device-name "${name:-cpu}" \
    --bandwidth "$bandwidth" --measured $(ls "${measured[@]}" 2>/dev/null) \
    -o "$STAGE/roofline-$RESULT_TAG.md"
}

# info_json FILE: `fused-resnet info --json` of the installed package ({} if it fails)
info_json() {
  (cd "$WORK" && "$PY" -m fused_resnet info --json) > "$1" 2>> "$OUT/build.log" || echo '{}' > "$1"
  "$PY" -c 'import json, sys; json.load(open(sys.argv[1]))' "$1" 2>/dev/null || echo '{}' > "$1"
}

json_get() {  # json_get FILE EXPRESSION-over-d
  "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1" 2>/dev/null
}

# ----------------------------------------------------------------------------------- phases
BUILT=0          # the build phase ran in this invocation
BUILD_BROKEN=0   # the build itself failed: the other phases would test a stale _C
TREE_STAMP=$("$PY" "$ROOT/fused_resnet/_build_stamp.py" "$ROOT") || TREE_STAMP=unknown

phase_build() {
  BUILT=1
  local log=$OUT/build.log info=$WORK/info.json installed detail status=ok
  info_json "$info"
  installed=$(json_get "$info" 'd.get("extension_source_stamp") or ""')
  if [[ -n $installed && $installed == "$TREE_STAMP" ]]; then
    detail="build skipped: installed _C is from this tree (stamp $TREE_STAMP)"
  elif (( DRY_RUN )); then
    detail="would rebuild (dry run, not built): installed _C stamp ${installed:-none}, tree stamp $TREE_STAMP"
  else
    [[ -n ${FUSED_RESNET_CUTLASS_INCLUDE:-} ]] ||
      echo "### warning: no .cutlass/include (see this script's header): no CUTLASS kernels" >> "$log"
    run_step "$log" "$PHASE_S" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
      MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e "$ROOT"
    if [[ $STEP_STATUS != ok ]]; then
      BUILD_BROKEN=1
      cap_file "$log"
      summary build "$STEP_STATUS" "rebuild of _C (installed stamp ${installed:-none}, tree $TREE_STAMP): pip install $STEP_STATUS (rc $STEP_RC), see build.log"
      return
    fi
    info_json "$info"
    installed=$(json_get "$info" 'd.get("extension_source_stamp") or ""')
    detail="rebuilt _C (stamp $TREE_STAMP)"
    if [[ $installed != "$TREE_STAMP" ]]; then
      BUILD_BROKEN=1 status=failed
      detail+=", but the installed _C carries stamp '${installed:-none}' (another install shadows it?)"
    fi
  fi
  { echo "### fused-resnet info --json"; cat "$info"; echo; } >> "$log"
  # cuda_ext, cutlass_conv and triton must be usable; a GPU run fails loudly if not
  local verdict
  verdict=$(json_get "$info" '"; ".join(
      f"{n}: " + ("usable" if d["backends"][n]["usable"] else "NOT usable (" +
                  d["backends"][n].get("reason", "?") + ")")
      for n in ("cuda_ext", "cutlass_conv", "triton"))')
  [[ -n $verdict ]] || verdict="fused-resnet info failed (see build.log)"
  if (( DRY_RUN )); then
    detail+="; GPU check skipped (no GPU): $verdict"
  elif [[ $verdict == *"NOT usable"* || $verdict == *failed* ]]; then
    # every later phase would test the fallbacks, or skip: stop the call here, loudly
    status=failed BUILD_BROKEN=1
    detail="STOP: a GPU backend is not usable, no later phase runs; $detail; $verdict"
    echo "gpu_session.sh: STOP: $verdict" >&2
  else
    detail+="; $verdict"
  fi
  cap_file "$log"
  summary build "$status" "$detail"
}

phase_env() {
  local log=$OUT/env.log status=ok seen smi nodes
  {
    echo "### $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -srm), $(nproc) cores"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|torchvision|numpy|pytest|nvidia-cudnn)[ -]'
    command -v nvcc >/dev/null && nvcc --version | tail -2
    echo "### nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo "### device nodes"; ls -l /dev/nvidia* 2>&1
  } >> "$log" 2>&1
  seen=$(cd "$WORK" && "$PY" - 2>> "$log" <<'PYTHON'
import platform, torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:  # noqa: BLE001
    tv = f"not importable ({exc})"
gpu = (f"{torch.cuda.get_device_name(0)}, sm_{''.join(map(str, torch.cuda.get_device_capability(0)))}"
       if torch.cuda.is_available() else "none")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {tv}; torch.cuda.is_available(): {torch.cuda.is_available()} (GPU: {gpu})")
PYTHON
)
  echo "$seen" >> "$log"
  smi=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
  nodes=$(ls /dev/nvidia* 2>/dev/null | tr '\n' ' ')
  if [[ -z $seen ]]; then
    status=failed seen="python could not import torch"
  elif (( ! DRY_RUN )) && [[ $seen != *"is_available(): True"* ]]; then
    status=failed   # the build phase then stops the call
  fi
  summary env "$status" "$seen; nvidia-smi: ${smi:-none}; device nodes: ${nodes:-none}"
}

phase_check() {
  local log=$OUT/check.log args limit result status
  # no check starts in the last 20 s, so the ones running can finish within the cap
  limit=$(( $(time_left "$PHASE_S") - 20 ))
  args=(--out "$OUT/gpu-check.jsonl" --time-limit "$limit")
  if (( DRY_RUN )); then
    args+=(--dry-run --jobs 1)
  else
    args+=(--jobs "$CHECK_JOBS")
  fi
  run_step "$log" "$PHASE_S" "$PY" "$ROOT/benchmarks/gpu_check.py" "${args[@]}"
  result=$(grep -E '^gpu_check: ' "$log" | tail -1)
  case $STEP_RC in
    0) status=ok ;;
    3) status=timeout ;;   # some checks not run: the time limit
    124) status=timeout ;;
    *) status=failed ;;
  esac
  cap_file "$log"
  summary check "$status" "${result#gpu_check: }$( ((DRY_RUN)) && echo ' (dry run: CPU, interpreter, tiny sizes)') (gpu-check.jsonl; failures in check.log)"
}

# gpu_tests PHASE PYTEST-TARGETS...: the GPU-marked tests of the targets, junit XML, and the
# verdict of benchmarks/gpu_junit.py (a test skipped for want of a GPU fails the phase)
gpu_tests() {
  local phase=$1 log=$OUT/$1.log junit=$OUT/$1-junit.xml tally status seen
  shift
  PER_TEST_S=$TEST_TIMEOUT_S run_pytest "$log" "$PHASE_S" "$@" -m gpu -q -rfE \
    --durations=20 --junitxml="$junit"
  tally=$(pytest_tally "$log")
  status=$STEP_STATUS
  seen=$("$PY" "$ROOT/benchmarks/gpu_junit.py" "$junit" 2>&1 | tail -1)
  echo "### $seen" >> "$log"
  if [[ $STEP_RC == 5 ]]; then
    status=failed tally="no GPU tests collected"
  elif (( DRY_RUN )); then
    [[ $status == ok && $tally != *passed* ]] && status="skipped (no GPU)" \
      tally="collected, all skipped: $tally"
  elif [[ $seen != "gpu_junit: "*" GPU tests ran, "* ]]; then
    status=failed   # skipped for want of a GPU, or none ran: nothing was tested
  fi
  cap_file "$log"
  summary "$phase" "$status" "pytest -m gpu: ${tally:-no result}; ${seen#gpu_junit: } (junit: $phase-junit.xml)"
}

phase_test_first() {
  local targets=() t
  for t in $TEST_FIRST; do targets+=("$ROOT/$t"); done
  gpu_tests test_first "${targets[@]}"
}

phase_test() {  # the GPU tests outside TEST_FIRST
  local skip=() t
  for t in $TEST_FIRST; do skip+=(--deselect="$t"); done
  gpu_tests test "$ROOT/tests" "${skip[@]}"
}

phase_sanitize() {
  local log=$OUT/sanitize.log script=$ROOT/tests/gpu_sanitize.py
  if (( DRY_RUN )); then
    run_step "$log" 120 "$PY" "$script" --dry-run ${SANITIZE_PARTS:+--parts "$SANITIZE_PARTS"}
    local result
    result=$(grep -E '^gpu_sanitize: [0-9]+ mismatches' "$log" | tail -1)
    if [[ $STEP_STATUS == ok ]]; then
      summary sanitize "skipped (no GPU)" "compute-sanitizer not run; the case list on CPU: ${result#gpu_sanitize: }"
    else
      summary sanitize "$STEP_STATUS" "gpu_sanitize.py --dry-run: ${result:-rc $STEP_RC}, see sanitize.log"
    fi
    return
  fi
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null)
  if [[ -z $sanitizer ]]; then
    summary sanitize failed "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"
    return
  fi
  local tool cap statuses=() details=() errors checks mark
  for tool in memcheck racecheck; do
    # memcheck first, with half of what is left; racecheck gets the rest
    if [[ $tool == memcheck ]]; then
      cap=$(( (PHASE_START + PHASE_S - SECONDS) / 2 ))
    else
      cap=$PHASE_S
    fi
    echo "########## compute-sanitizer --tool $tool" >> "$log"
    mark=$(stat -c %s "$log")
    # no caching allocator: every tensor its own allocation, so memcheck sees overruns
    run_step "$log" "$cap" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" \
      --error-exitcode 9 --print-limit 50 "$PY" "$script" ${SANITIZE_PARTS:+--parts "$SANITIZE_PARTS"}
    errors=$(tail -c +$((mark + 1)) "$log" | grep -E 'ERROR SUMMARY' | tail -1 |
      sed -E 's/.*ERROR SUMMARY: *//')
    checks=$(tail -c +$((mark + 1)) "$log" | grep -E '^gpu_sanitize: [0-9]+ mismatches' |
      tail -1 | sed 's/^gpu_sanitize: //')
    statuses+=("$STEP_STATUS")
    details+=("$tool $STEP_STATUS (rc $STEP_RC; sanitizer: ${errors:-no summary}; ${checks:-no result})")
    cap_file "$log"
  done
  summary sanitize "$(worst "${statuses[@]}")" "$(join_by "; " "${details[@]}")"
}

phase_ops() {
  local log=$OUT/ops.log tag suite json cap statuses=() details=() rows filter=()
  set_tag
  tag=$RESULT_TAG
  if (( DRY_RUN )); then
    export FUSED_RESNET_BENCH_TINY=1
    filter=(-k "not compiled")   # torch.compile takes minutes on 2 cores: not in a dry run
  fi
  local suites=($OPS_SUITES) i=0
  for suite in "${suites[@]}"; do
    i=$((i + 1))
    json=$STAGE/$suite-$tag.json
    # an even share of what is left to each remaining suite
    cap=$(( (PHASE_START + PHASE_S - SECONDS - REPORT_S) / (${#suites[@]} - i + 1) ))
    PER_TEST_S=$BENCH_TIMEOUT_S run_pytest "$log" "$cap" "$ROOT/benchmarks/test_bench_$suite.py" \
      -q --benchmark-json="$json" "${filter[@]}"
    local status=$STEP_STATUS
    rows=$(json_get "$json" 'len(d["benchmarks"])')
    if [[ -n $rows ]]; then
      run_step "$log" 60 "$PY" "$ROOT/benchmarks/report.py" \
        "$json" -o "$STAGE/$suite-$tag.md" --plot "$STAGE/$suite-$tag.png" \
        --command "pytest benchmarks/test_bench_$suite.py --benchmark-json=$suite-$tag.json"
      [[ $STEP_STATUS == ok ]] || status=failed
      publish
    fi
    statuses+=("$status")
    details+=("$suite $status (${rows:-no} rows)")
  done
  unset FUSED_RESNET_BENCH_TINY
  roofline "$log"
  [[ $STEP_STATUS == ok ]] || { statuses+=(failed); details+=("roofline table failed"); }
  publish
  cap_file "$log"
  summary ops "$(worst "${statuses[@]}")" \
    "$(join_by "; " "${details[@]}"); report-$tag.md, results-$tag.tar.gz"
}

phase_model() {
  local log=$OUT/model.log args mode cap share statuses=() details=() rows
  if (( DRY_RUN )); then
    args=(--model resnet18 --dtype fp32 --batch-size 2 --image-size 32 --device cpu
          --providers eager_cl fused --warmup 1 --repeats 2 --iters 1 --check-batch 2)
  else
    args=(--model resnet50 --dtype bf16 --batch-size 256 --providers eager_cl fused compile)
  fi
  # one run per mode, inference first, straight into $OUT: results.json is rewritten after
  # every row, so a cut keeps every row measured before it
  for mode in inference training; do
    share=$( [[ $mode == inference ]] && echo "$MODEL_INFERENCE_SHARE" || echo 100 )
    cap=$(( (PHASE_START + PHASE_S - SECONDS) * share / 100 ))
    run_step "$log" "$cap" "$PY" -m fused_resnet bench "${args[@]}" --mode "$mode" --no-plots \
      --out "$OUT/bench-$mode"
    rows=$(json_get "$OUT/bench-$mode/results.json" \
      '", ".join(r["provider"] + " " + r["status"] for r in d["rows"])')
    statuses+=("$STEP_STATUS")
    details+=("$mode $STEP_STATUS (${rows:-no rows})")
  done
  cap_file "$log"
  summary model "$(worst "${statuses[@]}")" \
    "fused-resnet bench ${args[*]}: $(join_by "; " "${details[@]}"); bench-inference/, bench-training/"
}

phase_caches() {
  local log=$WORK/caches.log tar size max=$((15 * 1024 * 1024)) what
  set_tag
  tar=$OUT/caches-$RESULT_TAG.tar.gz
  what="tuning/ ($(find "$FUSED_RESNET_CACHE_DIR" -type f | wc -l) files), triton/ ($(find "$TRITON_CACHE_DIR" -type f | wc -l) files)"
  run_step "$log" "$PHASE_S" tar -czf "$tar.tmp" -C "$(dirname "$FUSED_RESNET_CACHE_DIR")" \
    "$(basename "$FUSED_RESNET_CACHE_DIR")" -C "$(dirname "$TRITON_CACHE_DIR")" \
    "$(basename "$TRITON_CACHE_DIR")"
  size=$(stat -c %s "$tar.tmp" 2>/dev/null || echo 0)
  if [[ $STEP_STATUS == ok ]] && (( size > max )); then  # the device tool returns 16 MiB
    what="tuning/ only: the Triton cache made $((size / 1048576)) MiB"
    run_step "$log" 60 tar -czf "$tar.tmp" -C "$(dirname "$FUSED_RESNET_CACHE_DIR")" \
      "$(basename "$FUSED_RESNET_CACHE_DIR")"
  fi
  [[ $STEP_STATUS == ok ]] && mv "$tar.tmp" "$tar"
  [[ $STEP_STATUS == ok ]] || what+="; tar: $(tail -2 "$log" | tr '\n' ' ')"
  summary caches "$STEP_STATUS" "$(basename "$tar"): $what (a later visit: put it in .gpu-cache/ and carry .gpu-cache)"
}

# ------------------------------------------------------------------------------------- main
note "# $(date -u +%Y-%m-%dT%H:%M:%SZ) gpu_session.sh ${PHASES[*]}$( ((DRY_RUN)) && echo ' --dry-run') on ${HOSTNAME:-$(uname -n)} ($(nproc) cores), tree stamp $TREE_STAMP, within $SESSION_S s"
last=${PHASES[${#PHASES[@]}-1]}
for i in "${!PHASES[@]}"; do
  phase=${PHASES[$i]}
  PHASE_START=$SECONDS
  if (( CALL_MODE )); then  # its estimate, less what the phases after it need (a rebuild on
    PHASE_S=${EST[$phase]}  # a fresh machine shortens the bench, not the caches); the last
    later=0                 # phase: what is left
    for next in "${PHASES[@]:i+1}"; do later=$((later + EST[$next])); done
    left=$((START + SESSION_S - SECONDS))
    # (never the build's: every later phase needs it)
    [[ $phase != build ]] && (( left - later < PHASE_S )) && PHASE_S=$((left - later))
    [[ $phase == "$last" ]] && PHASE_S=$left
  else
    PHASE_S=$PHASE_S_DEFAULT
  fi
  if (( SECONDS - START > SESSION_S - 2 * MIN_STEP_S )); then
    summary "$phase" "skipped (no time left)" "the invocation's $SESSION_S s are spent"
    continue
  fi
  case $phase in env|build|caches) ;; *)
    (( BUILT )) || phase_build   # counts against this phase's time
    if (( BUILD_BROKEN )); then
      summary "$phase" failed "not run: the build failed or a GPU backend is not usable (see build.log)"
      continue
    fi ;;
  esac
  "phase_$phase"
done
if [[ -n $BUDGET ]]; then
  estimate=$(visit_estimate)
  (( estimate > BUDGET )) && EXIT=1
  echo "plan: ${#VISIT[@]} calls, estimated $estimate s of $BUDGET"
fi
exit $EXIT
