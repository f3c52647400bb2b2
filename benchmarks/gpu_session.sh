#!/usr/bin/env bash
# A GPU session in phases that each fit a lent machine's limits (README: "GPU session").
#
#   bash benchmarks/gpu_session.sh [--dry-run] PHASE...      PHASE: build test sanitize ops model
#                                                            (all = every phase, in that order)
#   build     rebuild _C (sm_90 only, MAX_JOBS = all cores) unless the installed _C carries this
#             tree's source stamp; then `fused-resnet info` must show cuda_ext, cutlass_conv and
#             triton usable, or the phase fails (so GPU tests cannot silently skip)
#   test      the GPU-marked tests (pytest -m gpu), a timeout per test, no -x, junit XML
#   sanitize  compute-sanitizer memcheck + racecheck on tests/gpu_sanitize.py
#   ops       benchmarks/test_bench_{bn_add_relu,conv,blocks}.py + benchmarks/report.py, and the
#             roofline table (python -m fused_resnet.bench.roofline) with the measured times
#   model     fused-resnet bench: resnet50, bf16, batch 256, inference and training (the
#             roofline table again, with the whole-network times)
# Every phase first runs `build` (once per invocation); it rebuilds only when needed. Each
# phase ends itself within PHASE_S seconds (default 460, under 8 minutes), and the whole
# invocation within SESSION_S (default 560: one device call is cut at 600 s): a step that
# would overrun is interrupted (SIGINT: pytest still writes its JSON / XML) and reported as
# "timeout". Results are written to $OUT (default ./gpu-out) as each step ends:
#   summary.txt           one line per phase: "PHASE: ok|failed|timeout|skipped (...) - detail"
#   PHASE.log             everything the phase ran and printed
#   test-junit.xml        the test phase's results
#   report-DEVICE-DATE.md      the ops and model reports (markdown), as they are produced
#   results-DEVICE-DATE.tar.gz the same results laid out for benchmarks/results/ (JSON, md, PNG)
# At most 8 files for up to four phases in one call (the device tool returns 8).
# Exit status: 0 if every phase is ok or skipped, 1 otherwise, 2 for a usage error.
#
# --dry-run (or DRY_RUN=1): on a CPU (CUDA hidden), the same code paths at tiny sizes; GPU-only
# steps are reported as "skipped (no GPU)" (tests/test_gpu_session.py runs it in CI).
#
# The device machine cannot download: carry CUTLASS's headers with the call, prepared here by
#   python3 -c "import cutlass_library, os, shutil; shutil.copytree(os.path.join(
#     os.path.dirname(cutlass_library.__file__), 'source', 'include'), '.cutlass/include')"
# (after pip install --no-deps -r requirements-build.txt; .cutlass/ is git-ignored, ~27 MB)
# and the device tool's carry=[".cutlass"]; without them the build phase fails.
#
# Knobs (environment): OUT, PYTHON (default python3), DRY_RUN, SESSION_S, PHASE_S,
# TEST_TIMEOUT_S (per test, default 300), BENCH_TIMEOUT_S (per benchmark, default 300),
# OPS_SUITES (default "bn_add_relu conv blocks"), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
SESSION_S=${SESSION_S:-560}
PHASE_S=${PHASE_S:-460}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-300}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-300}
OPS_SUITES=${OPS_SUITES:-bn_add_relu conv blocks}
MIN_STEP_S=15    # a step with less time left than this is not started
REPORT_S=30      # kept back in the ops and model phases for rendering and packing results
ALL_PHASES=(build test sanitize ops model)

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

wanted=" "
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    all) wanted+="${ALL_PHASES[*]} " ;;
    build|test|sanitize|ops|model) wanted+="$arg " ;;
    *) echo "gpu_session.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
PHASES=()
for phase in "${ALL_PHASES[@]}"; do  # canonical order, each once
  [[ $wanted == *" $phase "* ]] && PHASES+=("$phase")
done
if (( ${#PHASES[@]} == 0 )); then usage >&2; exit 2; fi

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
      [[ -f $f ]] && { echo; cat "$f"; }
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
    status=failed
    detail+="; $verdict"
  else
    detail+="; $verdict"
  fi
  cap_file "$log"
  summary build "$status" "$detail"
}

phase_test() {
  local log=$OUT/test.log tally status
  PER_TEST_S=$TEST_TIMEOUT_S run_pytest "$log" "$PHASE_S" "$ROOT/tests" -m gpu -q -rfE \
    --durations=20 --junitxml="$OUT/test-junit.xml"
  tally=$(pytest_tally "$log")
  status=$STEP_STATUS
  if [[ $STEP_RC == 5 ]]; then
    status=failed tally="no GPU tests collected"
  elif [[ $status == ok && $tally != *passed* ]]; then
    if (( DRY_RUN )); then
      status="skipped (no GPU)" tally="collected, all skipped: $tally"
    else
      status=failed tally="not one GPU test ran (no CUDA device?): $tally"
    fi
  fi
  cap_file "$log"
  summary test "$status" "pytest -m gpu: ${tally:-no result} (junit: test-junit.xml)"
}

phase_sanitize() {
  local log=$OUT/sanitize.log script=$ROOT/tests/gpu_sanitize.py
  if (( DRY_RUN )); then
    run_step "$log" 120 "$PY" "$script" --dry-run
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
      --error-exitcode 9 --print-limit 50 "$PY" "$script"
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
  local log=$OUT/model.log tag args mode cap statuses=() details=() runs=()
  set_tag
  tag=$RESULT_TAG
  if (( DRY_RUN )); then
    args=(--model resnet18 --dtype fp32 --batch-size 2 --image-size 32 --device cpu
          --providers eager_cl fused --warmup 1 --repeats 2 --iters 1 --check-batch 2)
  else
    args=(--model resnet50 --dtype bf16 --batch-size 256)
  fi
  # one run per mode (inference gets 45% of what is left), so a cut keeps the first
  for mode in inference training; do
    if [[ $mode == inference ]]; then
      cap=$(( (PHASE_START + PHASE_S - SECONDS - REPORT_S) * 45 / 100 ))
    else
      cap=$((PHASE_START + PHASE_S - SECONDS - REPORT_S))
    fi
    run_step "$log" "$cap" "$PY" -m fused_resnet bench "${args[@]}" --mode "$mode" --no-plots \
      --out "$WORK/bench-$mode"
    statuses+=("$STEP_STATUS")
    details+=("$mode $STEP_STATUS")
    [[ -f $WORK/bench-$mode/results.json ]] && runs+=("$WORK/bench-$mode/results.json")
  done
  if (( ${#runs[@]} )); then
    # both modes as one recorded run: results.json, report.md and plots in bench-TAG/
    run_step "$log" 120 "$PY" - "$STAGE/bench-$tag" "fused-resnet bench ${args[*]} --mode inference training" "${runs[@]}" <<'PYTHON'
import json, sys
from fused_resnet.bench import suite
out_dir, command, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
runs = [json.load(open(p)) for p in paths]
merged = runs[0]
for run in runs[1:]:
    merged["rows"] += run["rows"]
    merged["config"]["modes"] += run["config"]["modes"]
merged["config"]["plots"] = True
merged["config"]["out_dir"] = out_dir
print("written:", ", ".join(suite.write(merged, out_dir, command=command).values()))
PYTHON
    [[ $STEP_STATUS == ok ]] || { statuses+=(failed); details+=("merging the reports failed"); }
    roofline "$log"
    [[ $STEP_STATUS == ok ]] || { statuses+=(failed); details+=("roofline table failed"); }
    publish
  fi
  cap_file "$log"
  summary model "$(worst "${statuses[@]}")" \
    "fused-resnet bench ${args[*]}: $(join_by "; " "${details[@]}"); report-$tag.md, results-$tag.tar.gz"
}

# ------------------------------------------------------------------------------------- main
note "# $(date -u +%Y-%m-%dT%H:%M:%SZ) gpu_session.sh ${PHASES[*]}$( ((DRY_RUN)) && echo ' --dry-run') on ${HOSTNAME:-$(uname -n)} ($(nproc) cores), tree stamp $TREE_STAMP"
for phase in "${PHASES[@]}"; do
  PHASE_START=$SECONDS
  if (( SECONDS - START > SESSION_S - 2 * MIN_STEP_S )); then
    summary "$phase" "skipped (no time left)" "the invocation's $SESSION_S s are spent"
    continue
  fi
  if [[ $phase != build ]] && (( ! BUILT )); then
    phase_build   # counts against this phase's time
  fi
  if [[ $phase != build ]] && (( BUILD_BROKEN )); then
    summary "$phase" failed "not run: the build failed (see build.log)"
    continue
  fi
  "phase_$phase"
done
exit $EXIT
