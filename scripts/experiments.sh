#!/usr/bin/env bash
# The paper's claims as one command each (issue 17): trains every (setting, seed) of an experiment grid, evaluates
# and measures each run, and writes one table of mean +- std over the seeds.
#
#   scripts/experiments.sh conflicts    tiny vs tiny-cnn supernets, same recipe: conflict shares, max/min top-1
#   scripts/experiments.sh ablation     tiny: baseline / + projection / + switchable scaling / + weak augmentation,
#                                       and the weak recipe without projection
#   scripts/experiments.sh standalone   min, max and two searched subnets: from the supernet vs trained alone
#   scripts/experiments.sh all          the three, sharing the runs they have in common
#
# Environment (defaults in brackets):
#   STEPS [800]      training steps of every run (batch 64; standalone runs see the same images)
#   SEEDS ["0 1 2"]  seeds of every setting
#   OUT [runs/experiments]  one folder per run (OUT/<setting>-s<seed>); finished runs are skipped, so a killed
#                    grid continues where it stopped (a half-trained run is resumed)
#   JOBS [2]         runs at once, each on THREADS threads [1]
#   CALIB [32]       BN re-calibration batches of each evaluation
#   BATCHES [10]     training batches of each conflict measurement
#   LIMIT [all]      test images of each evaluation (a smoke run: LIMIT=100)
#   NASVIT [target/release/nasvit]
#
# Every evaluation uses configs/experiments/eval.yaml (all 10 000 test images; BN re-calibrated on plain training
# images). Tables: OUT/table-<experiment>.md (scripts/experiments_table.py).
set -euo pipefail
cd "$(dirname "$0")/.."

EXP=${1:-}
STEPS=${STEPS:-800}
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-runs/experiments}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
CALIB=${CALIB:-32}
BATCHES=${BATCHES:-10}
LIMIT=${LIMIT:-}
NASVIT=${NASVIT:-target/release/nasvit}
BASE=configs/experiments/tiny-fashion-mnist.yaml
EVAL=configs/experiments/eval.yaml

case "$EXP" in
conflicts | ablation | standalone | all) ;;
*)
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
[ -x "$NASVIT" ] || { echo "build first: cargo build --release -p nasvit-cli" >&2; exit 1; }
mkdir -p "$OUT"

# Settings: name -> `--set` overrides of the base recipe.
STRONG="--set augment.randaug_n=2 --set augment.randaug_m=9 --set augment.erasing_p=0.25 \
--set augment.mixup_alpha=0.8 --set augment.cutmix_alpha=1.0"
declare -A SETS=(
    [tiny]=""
    [tiny-cnn]="--set space=tiny-cnn"
    [baseline]="$STRONG --set grad_proj.enabled=false --set switchable_scales=false"
    [proj]="$STRONG --set switchable_scales=false"
    [proj-switch]="$STRONG"
    [tiny-noproj]="--set grad_proj.enabled=false"
)
# Standalone subnets: name -> arch (min, max, two subnets the demo's search picked, 8.4 and 12.6 MMACs).
declare -A ARCHS=([min]=min [max]=max [a]=configs/experiments/arch-a.json [b]=configs/experiments/arch-b.json)

log() { echo "[$(date +%H:%M:%S)] $*"; }

# One supernet run: train (or resume, or skip when done), evaluate max and min, measure conflicts.
supernet_run() {
    local name=$1 seed=$2 dir="$OUT/$1-s$2"
    # shellcheck disable=SC2086
    train "$dir" --config "$BASE" ${SETS[$name]} --set "seed=$seed"
    for a in max min; do
        evaluate "$dir" "$a" "$a"
    done
    if [ ! -f "$dir/conflict.json" ]; then
        "$NASVIT" conflict --checkpoint "$dir" --data "$dir" --batches "$BATCHES" --engine cpu \
            --threads "$THREADS" --json "$dir/conflict.json" >"$dir/conflict.txt"
    fi
    echo "{\"experiment\": \"supernet\", \"setting\": \"$name\", \"seed\": $seed}" >"$dir/experiment.json"
    log "done $dir"
}

# One standalone run of arch $1 with seed $2; the supernet side is evaluated on OUT/tiny-s<seed>.
standalone_run() {
    local name=$1 seed=$2 dir="$OUT/alone-$1-s$2"
    train "$dir" --config "$BASE" --set "seed=$seed" --arch "${ARCHS[$name]}"
    evaluate "$dir" "${ARCHS[$name]}" arch
    echo "{\"experiment\": \"standalone\", \"setting\": \"$name\", \"seed\": $seed}" >"$dir/experiment.json"
    log "done $dir"
}

train() {
    local dir=$1
    shift
    if [ -f "$dir/trained" ]; then
        return
    fi
    if [ -e "$dir/last" ]; then
        "$NASVIT" train --resume "$dir" --threads "$THREADS" --no-progress --eval-every 0 --eval-batches 4 \
            >>"$dir/train.log" 2>&1
    else
        mkdir -p "$dir"
        "$NASVIT" train "$@" --out "$dir" --max-steps "$STEPS" --threads "$THREADS" --no-progress \
            --eval-every 0 --eval-batches 4 >"$dir/train.log" 2>&1 || {
            # the folder is taken by the run's lock and log; keep the log, say where it is
            echo "training $dir failed; see $dir/train.log" >&2
            return 1
        }
    fi
    touch "$dir/trained"
}

# evaluate RUN ARCH NAME: top-1 of ARCH from RUN's published checkpoint -> RUN/eval-NAME.json
evaluate() {
    local dir=$1 arch=$2 name=$3
    [ -f "$dir/eval-$name.json" ] && return
    "$NASVIT" eval --checkpoint "$dir/last/supernet.safetensors" --arch "$arch" --data "$EVAL" \
        --calib-batches "$CALIB" --engine cpu --threads "$THREADS" ${LIMIT:+--limit "$LIMIT"} \
        --json "$dir/eval-$name.json" >/dev/null
}

# Runs the queued commands JOBS at a time; the first failure stops the grid after the running ones end.
QUEUE=()
run_queue() {
    local failed=0
    for cmd in "${QUEUE[@]}"; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do
            wait -n || failed=1
        done
        [ "$failed" = 0 ] || break
        log "start $cmd"
        $cmd &
    done
    while [ "$(jobs -rp | wc -l)" -gt 0 ]; do
        wait -n || failed=1
    done
    QUEUE=()
    return "$failed"
}

supernets=()
case "$EXP" in
conflicts) supernets=(tiny tiny-cnn) ;;
ablation) supernets=(baseline proj proj-switch tiny tiny-noproj) ;;
standalone) supernets=(tiny) ;;
all) supernets=(tiny tiny-cnn baseline proj proj-switch tiny-noproj) ;;
esac
for seed in $SEEDS; do
    for s in "${supernets[@]}"; do
        QUEUE+=("supernet_run $s $seed")
    done
done
if [ "$EXP" = standalone ] || [ "$EXP" = all ]; then
    for seed in $SEEDS; do
        for a in min max a b; do
            QUEUE+=("standalone_run $a $seed")
        done
    done
fi
run_queue

# The supernet side of the standalone comparison: the same archs taken from the tiny supernets.
if [ "$EXP" = standalone ] || [ "$EXP" = all ]; then
    for seed in $SEEDS; do
        for a in a b; do
            evaluate "$OUT/tiny-s$seed" "${ARCHS[$a]}" "$a"
        done
    done
fi

for e in conflicts ablation standalone; do
    if [ "$EXP" = "$e" ] || [ "$EXP" = all ]; then
        python3 scripts/experiments_table.py "$OUT" "$e" >"$OUT/table-$e.md.tmp"
        mv "$OUT/table-$e.md.tmp" "$OUT/table-$e.md"
        log "table: $OUT/table-$e.md"
        cat "$OUT/table-$e.md"
    fi
done
