#!/usr/bin/env bash
# Reproduce the papers' table rows, or run a CPU demo.
#
#   bash run.sh irra     CUHK-PEDES|ICFG-PEDES|RSTPReid DATA_ROOT [extra train.py flags]
#   bash run.sh clip_sdm DATASET DATA_ROOT [...]   # CLIP fine-tuning baseline, SDM only
#   bash run.sh clip_itc DATASET DATA_ROOT [...]   # CLIP fine-tuning baseline, ITC only
#   bash run.sh php      DATASET DATA_ROOT [...]   # PHP (IRRA + part parsing with experts), docs/php.md
#   bash run.sh ivt      DATASET DATA_ROOT [...]   # IVT (one shared transformer), docs/ivt.md
#   bash run.sh biirra   DATASET DATA_ROOT [...]   # Bi-IRRA (English + Chinese), docs/biirra.md
#   bash run.sh demo | ivt-demo | biirra-demo      # synthetic data, tiny models from scratch, CPU
#
# SEEDS="1 2 3": one run per seed, then the table of their mean and spread (tools/collect_results.py).
# GPUs: NPROC=N launches N processes with torchrun (--batch_size stays the global batch).
# A run that fails exits with its status (2 for bad input, after one `error:` line).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

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

# train_and_test LOGS_FOR_DATASET train.py-args...: one run per seed of $SEEDS (or one run), each evaluated with
# test.py; with several seeds, the table of all of them at the end.
train_and_test() {
    local logs=$1; shift
    local runs=()
    for seed in ${SEEDS:-_}; do
        if [[ "$seed" == "_" ]]; then launch "$@"; else launch "$@" --seed "$seed"; fi
        local run_dir
        run_dir=$(latest_run "$logs")
        $PYTHON test.py --config_file "${run_dir}configs.yaml"
        runs+=("$run_dir")
    done
    if [[ ${#runs[@]} -gt 1 ]]; then
        $PYTHON tools/collect_results.py "${runs[@]}"
    fi
}

export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # spinning OpenMP threads slow small CPU work several times

[[ $# -ge 1 ]] || usage
method=$1; shift
case "$method" in
    irra|clip_sdm|clip_itc|php|ivt|biirra)
        [[ $# -ge 2 ]] || usage
        dataset=$1; root=$2; shift 2
        recipe=$(recipe_for "$method" "$dataset")
        train_and_test "logs/$dataset" --config_file "$recipe" --root_dir "$root" "$@"
        ;;
    demo)
        data=${DEMO_DATA:-demo_data}
        out=${DEMO_OUT:-logs/demo}
        start=$(date +%s)
        $PYTHON -m datasets.synthetic --root "$data" --dataset_name CUHK-PEDES --num_ids 700 --num_test_ids 100 \
            --num_val_ids 50 --reuse
        train_and_test "$out/CUHK-PEDES" --config_file configs/demo.yaml --root_dir "$data" --output_dir "$out" "$@"
        run_dir=$(latest_run "$out/CUHK-PEDES")
        $PYTHON search.py --config_file "${run_dir}configs.yaml" --out "${run_dir}search.png" \
            --query "a woman in a red coat with a black backpack"
        $PYTHON tools/plot_curves.py "$run_dir" --out "${run_dir}curves.png"
        echo "demo finished in $(( $(date +%s) - start )) s; run folder: $run_dir"
        ;;
    biirra-demo)
        data=${DEMO_DATA:-demo_data_bilingual}
        out=${DEMO_OUT:-logs/biirra-demo}
        start=$(date +%s)
        $PYTHON -m datasets.synthetic --root "$data" --dataset_name CUHK-PEDES --num_ids 700 --num_test_ids 100 \
            --num_val_ids 50 --languages en,ch --reuse
        train_and_test "$out/CUHK-PEDES" --config_file configs/biirra_demo.yaml --root_dir "$data" \
            --output_dir "$out" "$@"
        echo "Bi-IRRA demo finished in $(( $(date +%s) - start )) s; run folder: $(latest_run "$out/CUHK-PEDES")"
        ;;
    ivt-demo)
        data=${DEMO_DATA:-demo_data}
        out=${DEMO_OUT:-logs/ivt-demo}
        start=$(date +%s)
        $PYTHON -m datasets.synthetic --root "$data" --dataset_name CUHK-PEDES --num_ids 700 --num_test_ids 100 \
            --num_val_ids 50 --reuse
        train_and_test "$out/CUHK-PEDES" --config_file configs/ivt_demo.yaml --root_dir "$data" --output_dir "$out" "$@"
        echo "IVT demo finished in $(( $(date +%s) - start )) s; run folder: $(latest_run "$out/CUHK-PEDES")"
        ;;
    *) usage ;;
esac
