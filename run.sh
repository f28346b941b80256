#!/usr/bin/env bash
# Reproduce the paper's table rows, or run the CPU demo.
#
#   bash run.sh irra     CUHK-PEDES|ICFG-PEDES|RSTPReid DATA_ROOT [extra train.py flags]
#   bash run.sh clip_sdm DATASET DATA_ROOT [...]   # CLIP fine-tuning baseline, SDM only
#   bash run.sh clip_itc DATASET DATA_ROOT [...]   # CLIP fine-tuning baseline, ITC only
#   bash run.sh php      DATASET DATA_ROOT [...]   # PHP (IRRA + part parsing with experts), docs/php.md
#   bash run.sh demo                               # synthetic data, tiny CLIP from scratch, CPU, < 10 min
#
# GPUs: set NPROC=N to launch N processes with torchrun (--batch_size stays the global batch).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

recipe_for() {  # method dataset -> configs/<method>_<dataset>.yaml
    local dataset
    dataset=$(echo "$2" | tr '[:upper:]' '[:lower:]')
    local file="configs/$1_${dataset}.yaml"
    [[ -f "$file" ]] || { echo "error: no recipe $file (datasets: CUHK-PEDES, ICFG-PEDES, RSTPReid)" >&2; exit 2; }
    echo "$file"
}

latest_run() { ls -td "$1"/*/ 2>/dev/null | head -n 1; }

launch() {
    if [[ -n "${NPROC:-}" && "${NPROC}" -gt 1 ]]; then
        # torchrun exits with 1 whatever failed; the error file it writes names the failing process's status
        # (2: bad input, 3: diverged, 128+N: stopped by signal N; docs/reliability.md).
        local errors status=0
        errors=$(mktemp)
        TORCHELASTIC_ERROR_FILE="$errors" torchrun --standalone --nproc_per_node="$NPROC" train.py "$@" || status=$?
        if [[ $status -ne 0 && -s "$errors" ]]; then
            status=$($PYTHON -c 'import json, sys; print(json.load(open(sys.argv[1]))["message"]["errorCode"])' \
                "$errors" 2>/dev/null || echo "$status")
        fi
        rm -f "$errors"
        return "$status"
    else
        $PYTHON train.py "$@"
    fi
}

[[ $# -ge 1 ]] || usage
method=$1; shift
case "$method" in
    irra|clip_sdm|clip_itc|php)
        [[ $# -ge 2 ]] || usage
        dataset=$1; root=$2; shift 2
        recipe=$(recipe_for "$method" "$dataset")
        launch --config_file "$recipe" --root_dir "$root" "$@"
        run_dir=$(latest_run "logs/$dataset")
        $PYTHON test.py --config_file "${run_dir}configs.yaml"
        ;;
    demo)
        # Spinning OpenMP threads make small CPU models several times slower on a shared or busy machine.
        export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
        data=${DEMO_DATA:-demo_data}
        out=${DEMO_OUT:-logs/demo}
        start=$(date +%s)
        $PYTHON -m datasets.synthetic --root "$data" --dataset_name CUHK-PEDES --num_ids 700 --num_test_ids 100 \
            --num_val_ids 50 --reuse
        $PYTHON train.py --config_file configs/demo.yaml --root_dir "$data" --output_dir "$out" "$@"
        run_dir=$(latest_run "$out/CUHK-PEDES")
        $PYTHON test.py --config_file "${run_dir}configs.yaml"
        $PYTHON search.py --config_file "${run_dir}configs.yaml" --out "${run_dir}search.png" \
            --query "a woman in a red coat with a black backpack"
        $PYTHON tools/plot_curves.py "$run_dir" --out "${run_dir}curves.png"
        echo "demo finished in $(( $(date +%s) - start )) s; run folder: $run_dir"
        ;;
    *) usage ;;
esac
