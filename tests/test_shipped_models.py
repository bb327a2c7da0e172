"""The shipped shapes models and the script that builds them."""

import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from transformers import CLIPTokenizer

from eval.generate import generate
from eval.shapes import grammar
from finetune.models import hub, tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, cls", [("shapes-sd", StableDiffusionPipeline), ("shapes-flow", StableDiffusion3Pipeline)])
def test_shipped_model_loads_by_name_and_generates(name, cls, tmp_path):
    pipe = hub.load_pipeline(name)
    assert type(pipe) is cls
    assert hub.resolve(name) == str(ROOT / "assets" / name)
    records = grammar.split("eval")[:2]
    generate(pipe, records, tmp_path, images_per_prompt=2, seed=0, num_inference_steps=4, progress=False)
    from PIL import Image

    image = Image.open(tmp_path / "00001" / "samples" / "0001.png")
    assert image.size == (64, 64)


def test_shipped_weights_are_small_safetensors():
    files = list((ROOT / "assets").rglob("*"))
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert sum(f.stat().st_size for f in weights) <= 25 * 2**20


def test_tokenizer_spells_every_grammar_word_as_one_token(tmp_path):
    shipped = CLIPTokenizer.from_pretrained(ROOT / "assets" / "shapes-sd" / "tokenizer")
    built = tiny.write_tokenizer(tmp_path)
    for word in tiny.grammar_words():
        assert len(shipped(word, add_special_tokens=False).input_ids) == 1, word
    longest = max((r["prompt"] for rs in grammar.all_prompts().values() for r in rs), key=len)
    ids = shipped(longest).input_ids
    assert len(ids) <= shipped.model_max_length and ids == built(longest).input_ids


def test_pretraining_script_builds_loadable_models(tmp_path):
    script = ROOT / "launch" / "pretrain_shapes.py"
    common = ["--work", str(tmp_path / "work"), "--assets", str(tmp_path / "assets"), "--batch", "4"]
    for stage in (["--stage", "vae", "--images", "16", "--vae-steps", "2"],
                  ["--stage", "sd", "--sd-steps", "2"], ["--stage", "flow", "--flow-steps", "2"]):
        done = subprocess.run([sys.executable, str(script), *stage, *common], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                                          "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr[-2000:]
    assert type(hub.load_pipeline(str(tmp_path / "assets" / "shapes-sd"))) is StableDiffusionPipeline
    assert type(hub.load_pipeline(str(tmp_path / "assets" / "shapes-flow"))) is StableDiffusion3Pipeline


def test_unknown_model_errors():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.resolve("./missing-model")
    assert hub.resolve("stabilityai/stable-diffusion-3.5-medium") == "stabilityai/stable-diffusion-3.5-medium"
    with pytest.raises(OSError, match="Pass a local path"):
        hub.load_pipeline("diffrl-tests/not-a-real-model")  # HF_HUB_OFFLINE=1: no network attempt
