#!/usr/bin/env bash
# Every GPU figure of the project from one script: the GPU-only tests, `surgery bench kernels`, `surgery bench
# model` on a 7B-shaped synthetic model (dense vs E16 K4, ours vs stock transformers' Mixtral) and the 50% GPU
# recipe, results written as results/*/...-<gpu>.json (e.g. -h100). Built for a bare machine that reaches
# no package index: it uses the machine's own python3 (with torch + CUDA, triton, transformers, pytest) and
# installs only what is carried in .gpu-carry/ (made here by --prepare).
#
#   bash evals/gpu_check.sh --dry-run              list the stages, their commands and time limits
#   bash evals/gpu_check.sh --prepare              (on a machine with pip access) fill .gpu-carry/
#   bash evals/gpu_check.sh [--stages a,b] [--skip a,b] [--keep-going]
#
# The demo model's source (a 94 MiB GGUF) is larger than what one call to a lent machine carries (64 MiB in
# all), so --prepare splits it in two parts and a check is two calls to the same warm machine; the `receive`
# stage of each call keeps what that call carried in $GPU_CHECK_STASH, outside the working tree:
#   call 1, carry [.gpu-carry/base, .gpu-carry/part1]:  bash evals/gpu_check.sh --stages receive,env,tests,kernels,model
#   (a 15-minute budget holds: --stages receive,env,attention,tiles,profile,graphs --keep-going, then tests if time
#   is left; a machine start costs ~1 minute of it each call, and the machine goes back after 30 s idle)
#   call 2, carry [.gpu-carry/base, .gpu-carry/part2]:  bash evals/gpu_check.sh --stages receive,env,demo,recipe
# (env is quick once done; the recipe resumes if its stage is rerun.) With one long call and both parts
# present, the plain `bash evals/gpu_check.sh` runs everything in order, within ~30 minutes on one H100.
#
# Every stage is timed and has a time limit; the first failure stops the script with its name, status 1
# (with --keep-going the later stages still run, and the script ends with status 1 if any failed).
# A summary (stage, status, seconds) goes to results/gpu-check/gpu-check-<gpu>.json; with $OUT set (the lent
# machine's return folder), the result JSONs and logs are copied there as well.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STAGES_ALL=(receive env demo tests kernels model attention tiles profile graphs recipe)
PY="${GPU_CHECK_PYTHON:-python3}"
VENV="${GPU_CHECK_VENV:-$ROOT/.venv-gpu}"
CARRY="${GPU_CHECK_CARRY:-$ROOT/.gpu-carry}"
STASH="${GPU_CHECK_STASH:-/var/tmp/surgery-gpu-carry}"
RECIPE="recipes/smollm2-50pct-gpu.yaml"
DEMO_GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
# Where the stages look for the demo model and the corpora (--prepare reads this machine's own).
RUN_CACHE="${SURGERY_CACHE:-$STASH/cache}"
RUN_DATA="${SURGERY_DATA:-$STASH/data}"
export PYTHONUNBUFFERED=1

die() { echo "gpu_check: error: $*" >&2; exit "${2:-1}"; }
usage_error() { echo "gpu_check: error: $*" >&2; exit 2; }

# Time limit of each stage in seconds: 1800 s (30 minutes) in all. Measured on two H200s (2026-11-26): env 11 s;
# tests over 300 s cold both times (Triton compiles every kernel once; 95 s once warm); attention 35 s; the two
# profiles ~60 s (30 s on a third); the tile sweep ~80 s; CUDA-graph decode of dense + E16 K4 at batch 1 and 8, 208 s with its compiles; kernels 63 s; model ~35 s
# eager, while CUDA graphs (torch.compile of three 7B models at three batch sizes) outran 240 s; the recipe spent
# 265 s before its layer-wise stage (conversion 102 s, sampling 161 s) and needs resumed calls. A stage stopped at its limit fails the
# check; the recipe resumes where it stopped when its stage is run again (same --out).
limit_of() {
    case "$1" in
        receive) echo 30 ;; env) echo 60 ;; demo) echo 90 ;; tests) echo 400 ;;
        kernels) echo 150 ;; model) echo 150 ;; attention) echo 120 ;; tiles) echo 120 ;; profile) echo 90 ;;
        graphs) echo 240 ;;
        recipe) echo 350 ;;
    esac
}

DRY=0 PREPARE=0 SELECT="" SKIP="" KEEP_GOING=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --prepare) PREPARE=1 ;;
        --keep-going) KEEP_GOING=1 ;;
        --stages|--only) [ $# -ge 2 ] || usage_error "$1 needs a comma-separated list of stages"; SELECT="$2"; shift ;;
        --skip) [ $# -ge 2 ] || usage_error "--skip needs a comma-separated list of stages"; SKIP="$2"; shift ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) usage_error "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

is_stage() { local s; for s in "${STAGES_ALL[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
check_list() {
    local item; IFS=',' read -ra items <<< "$1"
    for item in "${items[@]}"; do
        is_stage "$item" || usage_error "unknown stage '$item' (stages: ${STAGES_ALL[*]})"
    done
}
[ -n "$SELECT" ] && check_list "$SELECT"
[ -n "$SKIP" ] && check_list "$SKIP"
in_list() { [[ ",$2," == *",$1,"* ]]; }

STAGES=()
for s in "${STAGES_ALL[@]}"; do
    if [ -n "$SELECT" ] && ! in_list "$s" "$SELECT"; then continue; fi
    if [ -n "$SKIP" ] && in_list "$s" "$SKIP"; then continue; fi
    STAGES+=("$s")
done

gpu_name() {
    # h100, h200, a100, ... from the first GPU's name; GPU_CHECK_NAME overrides.
    if [ -n "${GPU_CHECK_NAME:-}" ]; then echo "$GPU_CHECK_NAME"; return; fi
    local n
    n="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" || true
    n="$(echo "$n" | tr '[:upper:]' '[:lower:]' | grep -oE '[a-z]?[0-9]{2,4}[a-z]*' | head -1)" || true
    echo "${n:-gpu}"
}

# ---- what each stage runs -------------------------------------------------------------------------------
PYV="$VENV/bin/python"
SURGERY="$VENV/bin/surgery"

describe() {
    case "$1" in
        receive) echo "copy $CARRY/{base,part1,part2} (whatever this call carried) into $STASH" ;;
        env) echo "$PY -m venv --without-pip $VENV (+ the system site-packages of $PY), pip install --no-index --no-deps -e . and $STASH/wheels/*.whl; assert CUDA" ;;
        demo) echo "join $STASH/part*/$DEMO_GGUF_NAME.* (sha256 checked) into \$SURGERY_CACHE; surgery demo-model" ;;
        tests) echo "pytest tests/test_kernels.py tests/test_head_attention_kernel.py (all of them run on CUDA there) and -m gpu tests/ (every test that skips without CUDA); a one-GPU skip fails" ;;
        kernels) echo "surgery bench kernels --json results/bench/kernels-NAME.json" ;;
        model) echo "surgery bench model --synthetic llama2-7b -E 16 -K 4 --stock --runtime eager --json results/bench/model-llama2-7b-NAME.json" ;;
        attention) echo "surgery bench model --synthetic llama2-7b -E 16 -K 8 --attention-experts --runtime eager --prefill-ctx 2048,4096 --json results/attention/prefill-llama2-7b-NAME.json" ;;
        tiles) echo "python -m surgery_evals.tune_head_kernel (the head kernel's tile candidates, CUDA-graph timed, checked against a float32 reference) --json results/attention/head-kernel-tiles-NAME.json" ;;
        profile) echo "python -m surgery_evals.profile_layer attention --tokens 4096 / mlp --tokens 64 (torch.profiler, one layer, dense vs converted) --json results/{attention,bench}/profile-*-NAME.json" ;;
        graphs) echo "surgery bench model --synthetic llama2-7b -E 16 -K 4 --runtime graphs --decode-batch 1,8 --json results/bench/model-llama2-7b-graphs-NAME.json" ;;
        recipe) echo "surgery run $RECIPE --out runs/smollm2-50pct-gpu --json results/quality/smollm2-50pct-gpu-NAME.json" ;;
    esac
}

stage_receive() {
    local got=0 d
    mkdir -p "$STASH"
    for d in base part1 part2; do
        if [ -d "$CARRY/$d" ]; then
            cp -r "$CARRY/$d/." "$STASH/"
            echo "received $d: $(du -sh "$CARRY/$d" | cut -f1)"
            got=1
        fi
    done
    [ "$got" = 1 ] || echo "nothing carried in $CARRY (using what $STASH already holds)"
    ls "$STASH"
}

stage_env() {
    command -v "$PY" >/dev/null || die "env: $PY not found"
    if [ ! -x "$PYV" ]; then
        "$PY" -m venv --without-pip "$VENV"
    fi
    # The machine's python3 is itself a venv holding torch (CUDA), triton and transformers: make its
    # packages visible to ours rather than installing them again (nothing can be downloaded there).
    local site_dir
    site_dir="$("$PYV" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PY" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site_dir/_gpu_check_parent.pth"
    if compgen -G "$STASH/wheels/*.whl" >/dev/null; then
        "$PYV" -m pip install -q --no-index --no-deps "$STASH"/wheels/*.whl
    fi
    "$PYV" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT"
    "$PYV" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "transformers", "safetensors", "click", "tqdm", "sklearn", "gguf", "accelerate",
                       "yaml", "matplotlib", "pytest", "triton", "surgery", "surgery_kernels", "surgery_evals")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: error: env: not importable: {', '.join(missing)} (carry their wheels: --prepare)")
import torch, transformers, triton
if not torch.cuda.is_available():
    sys.exit("gpu_check: error: env: torch sees no CUDA device")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"transformers {transformers.__version__}, GPU {torch.cuda.get_device_name(0)}")
EOF
}

stage_demo() {
    mkdir -p "$SURGERY_CACHE"
    local target="$SURGERY_CACHE/$DEMO_GGUF_NAME"
    if [ ! -f "$target" ]; then
        compgen -G "$STASH/$DEMO_GGUF_NAME.part-*" >/dev/null \
            || die "demo: no parts of $DEMO_GGUF_NAME in $STASH: carry .gpu-carry/part1 and part2 (--prepare), each with a receive stage"
        [ -f "$STASH/$DEMO_GGUF_NAME.sha256" ] || die "demo: $STASH/$DEMO_GGUF_NAME.sha256 missing: carry .gpu-carry/base"
        cat "$STASH/$DEMO_GGUF_NAME".part-* > "$target.tmp"
        (cd "$(dirname "$target")" && sed "s|  .*|  $DEMO_GGUF_NAME.tmp|" "$STASH/$DEMO_GGUF_NAME.sha256" | sha256sum -c --quiet -) \
            || { rm -f "$target.tmp"; die "demo: the joined GGUF does not match its sha256 (a part is missing or stale: was the machine given back between the calls?)"; }
        mv "$target.tmp" "$target"
    fi
    "$SURGERY" demo-model "$SURGERY_CACHE/demo-smollm2-float32"
}

stage_tests() {
    local log="results/gpu-check/pytest-$NAME.log"
    set +e
    local whole=(tests/test_kernels.py tests/test_head_attention_kernel.py)
    "$PYV" -m pytest -q -rs -p no:cacheprovider "${whole[@]}" 2>&1 | tee "$log"
    local rc1=${PIPESTATUS[0]}
    "$PYV" -m pytest -q -rs -p no:cacheprovider -m gpu tests/ "${whole[@]/#/--ignore=}" 2>&1 | tee -a "$log"
    local rc2=${PIPESTATUS[0]}
    set -e
    [ "$rc1" = 0 ] || die "tests: ${whole[*]} failed (log: $log)"
    [ "$rc2" = 0 ] || [ "$rc2" = 5 ] || die "tests: the gpu-marked tests failed (log: $log)"
    # Tests that need several GPUs (nccl, one GPU a rank) may skip on a one-GPU machine; nothing else may.
    if grep -E "^SKIPPED.*(CUDA|GPU|cuda)" "$log" | grep -vE "needs [2-9][0-9]* CUDA GPUs"; then
        die "tests: tests were skipped for want of a GPU on a GPU machine (log: $log)"
    fi
}

stage_kernels() {
    "$SURGERY" bench kernels --json "results/bench/kernels-$NAME.json"
}

stage_model() {
    # Eager: compiling CUDA graphs for three 7B models at three batch sizes outran 240 s on an H200, so decode
    # here is launch-bound (42 tokens/s dense at batch 1): prefill and the converted/dense ratios are the figures.
    "$SURGERY" bench model --synthetic llama2-7b -E 16 -K 4 --stock --runtime eager --new-tokens 16 \
        --json "results/bench/model-llama2-7b-$NAME.json"
}

stage_attention() {
    # Head experts at 75% of the heads (K 8 of 16 routed FFN experts too), prefill only: the attention modules
    # alone and the whole model at long contexts, where the Triton head kernel does the sparse attention.
    "$SURGERY" bench model --synthetic llama2-7b -E 16 -K 8 --attention-experts --prefill "" --decode-batch "" \
        --runtime eager --prefill-ctx 2048,4096 --json "results/attention/prefill-llama2-7b-$NAME.json"
}

stage_tiles() {
    # Which tiles the head kernel should use on this GPU (kernels/head_attention.py tiles_for): the sweep's
    # "best" entry; SURGERY_HEAD_TILES="$(cat best)" benchmarks it in the whole model before it is committed.
    "$PYV" -m surgery_evals.tune_head_kernel --json "results/attention/head-kernel-tiles-$NAME.json"
}

stage_profile() {
    # Where the converted layer's time goes (the figures above are totals): one attention layer at 4,096 tokens
    # and one FFN layer at 64 tokens (batched decode), ops ranked by device time.
    "$PYV" -m surgery_evals.profile_layer attention --tokens 4096 --json "results/attention/profile-attention-4096-$NAME.json"
    "$PYV" -m surgery_evals.profile_layer mlp --tokens 64 --json "results/bench/profile-mlp-64-$NAME.json"
}

stage_graphs() {
    # Decode with CUDA graphs (torch.compile reduce-overhead), dense and converted only: the decode figures the
    # eager model stage cannot give (it is launch-bound).
    "$SURGERY" bench model --synthetic llama2-7b -E 16 -K 4 --runtime graphs --prefill "" --decode-batch 1,8 \
        --new-tokens 16 --json "results/bench/model-llama2-7b-graphs-$NAME.json"
}

stage_recipe() {
    [ -f "$SURGERY_DATA/wikitext-2/valid.txt" ] || die "recipe: $SURGERY_DATA/wikitext-2/valid.txt missing: carry .gpu-carry/base"
    "$SURGERY" run "$RECIPE" --out runs/smollm2-50pct-gpu --json "results/quality/smollm2-50pct-gpu-$NAME.json"
}

# ---- --prepare: what a bare GPU machine lacks, made where pip works ---------------------------------------
prepare() {
    local pip="${GPU_CHECK_PREP_PIP:-$ROOT/.venv/bin/python -m pip}"
    rm -rf "$CARRY"
    mkdir -p "$CARRY/base/wheels" "$CARRY/base/data/wikitext-2" "$CARRY/base/data/wikitext-2-raw" "$CARRY/part1" "$CARRY/part2"
    # gguf is the one runtime dependency the CUDA image lacks (pure Python; its needs are there).
    $pip download -q --no-deps --only-binary=:all: -d "$CARRY/base/wheels" "gguf==$("$ROOT/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    local data
    data="$("$ROOT/.venv/bin/python" -c 'from surgery.data import SHARED_DATA; print(SHARED_DATA)')"
    cp "$data/wikitext-2/valid.txt" "$CARRY/base/data/wikitext-2/"
    cp "$data/wikitext-2-raw/wiki.test.raw" "$CARRY/base/data/wikitext-2-raw/"
    local gguf
    gguf="$("$ROOT/.venv/bin/python" -c 'from surgery.demo import demo_gguf; print(demo_gguf())')"
    (cd "$(dirname "$gguf")" && sha256sum "$DEMO_GGUF_NAME") > "$CARRY/base/$DEMO_GGUF_NAME.sha256"
    local half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
    split -b "$half" -a 2 "$gguf" "$CARRY/part1/$DEMO_GGUF_NAME.part-"
    mv "$CARRY/part1/$DEMO_GGUF_NAME.part-ab" "$CARRY/part2/"
    grep -qx '/.gpu-carry/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu-carry/' >> "$ROOT/.git/info/exclude"
    du -sh "$CARRY"/*
    echo "carry [.gpu-carry/base, .gpu-carry/part1] in the first call and [.gpu-carry/base, .gpu-carry/part2] in the second"
}

# ---- main -----------------------------------------------------------------------------------------------
if [ "$PREPARE" = 1 ]; then
    prepare
    exit 0
fi

if [ "$DRY" = 1 ]; then
    total=0
    for s in "${STAGES[@]}"; do
        printf '%-8s %5ss  %s\n' "$s" "$(limit_of "$s")" "$(describe "$s")"
        total=$((total + $(limit_of "$s")))
    done
    echo "limit in all: ${total}s"
    exit 0
fi

[ "${#STAGES[@]}" -gt 0 ] || usage_error "no stage left to run"
export SURGERY_CACHE="$RUN_CACHE" SURGERY_DATA="$RUN_DATA"
needs_gpu=0
for s in "${STAGES[@]}"; do [ "$s" != receive ] && needs_gpu=1; done
if [ "$needs_gpu" = 1 ] && [ "${GPU_CHECK_ALLOW_NO_GPU:-0}" != 1 ]; then
    nvidia-smi -L >/dev/null 2>&1 || die "no NVIDIA GPU here (nvidia-smi -L failed): this script is for a machine with one"
fi
NAME="$(gpu_name)"
mkdir -p results/gpu-check results/bench results/quality results/attention
SUMMARY="results/gpu-check/gpu-check-$NAME.json"
STARTED="$(mktemp)"  # its mtime marks this call's start
ROWS="" FAILED=""
finish() {
    local rc=$?
    printf '{"gpu": "%s", "stages": [%s], "exit_status": %s}\n' "$NAME" "${ROWS%,}" "$rc" > "$SUMMARY"
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        cp "$SUMMARY" "$OUT/" 2>/dev/null || true
        for f in "results/bench/kernels-$NAME.json" "results/bench/model-llama2-7b-$NAME.json" \
                 "results/attention/prefill-llama2-7b-$NAME.json" "results/quality/smollm2-50pct-gpu-$NAME.json" \
                 "results/attention/profile-attention-4096-$NAME.json" "results/bench/profile-mlp-64-$NAME.json" \
                 "results/attention/head-kernel-tiles-$NAME.json" \
                 "results/bench/model-llama2-7b-graphs-$NAME.json" "results/gpu-check/pytest-$NAME.log"; do
            # only what this call wrote: a lent machine returns a few files, and stale copies took their places
            [ -f "$f" ] && [ "$f" -nt "$STARTED" ] && cp "$f" "$OUT/"
        done
    fi
    rm -f "$STARTED"
    echo "gpu_check: summary in $SUMMARY (exit status $rc)"
}
trap finish EXIT

for s in "${STAGES[@]}"; do
    limit="$(limit_of "$s")"
    echo "=== gpu_check: $s (limit ${limit}s): $(describe "$s")"
    start=$(date +%s)
    set +e
    set -m  # each background job in its own process group, so the watchdog stops a stage's children too
    ( set -eo pipefail; "stage_$s" ) &
    pid=$!
    ( sleep "$limit"; kill -TERM -- "-$pid" 2>/dev/null ) &
    watchdog=$!
    wait "$pid"
    rc=$?
    kill -- "-$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null
    set +m
    set -e
    secs=$(( $(date +%s) - start ))
    if [ "$rc" = 0 ]; then status=ok; elif [ "$rc" = 143 ]; then status="timed out"; else status="failed ($rc)"; fi
    ROWS="$ROWS{\"stage\": \"$s\", \"status\": \"$status\", \"seconds\": $secs},"
    echo "=== gpu_check: $s: $status in ${secs}s"
    if [ "$rc" != 0 ]; then
        [ "$KEEP_GOING" = 1 ] || die "stage '$s' $status after ${secs}s"
        FAILED="$FAILED $s"
        echo "gpu_check: stage '$s' $status after ${secs}s; --keep-going: on to the next stage" >&2
    fi
done
[ -z "$FAILED" ] || die "failed stages:$FAILED"
echo "gpu_check: all ${#STAGES[@]} stages passed"
