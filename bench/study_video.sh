#!/usr/bin/env bash
# The compute-optimal study on the embedded video model (docs/findings.md, "the embedded video model"): fewer steps,
# block caching, mixed resolution in space (beta), in time (temporal_beta, beta 1) and both, CFG stop, and the
# external caches, in one sweep store on the MovingFashion prompts (80: 10 classes x 8 motions), then the report
# with frame strips and GIFs. Every command appends to the same store and skips what is already there, so the
# script can be killed and started again at any point. About 70 minutes on this 2-core CPU.
#
#   bash bench/study_video.sh       # STORE, OUT, PER_CLASS, GUIDANCE override the defaults below
set -euo pipefail
STORE=${STORE:-docs/study-video/sweep.jsonl}
OUT=${OUT:-docs/study-video}
PER_CLASS=${PER_CLASS:-2}   # clips per prompt: 160 clips, 1280 frames a point
GUIDANCE=${GUIDANCE:-4}     # the video model's documented setting (docs/embedded-models.md)
POSTDIFF=${POSTDIFF:-postdiff}
STEPS=4,6,8,10,12,14,20

sweep() {  # defaults of one grid axis each: add only what a line varies. Branch 0: the first and last block run.
    $POSTDIFF sweep --model testbed-video --store "$STORE" --per-class "$PER_CLASS" --guidance-scale "$GUIDANCE" \
        --beta 1 --switch 0 --cache-interval 1 --cache-branch 0 "$@"
}

sweep --steps $STEPS                                                          # fewer steps
sweep --steps 20 --beta 0.5 --switch 0.25,0.5,0.75                            # mixed resolution in space: switch
sweep --steps 20 --beta 0.75 --switch 0.5                                     #   beta 3/4
sweep --steps 20 --switch 0.25,0.5,0.75 --temporal-beta 3/7                   # in time: 4 of the 8 frames, full size
sweep --steps 20 --switch 0.5 --temporal-beta 1/7                             #   2 frames
sweep --steps 20 --beta 0.5,0.75 --switch 0.5 --temporal-beta 3/7             # in space and time
sweep --steps 20 --cache-interval 2,3,4                                      # block caching (4 blocks: branch 0 only)
sweep --steps 20 --cfg-stop 5,10,15 --ca-mode cond,none                       # cross-attention cache / CFG stop alone
sweep --steps 8,10,14 --cache-interval 2,3                                    # block caching with fewer steps
sweep --steps 8,10,14,20 --preset paper                                       # the paper's combination, fewer steps too
sweep --steps 6,8,10,14 --switch 0.5 --temporal-beta 3/7                      # time with fewer steps
sweep --steps 6 --preset paper                                                #   and the paper's combination under 20%
sweep --steps 8 --cfg-stop 4 --ca-mode none                                   # CFG stop at half the steps, fewer steps
sweep --steps 10 --cfg-stop 5 --ca-mode none
sweep --steps 14 --cfg-stop 7 --ca-mode none
sweep --steps 10,14,20 --beta 0.75 --switch 0.5 --temporal-beta 3/7 --cache-interval 2  # space, time and blocks
sweep --steps 6,10,14,20 --external first-block-cache:threshold=0.2 --external taylorseer:interval=3 \
    --external magcache:threshold=0.06,max_skip=2                             # diffusers' caches
sweep --steps 10,20 --external cache-dit:rdt=0.2,Fn=1,ws=4                    # cache-dit's DBCache
                                                                              # (needs the external extra: pip install -e ".[external]")
sweep --steps 20 --seed 1 --store "$OUT/noise.jsonl"                          # the noise: the baseline on other seeds
# the front's rows on seed 1 too: a difference between them is read against their own second seed (docs/findings.md)
sweep --steps 6,8,10 --seed 1 --store "$OUT/noise.jsonl"
sweep --steps 10,20 --switch 0.5 --temporal-beta 3/7 --seed 1 --store "$OUT/noise.jsonl"
sweep --steps 8 --preset paper --seed 1 --store "$OUT/noise.jsonl"
sweep --steps 20 --beta 0.5 --switch 0.5 --seed 1 --store "$OUT/noise.jsonl"
sweep --steps 20 --cfg-stop 10 --ca-mode none --seed 1 --store "$OUT/noise.jsonl"
sweep --steps 8 --cfg-stop 4 --ca-mode none --seed 1 --store "$OUT/noise.jsonl"
sweep --steps 10 --cfg-stop 5 --ca-mode none --seed 1 --store "$OUT/noise.jsonl"
sweep --steps 4 --seed 1 --store "$OUT/noise.jsonl"
sweep --steps 6 --switch 0.5 --temporal-beta 3/7 --seed 1 --store "$OUT/noise.jsonl"

$POSTDIFF report --model testbed-video --store "$STORE" --out "$OUT" --per-class "$PER_CLASS" \
    --guidance-scale "$GUIDANCE" --noise "$OUT/noise.jsonl"
