#!/usr/bin/env bash
# Rebuild assets/shapes-sd and assets/shapes-flow from scratch, deterministically, on 2 CPU cores in
# about 2 hours: the shared VAE on both cores, then the two denoisers side by side, one core each, in
# two rounds (the second continues the first at half the learning rate with a fresh cosine schedule).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=${WORK:-.cache/pretrain}
round1=$work/round1
out=$work/assets
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
denoisers 2 --assets "$out" --init "$round1/@FAMILY@" --lr 5e-4 --sd-steps 8000 --flow-steps 10000
mkdir -p assets
rm -rf assets/shapes-sd assets/shapes-flow
cp -r "$out/shapes-sd" "$out/shapes-flow" assets/
