#!/usr/bin/env bash
# Rebuild assets/shapes-sd and assets/shapes-flow from scratch, deterministically, on 2 CPU cores in
# about 4.5 hours: the shared VAE on both cores, then the two denoisers side by side, one core each, in
# two rounds (the second continues the first at half the learning rate with a fresh cosine schedule),
# then two more rounds of the MMDiT alone (grown to 11 blocks).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=${WORK:-.cache/pretrain}
round1=$work/round1
round2=$work/round2
round3=$work/round3
round4=$work/round4
mkdir -p "$work"
python launch/pretrain_shapes.py --stage vae --threads 2 --work "$work" | tee "$work/vae.log"

denoisers() {  # $1: log suffix; the rest: arguments for both stages
  local tag=$1; shift
  python launch/pretrain_shapes.py --stage sd --threads 1 --work "$work" "${@/@FAMILY@/shapes-sd}" > "$work/sd$tag.log" 2>&1 &
  local sd=$!
  python launch/pretrain_shapes.py --stage flow --threads 1 --work "$work" "${@/@FAMILY@/shapes-flow}" > "$work/flow$tag.log" 2>&1 &
  local flow=$!
  wait $sd $flow
  tail -n 1 "$work/sd$tag.log" "$work/flow$tag.log"
}
denoisers 1 --assets "$round1"                                  # 6000 / 8000 steps at lr 1e-3
denoisers 2 --assets "$round2" --init "$round1/@FAMILY@" --lr 5e-4 --sd-steps 8000 --flow-steps 10000
# The MMDiT goes on alone (one core, ~2.3 hours): grown from 6 to 11 blocks without changing what it
# computes, 7 000 steps on the same data; then 8 000 steps at lr 3e-4 on a fresh 48 000-image cache.
python launch/pretrain_shapes.py --stage flow --threads 1 --work "$work" --assets "$round3" \
    --init "$round2/shapes-flow" --grow-layers 11 --lr 4e-4 --flow-steps 7000 > "$work/flow3.log" 2>&1
python launch/pretrain_shapes.py --stage cache --threads 2 --work "$work/more" --vae "$work/vae" --images 48000 --seed 1
python launch/pretrain_shapes.py --stage flow --threads 1 --work "$work/more" --assets "$round4" --seed 1 \
    --init "$round3/shapes-flow" --lr 3e-4 --flow-steps 8000 --half > "$work/flow4.log" 2>&1
tail -n 1 "$work/flow3.log" "$work/flow4.log"
mkdir -p assets
rm -rf assets/shapes-sd assets/shapes-flow
cp -r "$round2/shapes-sd" assets/
cp -r "$round4/shapes-flow" assets/
