"""Reward plugins: entry points in group ``diffrl.rewards``, ``module:attr`` references, mixes.

How the example plugin is "installed": not with pip (slow on a busy machine, and it would leave the
package in the shared virtualenv for every later test). Instead the fixture writes a ``.dist-info``
folder whose ``entry_points.txt`` is generated from the example's own pyproject.toml into a tmp dir
on sys.path, next to the example's source folder: importlib.metadata finds it exactly as it finds
a pip-installed package. A second fake plugin ("boom") raises on import, to prove that plugins are
imported only when named.
"""

import sys
from pathlib import Path

import pytest
import torch

from rewards.base import build_reward
from rewards.plugins import GROUP, entry_point_names

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "reward_plugin"
MODULES = ("diffrl_reward_example", "diffrl_reward_boom")


def write_dist(site: Path, name: str, entry_points: dict[str, str]) -> None:
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    info.joinpath("entry_points.txt").write_text(
        f"[{GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


@pytest.fixture
def site(tmp_path, monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    assert declared == {"redness": "diffrl_reward_example:Redness"}
    site = tmp_path / "site"
    write_dist(site, "diffrl-reward-example", declared)
    write_dist(site, "diffrl-reward-boom", {"boom": "diffrl_reward_boom:Boom"})
    site.joinpath("diffrl_reward_boom.py").write_text("raise RuntimeError('boom was imported')\n")
    for module in MODULES:
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    yield site
    for module in MODULES:
        sys.modules.pop(module, None)


def coloured(*rgb):
    return torch.tensor(rgb, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 4, 4)


def test_entry_point_is_found_and_loaded_only_when_named(site):
    assert {"redness", "boom"} <= set(entry_point_names())
    build_reward("brightness")
    assert not any(m in sys.modules for m in MODULES)  # listing names imports nothing
    reward = build_reward("redness")
    assert "diffrl_reward_example" in sys.modules and "diffrl_reward_boom" not in sys.modules
    assert reward.name == "redness"
    out = reward(coloured([1.0, 0.0, 0.0], [0.2, 0.6, 1.0]), ["", ""], [{}, {}])
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.2 - 0.3 - 0.5]))
    assert build_reward({"name": "redness", "weight_green": 1.0}).weight_green == 1.0
    with pytest.raises(RuntimeError, match="boom was imported"):
        build_reward("boom")


def test_module_attr_reference(site):
    reward = build_reward({"name": "diffrl_reward_example:Redness", "weight_green": 0.0})
    assert type(reward).__name__ == "Redness" and reward.weight_green == 0.0
    assert "diffrl_reward_boom" not in sys.modules
    assert type(build_reward("rewards.simple:Brightness")).__name__ == "Brightness"
    with pytest.raises(AttributeError):
        build_reward("rewards.simple:NoSuchReward")


def test_unknown_name_lists_builtins_and_plugins(site):
    with pytest.raises(ValueError) as error:
        build_reward("pickscore2")
    message = str(error.value)
    assert message.startswith("unknown reward 'pickscore2' (config field `reward`); available: ")
    available = message.split("available: ")[1].split(", ")
    assert available == sorted(available)
    assert {"boom", "brightness", "geneval", "pickscore", "redness"} <= set(available)
    assert not any(m in sys.modules for m in MODULES)


def test_ambiguous_entry_point_is_refused(site):
    write_dist(site, "diffrl-reward-impostor", {"redness": "impostor:Redness"})
    with pytest.raises(ValueError, match="several installed packages"):
        build_reward("redness")


def test_mix_logs_components_and_sums_them(site):
    images = coloured([0.9, 0.1, 0.3], [0.2, 0.4, 0.8], [0.5, 0.5, 0.5])
    mix = build_reward({"redness": 0.5, "brightness": 2.0})
    out = mix(images, ["", "", ""], [{}] * 3)
    assert set(out.info) == {"redness", "brightness"}
    red, green, blue = images.mean(dim=(2, 3)).unbind(1)
    torch.testing.assert_close(out.info["redness"], red - 0.5 * green - 0.5 * blue)
    torch.testing.assert_close(out.info["brightness"], images.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(out.scores, 0.5 * out.info["redness"] + 2.0 * out.info["brightness"])


def test_example_plugin_trains(site, tmp_path):
    """The entry-point reward drives a real (tiny) training run; its scores reach the trainer."""
    from finetune.config import load_config
    from finetune.trainer import Trainer
    from tests.helpers import tiny_sd3

    tiny_sd3().save_pretrained(tmp_path / "model")
    cfg = load_config("configs/flow_grpo_shapes_flow.yaml", [
        f"model.path={tmp_path / 'model'}", f"output_dir={tmp_path / 'run'}", "cpu=true", "reward=redness",
        "train.epochs=2", "model.num_steps=2", "sample.groups_per_epoch=1", "sample.group_size=4",
        "sample.batch_size=4", "train.batch_size=4", "train.gradient_accumulation_steps=1", "train.lr=1e-2", "eval.every=0", "log.tensorboard=false"])
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    assert trainer.reward.name == "redness" and "diffrl_reward_example" in sys.modules
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["reward_mean"])) for h in history)
    assert any(not torch.equal(p, q) for p, q in zip(trainer.params, before))  # the optimizer really stepped
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()
