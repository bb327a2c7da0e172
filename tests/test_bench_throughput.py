"""`diffrl bench throughput`'s pieces: phase timing, the call recorder behind the model-math floor, the
trainer's time/* columns and the command end to end on tiny models (what it measures, not how fast)."""

import json

import pytest
import torch

from finetune.bench.calls import CallRecorder
from finetune.cli import main
from finetune.config import load_config
from finetune.timing import Phases
from finetune.trainer import Trainer
from tests.helpers import FAST, save_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def test_nested_phases_count_exclusive_seconds(monkeypatch):
    clock = iter([0.0, 1.0, 4.0, 10.0, 20.0, 21.0])  # outer 0-10 holding inner 1-4; then inner 20-21
    monkeypatch.setattr("finetune.timing.time.perf_counter", lambda: next(clock))
    phases = Phases()
    with phases("sample"):
        assert phases.current == "sample"
        with phases("reward"):
            assert phases.current == "reward"
    with phases("reward"):
        pass
    assert phases.current is None
    assert phases.pop() == {"time/sample": 7.0, "time/reward": 4.0}
    assert phases.pop() == {}


def test_recorder_counts_calls_by_phase_shape_and_backprop():
    net = torch.nn.Linear(4, 3)
    phases = Phases()
    recorder = CallRecorder({"denoiser": net}, lambda: phases.current)
    with phases("sample"), torch.no_grad():
        for _ in range(3):
            net(torch.randn(5, 4))
        net(torch.randn(2, 4))
    with phases("optimize"):
        for _ in range(2):
            net(torch.randn(5, 4)).sum().backward()
    counts = {(phase, shapes[0][0], backprop): n for (phase, _, shapes, backprop), (n, *_) in recorder.calls.items()}
    assert counts == {("sample", (5, 4), False): 3, ("sample", (2, 4), False): 1, ("optimize", (5, 4), True): 2}
    net.weight.grad = None
    floor = recorder.floor(repeats=1)
    assert set(floor) == {"sample", "optimize"} and all(s > 0 for s in floor.values())
    assert net.weight.grad is None  # replays leave no gradient behind
    net(torch.randn(5, 4))
    assert sum(n for n, *_ in recorder.calls.values()) == 6  # detached: later calls are not counted


def test_trainer_history_times_every_phase(models, tmp_path):
    cfg = load_config("configs/ddpo_shapes_sd.yaml", FAST + [
        f"model.path={models / 'sd'}", f"output_dir={tmp_path}", "train.epochs=2", "eval.every=2",
        "eval.at_start=true", "eval.images_per_prompt=1", "eval.num_steps=2"])
    history = Trainer(cfg).train()
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert set(history[0]) >= {"time/evaluate", "wall"} and "time/sample" not in history[0]
    for h in history[1:]:
        assert set(h) >= {f"time/{p}" for p in ("wait", "sample", "reward", "gather", "optimize", "checkpoint")}
        spent = sum(v for k, v in h.items() if k.startswith("time/"))
        # every phase is inside the wall clock of its epoch, and sampling + training is the `time` column
        assert h["time/sample"] > 0 and spent <= h["wall"] - history[history.index(h) - 1]["wall"] + 1e-3
    assert "time/evaluate" in history[2] and "time/evaluate" not in history[1]
    train_time = sum(history[2][f"time/{p}"] + history[1][f"time/{p}"] for p in ("sample", "reward", "gather", "optimize"))
    assert history[2]["time"] == pytest.approx(train_time, rel=0.05)


def test_bench_command_measures_rollout_and_epoch_against_their_floors(models, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "throughput", "--models", str(models / "sd"), "--recipe", "configs/ddpo_shapes_sd.yaml",
                 "--parts", "rollout,epoch", "--epochs", "2", "--out", str(out), *FAST,
                 f"model.path={models / 'sd'}", "eval.every=2", "eval.images_per_prompt=1", "eval.num_steps=2"]) == 0
    result = json.loads((out / "throughput.json").read_text())
    rollout = result["rollout"][0]
    assert rollout["ratio"] == pytest.approx(rollout["rollout_s"] / rollout["pipeline_s"])
    epoch = result["epoch"]
    assert epoch["samples_per_epoch"] == 8 and epoch["epochs"] == 2
    assert set(epoch["floor"]) >= {"sample", "optimize", "evaluate"}  # the denoiser's calls, found in each phase
    assert epoch["phases"]["evaluate"] > 0 and epoch["ratio"] > 0
    printed = capsys.readouterr().out
    assert "| **sample + optimize** |" in printed and (out / "throughput.md").read_text() in printed


def test_bench_rejects_an_unknown_part(capsys):
    assert main(["bench", "throughput", "--parts", "rollout,speed"]) == 2
    assert "--parts: unknown ['speed']" in capsys.readouterr().err
