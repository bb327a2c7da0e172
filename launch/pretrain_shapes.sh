#!/usr/bin/env bash
# Rebuild assets/shapes-sd and assets/shapes-flow from scratch, deterministically, on 2 CPU cores in
# under an hour: the shared VAE on both cores, then the two denoisers side by side, one core each.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work=${WORK:-.cache/pretrain}
out=$work/assets
mkdir -p "$work"
python launch/pretrain_shapes.py --stage vae --threads 2 --work "$work" | tee "$work/vae.log"
python launch/pretrain_shapes.py --stage sd --threads 1 --work "$work" --assets "$out" > "$work/sd.log" 2>&1 &
sd=$!
python launch/pretrain_shapes.py --stage flow --threads 1 --work "$work" --assets "$out" > "$work/flow.log" 2>&1 &
flow=$!
wait $sd $flow
tail -n 1 "$work/sd.log" "$work/flow.log"
mkdir -p assets
rm -rf assets/shapes-sd assets/shapes-flow
cp -r "$out/shapes-sd" "$out/shapes-flow" assets/
