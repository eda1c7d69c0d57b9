#!/usr/bin/env bash
# The compute-optimal study on the embedded flow model (docs/findings.md, "the embedded flow model"): one sweep
# store with PostDiff's options and diffusers' own caches side by side, calibration under 40% and 25% of the
# 20-step baseline's MACs, and the report. Every command appends to the same store and skips what is already
# there, so the script can be killed and started again at any point. About 75 minutes on this 2-core CPU.
#
#   bash bench/study_flow.sh       # STORE, OUT, PER_CLASS override the defaults below
set -euo pipefail
STORE=${STORE:-docs/study-flow/sweep.jsonl}
OUT=${OUT:-docs/study-flow}
PER_CLASS=${PER_CLASS:-20}
POSTDIFF=${POSTDIFF:-postdiff}
STEPS=4,6,8,10,12,14,20

sweep() {  # defaults of one grid axis each: add only what a line varies. Branch 0: the first and last block run.
    "$POSTDIFF" sweep --model testbed-flow --store "$STORE" --per-class "$PER_CLASS" --beta 1 --switch 0 \
        --cache-interval 1 --cache-branch 0 "$@"
}

sweep --steps $STEPS                                                          # fewer steps
sweep --steps 20 --beta 0.5 --switch 0.25,0.5,0.75                            # mixed resolution: switch
sweep --steps 20 --beta 0.5,0.75 --switch 0.5 --low-res-shift full,own        # beta, and the low phase's schedule
sweep --steps 20 --beta 0.5 --switch 0.5 --switch-noise block --low-res-shift full,own  # Pyramid Flow / RALU noise
sweep --steps 20 --cache-interval 2,3 --cache-branch 0,1                      # block caching
sweep --steps 20 --cfg-stop 5,10,15 --ca-mode cond,none                       # text-stream cache / CFG stop alone
sweep --steps 20 --cfg-stop 10 --ca-mode ave,cfg                              # the other text-stream modes
sweep --steps 20 --beta 0.5 --switch 0.25 --progressive 0.75@0.25             # progressive 1/2 -> 3/4 -> 1
sweep --steps 8,10,14,20 --beta 0.5 --switch 0.5 --cache-interval 2           # the paper's combination, fewer steps too
sweep --steps 10,14,20 --beta 0.75 --switch 0.5 --cache-interval 2 --low-res-shift full,own  # with beta 3/4 (the preset)
sweep --steps 8,10,14 --cache-interval 2,3                                    # block caching with fewer steps
sweep --steps $STEPS --external first-block-cache:threshold=0.2 --external taylorseer:interval=3 \
    --external magcache:threshold=0.06,max_skip=2                             # diffusers' caches, every step count
sweep --steps 10,20 --external cache-dit:rdt=0.08,Fn=1,ws=4 --external cache-dit:rdt=0.2,Fn=1,ws=4  # cache-dit's DBCache
                                                                              # (needs the external extra: pip install -e ".[external]")
sweep --steps 20 --preset paper --quantize none,int8-weight,int8-dynamic      # torchao int8 denoisers, alone and with the preset
sweep --steps 20 --seed 1 --store "$OUT/noise.jsonl"                          # the noise: the baseline on other seeds

for budget in 0.4 0.25; do
    "$POSTDIFF" calibrate --model testbed-flow --store "$STORE" --budget-fraction $budget --calibration-per-class 5 \
        --full-per-class "$PER_CLASS" | tee "$OUT/calibration_$budget.json"
done
# the study's best family under 40%, block caching with fewer steps, added to the default candidates
"$POSTDIFF" calibrate --model testbed-flow --store "$STORE" --budget-fraction 0.4 --calibration-per-class 5 \
    --full-per-class "$PER_CLASS" --grid "steps=6,8,10,12,14 cache_interval=2,3" | tee "$OUT/calibration_0.4_grid.json"
"$POSTDIFF" report --model testbed-flow --store "$STORE" --out "$OUT" --per-class "$PER_CLASS" --no-trajectories \
    --noise "$OUT/noise.jsonl"
