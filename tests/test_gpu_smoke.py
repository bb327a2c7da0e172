"""launch/gpu_smoke.py runs on a GPU when a session has one; its plumbing is checked here on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_plumbing_on_the_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "launch/gpu_smoke.py", "--device", "cpu", "--epochs", "1",
                           "--only", "flow_grpo tiny-flux", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert result["run"] == "flow_grpo tiny-flux" and result["finite"] and result["moved"]
    assert result["images"] == 16 and result["images_per_s"] > 0
