#!/usr/bin/env bash
# Reproduce the paper's table rows, or run the CPU demo.
#
#   bash run.sh irra     CUHK-PEDES|ICFG-PEDES|RSTPReid DATA_ROOT [extra train.py flags]
#   bash run.sh clip_sdm DATASET DATA_ROOT [...]   # CLIP fine-tuning baseline, SDM only
#   bash run.sh clip_itc DATASET DATA_ROOT [...]   # CLIP fine-tuning baseline, ITC only
#   bash run.sh demo                               # synthetic data, tiny CLIP from scratch, CPU, < 10 min
#
# GPUs: set NPROC=N to launch N processes with torchrun (--batch_size stays the global batch).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

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
        torchrun --standalone --nproc_per_node="$NPROC" train.py "$@"
    else
        $PYTHON train.py "$@"
    fi
}

[[ $# -ge 1 ]] || usage
method=$1; shift
case "$method" in
    irra|clip_sdm|clip_itc)
        [[ $# -ge 2 ]] || usage
        dataset=$1; root=$2; shift 2
        recipe=$(recipe_for "$method" "$dataset")
        launch --config_file "$recipe" --root_dir "$root" "$@"
        run_dir=$(latest_run "logs/$dataset")
        $PYTHON test.py --config_file "${run_dir}configs.yaml"
        ;;
    demo)
        data=${DEMO_DATA:-demo_data}
        out=${DEMO_OUT:-logs/demo}
        start=$(date +%s)
        if [[ ! -f "$data/CUHK-PEDES/reid_raw.json" ]]; then
            $PYTHON -m datasets.synthetic --root "$data" --dataset_name CUHK-PEDES
        fi
        $PYTHON train.py --config_file configs/demo.yaml --root_dir "$data" --output_dir "$out" "$@"
        run_dir=$(latest_run "$out/CUHK-PEDES")
        $PYTHON test.py --config_file "${run_dir}configs.yaml"
        echo "demo finished in $(( $(date +%s) - start )) s; run folder: $run_dir"
        ;;
    *) usage ;;
esac
