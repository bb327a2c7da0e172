"""What a new user meets first: recipe names, help texts, `rewards list`, the demo's bookkeeping."""

import json

import pytest

from finetune.cli import main
from finetune.config import demo_recipes, load_config
from rewards.base import REGISTRY, _builtins
from tests.helpers import FAST, save_tiny_models


def test_recipes_by_name():
    assert demo_recipes("dro") == ["configs/demo/dro_shapes_flow.yaml", "configs/demo/dro_shapes_sd.yaml"]
    assert demo_recipes("nft_shapes_flow") == ["configs/demo/nft_shapes_flow.yaml"]
    assert demo_recipes("configs/ddpo_shapes_sd.yaml") == ["configs/ddpo_shapes_sd.yaml"]
    with pytest.raises(FileNotFoundError, match="no demo recipe of that name; choose from awm_shapes_flow, "):
        demo_recipes("ddpo_shapes_flow")
    assert load_config("ddpo_shapes_sd").objective.name == "ddpo"
    with pytest.raises(FileNotFoundError, match="pass a YAML path or a recipe name: awm_shapes_flow, ctrl_shapes_sd"):
        load_config("ddpo_shapes")


def test_train_help_lists_recipes_and_objectives(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "recipes (configs/NAME.yaml): awm_shapes_flow, ctrl_shapes_sd, ddpo_shapes_sd" in text
    assert "objectives (objective.name=...): ddpo, flow_grpo, nft, awm, loop, g2rpo, sft, dro, find, ctrl" in text
    assert "nft_sd35m" in text


def test_rewards_list_describes_every_reward_and_what_it_needs(capsys):
    assert main(["rewards", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    _builtins()
    described = {line.split()[0]: line.split("built-in", 1)[1].strip() for line in lines if " built-in " in line}
    assert set(described) == set(REGISTRY) and all(described.values())
    needs = [line.strip() for line in lines if line.strip().startswith("needs: ")]
    assert len(needs) == len(REGISTRY)
    assert "needs: nothing (runs offline as it is)" in needs and any("PickScore_v1" in n for n in needs)


def test_reward_serve_has_one_home(capsys):
    with pytest.raises(SystemExit):
        main(["reward", "serve", "--reward", "brightness"])
    assert "invalid choice: 'reward'" in capsys.readouterr().err


def test_demo_trains_in_parallel_reports_paired_gains_and_keeps_the_last_run(tmp_path, capsys):
    models = save_tiny_models(tmp_path / "models")
    root = load_config.__globals__["ROOT"]
    for name, recipe, model in (("tiny_sd", "ddpo_shapes_sd", "sd"), ("tiny_flow", "nft_shapes_flow", "flow")):
        (tmp_path / f"{name}.yaml").write_text(f"base: {root / 'configs' / f'{recipe}.yaml'}\n"
                                               f"model:\n  path: {models / model}\n")
    args = ["demo", "--recipes", str(tmp_path / "tiny_sd.yaml"), str(tmp_path / "tiny_flow.yaml"), "--out",
            str(tmp_path / "demo"), "--minutes", "0.002", "--images-per-prompt", "1", *FAST, "eval.num_steps=2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for name in ("tiny_sd", "tiny_flow"):
        history = json.loads((tmp_path / "demo" / name / "history.json").read_text())
        assert history[0]["epoch"] == 0 and "geneval_overall" in history[-1]  # evaluated before and after
        assert (tmp_path / "demo" / name / "before_after.png").stat().st_size > 0
        assert f"| {name} | {history[0]['geneval_overall']:.3f} | {history[-1]['geneval_overall']:.3f} |" in printed
    assert "gain ± paired s.e." in printed and "Wall time:" in (tmp_path / "demo" / "summary.md").read_text()
    first = (tmp_path / "demo" / "tiny_sd" / "history.json").read_text()
    assert main(args[:3] + args[4:]) == 0  # the sd recipe alone, again
    assert "tiny_sd existed: moved to" in capsys.readouterr().out
    assert (tmp_path / "demo" / "tiny_sd.previous" / "history.json").read_text() == first


def test_demo_refuses_bad_input_before_training(tmp_path, capsys):
    assert main(["demo", "--recipes", "ddpo_shapes_flow", "--out", str(tmp_path)]) == 2
    assert "no demo recipe of that name" in capsys.readouterr().err
    assert main(["demo", "--recipes", "ddpo", "--out", str(tmp_path), "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().err and not any(tmp_path.iterdir())
