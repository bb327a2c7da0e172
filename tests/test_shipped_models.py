"""The shipped shapes models and the script that builds them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from eval.generate import generate, image_seed, initial_noise
from eval.shapes import grammar
from finetune.models import hub, tiny, wrap_pipeline
from tests.helpers import tiny_sd3

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, cls", [("shapes-sd", StableDiffusionPipeline), ("shapes-flow", StableDiffusion3Pipeline)])
def test_shipped_model_loads_by_name_and_generates(name, cls, tmp_path):
    pipe = hub.load_pipeline(name)
    assert type(pipe) is cls
    assert hub.resolve(name) == str(ROOT / "assets" / name)
    records = grammar.split("eval")[:2]
    generate(pipe, records, tmp_path, images_per_prompt=2, seed=0, num_inference_steps=4, progress=False)
    image = Image.open(tmp_path / "00001" / "samples" / "0001.png")
    assert image.size == (64, 64)


def test_shipped_weights_are_small_safetensors():
    files = list((ROOT / "assets").rglob("*"))
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    base_models = [f for f in weights if f.relative_to(ROOT / "assets").parts[0] in hub.SHIPPED]
    assert len(base_models) == 7 and sum(f.stat().st_size for f in base_models) <= 25 * 10**6


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
                  ["--stage", "sd", "--sd-steps", "2"], ["--stage", "flow", "--flow-steps", "2", "--half"]):
        done = subprocess.run([sys.executable, str(script), *stage, *common], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                                          "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr[-2000:]
    assert type(hub.load_pipeline(str(tmp_path / "assets" / "shapes-sd"))) is StableDiffusionPipeline
    flow = hub.load_pipeline(str(tmp_path / "assets" / "shapes-flow"))
    assert type(flow) is StableDiffusion3Pipeline and flow.call_kwargs == {"max_sequence_length": 0}
    # --half stores the MMDiT in float16; it loads into float32 weights equal to the stored ones.
    stored = load_file(tmp_path / "assets" / "shapes-flow" / "transformer" / "diffusion_pytorch_model.safetensors")
    loaded = flow.transformer.state_dict()
    assert {v.dtype for v in stored.values()} == {torch.float16} and loaded.keys() == stored.keys()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()) for k, v in stored.items())


def test_unknown_model_errors(monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.resolve("./missing-model")
    # Offline (the tests run with HF_HUB_OFFLINE=1) a hub id that is not cached fails at once, naming the way out;
    # online it is passed on to diffusers.
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE=1: download it"):
        hub.load_pipeline("diffrl-tests/not-a-real-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert hub.resolve("stabilityai/stable-diffusion-3.5-medium") == "stabilityai/stable-diffusion-3.5-medium"


def test_declared_call_kwargs_reach_every_sampler(tmp_path):
    """A folder that declares max_sequence_length 0 (no T5 positions, as shapes-flow) is sampled that
    way by the policy, by generate() and after save_pipeline; undeclared folders keep diffusers' 256."""
    plain = tmp_path / "plain"
    tiny_sd3().save_pretrained(plain)
    pipe = hub.load_pipeline(str(plain))
    assert pipe.call_kwargs == {} and wrap_pipeline(pipe).max_sequence_length == 256

    pipe.call_kwargs = {"max_sequence_length": 0}
    hub.save_pipeline(pipe, tmp_path / "declared")
    pipe = hub.load_pipeline(str(tmp_path / "declared"))
    assert pipe.call_kwargs == {"max_sequence_length": 0}
    embeds = wrap_pipeline(pipe, guidance_scale=1.0).encode(["a photo of a red circle"])["embeds"]
    assert embeds.shape[1] == pipe.tokenizer.model_max_length  # the CLIP tokens only

    records = grammar.split("eval")[:1]
    generate(pipe, records, tmp_path / "gen", images_per_prompt=1, seed=0, num_inference_steps=2, progress=False)
    written = np.asarray(Image.open(tmp_path / "gen" / "00000" / "samples" / "0000.png"), dtype=np.float32) / 255
    call = dict(prompt=[records[0]["prompt"]], latents=initial_noise(pipe, [image_seed(0, 0, 0)]),
                num_inference_steps=2, guidance_scale=4.0, output_type="np")
    assert np.abs(written - pipe(**call, max_sequence_length=0).images[0]).max() <= 1 / 255 + 1e-6
    assert np.abs(written - pipe(**call).images[0]).max() > 2 / 255  # 256 zero positions change the output
