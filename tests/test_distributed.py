"""Two gloo processes on CPU: per-prompt statistics and gradients are shared across processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import tiny_sd

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_training_is_synchronised(tmp_path):
    from tests.test_objective_dro_sft import write_dark_set

    tiny_sd().save_pretrained(tmp_path / "model")
    write_dark_set(tmp_path / "expert")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "tests" / "dist_check.py"), str(tmp_path / "model"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["prompts"] != r1["prompts"]  # each process sampled its own prompt groups
    # Each tracker holds the rewards of both processes' prompts, identically.
    assert r0["tracker"] == r1["tracker"]
    assert set(r0["tracker"]["stats"]) == set(r0["prompts"]) | set(r1["prompts"])
    # Different data, same parameters after the step: gradients were averaged across processes.
    assert r0["moved"] and r1["moved"]
    assert r0["params"] == r1["params"]
    # Diffusion-DRO: each process its own demonstrations, one set of parameters after the step.
    assert r0["dro"]["prompts"] != r1["dro"]["prompts"] and r0["dro"]["params"] == r1["dro"]["params"]
    assert (tmp_path / "dro" / "expert_latents.safetensors").exists()
    # Sharded evaluation: the same scores on both processes, equal to one process's, file for file.
    assert r0["eval"]["sharded"] == r1["eval"]["sharded"] == r0["eval"]["alone"]
    assert r0["eval"]["sharded"]["geneval_overall"] >= 0
    sharded, alone = (tmp_path / "eval" / name for name in ("sharded", "alone"))
    assert (sharded / "results.jsonl").read_text() == (alone / "results.jsonl").read_text()
    for image in sorted(alone.glob("images/*/samples/*.png")):
        assert image.read_bytes() == (sharded / image.relative_to(alone)).read_bytes(), image
    assert len(list(alone.glob("images/*/samples/*.png"))) == 10
    f0, f1 = r0["find"], r1["find"]
    assert f0["prompts"] != f1["prompts"] and f0["moved"] and f0["params"] == f1["params"]
    # Both processes spent the same training budget; the main process's evaluation was not counted.
    b0, b1 = r0["budget"], r1["budget"]
    assert b0["epochs"] == b1["epochs"]
    assert b0["elapsed"] >= 3.0 and abs(b0["elapsed"] - b1["elapsed"]) < 1.0
