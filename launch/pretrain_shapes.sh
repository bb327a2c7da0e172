#!/usr/bin/env bash
# Rebuild assets/shapes-sd and assets/shapes-flow from scratch, deterministically, on 2 CPU cores:
# the shared VAE (~20 min), then two rounds of the two denoisers side by side, one core each
# (round 1 ~35 min, round 2 ~45 min: a continuation with a fresh optimizer, warm-up and EMA).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=.cache/pretrain
mkdir -p "$work" "$work/round1"
python launch/pretrain_shapes.py --stage vae --threads 2 --work "$work"

round() {  # round NAME SEED SD_STEPS FLOW_STEPS [INIT_DIR]
  local name=$1 seed=$2 sd_steps=$3 flow_steps=$4 init=${5:-}
  local out="$work/$name"
  python launch/pretrain_shapes.py --stage sd --threads 1 --work "$work" --seed "$seed" --sd-steps "$sd_steps" \
    --assets "$out" ${init:+--init "$init/shapes-sd"} > "$work/$name-sd.log" 2>&1 &
  local sd=$!
  python launch/pretrain_shapes.py --stage flow --threads 1 --work "$work" --seed "$seed" --flow-steps "$flow_steps" \
    --assets "$out" ${init:+--init "$init/shapes-flow"} > "$work/$name-flow.log" 2>&1 &
  local flow=$!
  wait $sd $flow
  tail -n 1 "$work/$name-sd.log" "$work/$name-flow.log"
}

round round1 0 2200 2200
round round2 1 4000 3000 "$work/round1"
mkdir -p assets
rm -rf assets/shapes-sd assets/shapes-flow
cp -r "$work/round2/shapes-sd" "$work/round2/shapes-flow" assets/
