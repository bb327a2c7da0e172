"""Model cards beside what training writes, the saved recipe that reruns it, and `diffrl push` (hub mocked)."""

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from finetune.cli import main
from finetune.config import load_config
from finetune.trainer import Trainer
from tests.helpers import FAST, save_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


def train(models, out, *extra):
    cfg = load_config("configs/ddpo_shapes_sd.yaml", FAST + [
        f"model.path={models / 'sd'}", f"output_dir={out}", "train.epochs=1", "eval.every=1",
        "eval.images_per_prompt=1", "eval.num_steps=2", *extra])
    Trainer(cfg).train()
    return cfg


def test_a_lora_run_writes_its_card_and_the_recipe_that_reruns_it(models, tmp_path):
    cfg = train(models, tmp_path / "run")
    card = ModelCard.load(tmp_path / "run" / "lora" / "README.md")
    assert card.data.base_model == str(models / "sd") and card.data.library_name == "diffusers"
    assert {"diffrl", "lora", "ddpo", "text-to-image"} <= set(card.data.tags)
    text = card.text
    assert "objective for 1 epoch (2 optimizer steps)" in text and '"reward": "brightness"' in text
    assert "| 0 | " in text and "| 1 | " in text  # GenEval before and after, from the run's evaluations
    assert f'pipe.load_lora_weights("{tmp_path / "run" / "lora"}")' in text
    assert f"diffrl train --config {tmp_path / 'run' / 'config.yaml'}" in text
    assert load_config(tmp_path / "run" / "config.yaml") == cfg  # the saved recipe is the whole run


def test_a_full_fine_tune_writes_its_card_into_the_pipeline_folder(models, tmp_path):
    train(models, tmp_path / "run", "lora.enabled=false", "train.lr=1e-5")
    text = (tmp_path / "run" / "model" / "README.md").read_text()
    assert f'DiffusionPipeline.from_pretrained("{tmp_path / "run" / "model"}")' in text
    assert (tmp_path / "run" / "model" / "model_index.json").is_file()


class FakeHub:
    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("token", token))

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(("create", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message):
        self.calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return type("CommitInfo", (), {"repo_url": f"https://huggingface.co/{repo_id}"})()


def test_push_uploads_the_folder_with_its_card(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert main(["push", str(folder), "--repo", "me/shapes-lora"]) == 2
    assert "has no README.md model card" in capsys.readouterr().err
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    assert main(["push", str(folder), "--repo", "me/shapes-lora"]) == 2  # the tests run with HF_HUB_OFFLINE=1
    assert "the hub is off" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    FakeHub.calls = []
    assert main(["push", str(folder), "--repo", "me/shapes-lora", "--private"]) == 0
    assert FakeHub.calls == [("token", None), ("create", "me/shapes-lora", True, True),
                             ("upload", "me/shapes-lora", ["README.md", "pytorch_lora_weights.safetensors"])]
    assert "uploaded" in capsys.readouterr().out
