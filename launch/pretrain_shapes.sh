#!/usr/bin/env bash
# Rebuild assets/shapes-sd and assets/shapes-flow from scratch (deterministic; ~40 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python launch/pretrain_shapes.py --stage vae --threads 2 "$@"
python launch/pretrain_shapes.py --stage sd --threads 1 "$@" > .cache/pretrain/sd.log 2>&1 &
sd=$!
python launch/pretrain_shapes.py --stage flow --threads 1 "$@" > .cache/pretrain/flow.log 2>&1 &
flow=$!
wait $sd $flow
tail -n 2 .cache/pretrain/sd.log .cache/pretrain/flow.log
