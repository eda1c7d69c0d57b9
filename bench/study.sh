#!/usr/bin/env bash
# The compute-optimal study on the embedded model (docs/findings.md): one sweep store, then calibration
# and the report. Every command appends to the same store and skips what is already there, so the script
# can be killed and started again at any point.
#
#   bash bench/study.sh            # STORE, OUT, PER_CLASS override the defaults below
set -euo pipefail
STORE=${STORE:-docs/study/sweep.jsonl}
OUT=${OUT:-docs/study}
PER_CLASS=${PER_CLASS:-50}
POSTDIFF=${POSTDIFF:-postdiff}

sweep() {  # defaults of one grid axis each: add only what a line varies
    "$POSTDIFF" sweep --store "$STORE" --per-class "$PER_CLASS" --beta 1 --switch 0 --cache-interval 1 --cache-branch 1 "$@"
}

sweep --steps 4,6,8,10,12,14,20                                             # fewer steps
sweep --steps 20 --beta 0.5 --switch 0.25,0.5,0.75                           # mixed resolution: switch
sweep --steps 20 --beta 0.75 --switch 0.5                                    # mixed resolution: beta
sweep --steps 20 --beta 0.5 --switch 0.25,0.4 --progressive 0.75@0.25        # progressive 1/2 -> 3/4 -> 1
sweep --steps 20 --cache-interval 2,3,5                                      # DeepCache
sweep --steps 8,10,14,20 --beta 0.5 --switch 0.5 --cache-interval 2          # paper preset, fewer steps too
sweep --steps 20 --beta 0.5 --switch 0.5 --cache-interval 2 --cfg-stop 5,10,15 --ca-mode cond,ave,cfg  # CA ablation
sweep --steps 20 --cfg-stop 8 --ca-mode ave                                  # T-GATE-style: gate at 2/5 of the steps
sweep --steps 20 --external tomesd:ratio=0.5 --external deepcache-package:interval=2,branch=1  # external packages

"$POSTDIFF" calibrate --store "$STORE" --budget-fraction 0.4 --full-per-class "$PER_CLASS" | tee "$OUT/calibration.json"
"$POSTDIFF" report --store "$STORE" --out "$OUT" --per-class "$PER_CLASS"
# torchao int8 U-Nets, alone and with the paper preset, at 10 images a class (beside the float rows of that size)
"$POSTDIFF" sweep --store "$STORE" --per-class 10 --steps 20 --beta 1 --switch 0 --cache-interval 1 --preset paper \
    --quantize none,int8-weight,int8-dynamic
"$POSTDIFF" report --store "$STORE" --out "$OUT/per-class-10" --per-class 10 --no-trajectories --no-samples
