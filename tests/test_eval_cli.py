"""`diffrl eval geneval --model` and `diffrl eval reward` end to end on tiny models, 1 and 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from eval.run import compare_table, mean_ci
from eval.shapes import grammar
from finetune.cli import main
from tests.helpers import tiny_sd3

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--images-per-prompt", "2", "--steps", "3", "--batch-size", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny flow model, a trained LoRA for it, and 7 eval prompts (every tag, 2 for position)."""
    from finetune.config import load_config
    from finetune.trainer import Trainer

    root = tmp_path_factory.mktemp("eval")
    tiny_sd3().save_pretrained(root / "model")
    records, seen = [], {}
    for r in grammar.split("eval"):
        if seen.get(r["tag"], 0) < (2 if r["tag"] == "position" else 1):
            seen[r["tag"]] = seen.get(r["tag"], 0) + 1
            records.append(r)
    grammar.write_jsonl(records, root / "prompts.jsonl")
    cfg = load_config("configs/flow_grpo_shapes_flow.yaml", [
        f"model.path={root / 'model'}", f"output_dir={root / 'run'}", "cpu=true", "reward=brightness",
        "model.num_steps=3", "sample.groups_per_epoch=2", "sample.group_size=4", "sample.batch_size=8",
        "train.batch_size=4", "train.epochs=1", "train.lr=5e-2", "eval.every=0", "log.tensorboard=false",
        "train.ema_decay=0"])  # the recipe's EMA (every 8 steps) would export the untrained LoRA
    Trainer(cfg).train()
    return root


def geneval_args(setup, out, *extra):
    return ["eval", "geneval", "--model", str(setup / "model"), "--metadata", str(setup / "prompts.jsonl"),
            "--backend", "shapes", "--out", str(out), *FAST, *extra]


def test_geneval_generates_scores_and_loads_a_lora(setup, tmp_path, capsys):
    assert main(geneval_args(setup, tmp_path / "base")) == 0
    printed = capsys.readouterr().out
    assert "Overall score (avg. over tasks)" in printed
    rows = [json.loads(line) for line in (tmp_path / "base" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 7 * 2 and rows[0]["filename"] == "00000/samples/0000.png"
    assert {r["tag"] for r in rows} == set(grammar.TAGS)
    assert (tmp_path / "base" / "grid.png").exists()
    assert (tmp_path / "base" / "images" / "00006" / "samples" / "0001.png").exists()
    # Same seeds with the trained LoRA: the images change (the LoRA really is applied).
    assert main(geneval_args(setup, tmp_path / "lora", "--lora", str(setup / "run" / "lora"))) == 0
    a = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "base" / "images" / "00000" / "samples" / "0000.png"))
    b = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "lora" / "images" / "00000" / "samples" / "0000.png"))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_eval_bad_input(setup, tmp_path, capsys):
    assert main(geneval_args(setup, tmp_path / "x", "--lora", str(tmp_path / "no_lora"))) == 2
    assert "has no pytorch_lora_weights.safetensors" in capsys.readouterr().err
    assert main(["eval", "geneval", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "give --images DIR" in capsys.readouterr().err
    assert main(geneval_args(setup, tmp_path / "y", "--backend", "yolo")) == 2
    assert "unknown detector backend 'yolo'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(grammar.split("eval")[0]) + "\n{oops\n")
    assert main(["eval", "geneval", "--model", str(setup / "model"), "--metadata", str(bad), "--out", str(tmp_path / "z")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["eval", "reward", "--reward", "nope", "--model", str(setup / "model"), "--prompts", str(bad)]) == 2
    # A mistyped --model is named before anything loads (GenEval's prompts would call for the hub's detector).
    assert main(["eval", "geneval", "--model", "shapes-sdd", "--out", str(tmp_path / "t")]) == 2
    assert "model path 'shapes-sdd' does not exist" in capsys.readouterr().err
    assert main(["eval", "reward", "--reward", "brightness", "--model", "/nonexistent"]) == 2
    assert "model path '/nonexistent' does not exist" in capsys.readouterr().err
    # A detector that cannot load (offline, not cached) fails before any image is generated.
    assert main(geneval_args(setup, tmp_path / "w", "--backend", "hf")) == 2
    assert "pass a local path" in capsys.readouterr().err and not (tmp_path / "w" / "images").exists()


def test_mean_ci_matches_scipy():
    x = np.random.default_rng(0).normal(2.0, 0.5, size=40)
    s = mean_ci(x)
    assert s["mean"] == pytest.approx(x.mean()) and s["std"] == pytest.approx(x.std(ddof=1))
    lo, hi = stats.norm.interval(0.95, loc=x.mean(), scale=x.std(ddof=1) / np.sqrt(len(x)))
    assert s["ci95"] == pytest.approx([lo, hi], rel=1e-3)


def test_eval_reward_compare(setup, tmp_path, capsys):
    args = ["eval", "reward", "--reward", "brightness,jpeg_compressibility", "--model", str(setup / "model"),
            "--lora", str(setup / "run" / "lora"), "--compare", "--prompts", str(setup / "prompts.jsonl"),
            "--out", str(tmp_path), *FAST]
    assert main(args) == 0
    results = json.loads((tmp_path / "rewards.json").read_text())
    assert len(results) == 2  # base and base + LoRA
    base, tuned = results.values()
    assert base["brightness"]["n"] == tuned["brightness"]["n"] == 14
    assert base["brightness"]["mean"] != tuned["brightness"]["mean"]
    table = (tmp_path / "rewards.md").read_text()
    assert table == compare_table(results) + "\n" and table.count("\n") == 4
    assert "brightness" in capsys.readouterr().out


def test_two_process_geneval_equals_single_process(setup, tmp_path):
    assert main(geneval_args(setup, tmp_path / "one")) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "finetune.cli", *geneval_args(setup, tmp_path / "two")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = sorted((tmp_path / "one" / "results.jsonl").read_text().splitlines())
    two = sorted((tmp_path / "two" / "results.jsonl").read_text().splitlines())
    assert len(two) == 14 and one == two
    assert (tmp_path / "two" / "results_summary.json").read_text() == (tmp_path / "one" / "results_summary.json").read_text()


def test_default_backend_follows_the_prompts_classes():
    from eval.geneval import GENEVAL_METADATA
    from eval.run import default_backend, load_records

    shapes_file = grammar.split("train")[:5]  # a file of shapes prompts, not a shapes: split name
    assert default_backend("my_prompts.jsonl", shapes_file) == "shapes"
    assert default_backend("shapes:eval") == "shapes"
    assert default_backend(str(GENEVAL_METADATA), load_records(str(GENEVAL_METADATA))) == "hf"
