"""Expert demonstrations through Hugging Face `datasets`: the formats, the checks, the latent cache."""

import json

import pytest
import torch
from PIL import Image

from finetune.expert import ExpertSet, check_expert, load_expert, prepare_expert

PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of two triangles"]


def png_bytes(colour, size=32) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_imagefolder(root, prompts=PROMPTS):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, prompt in enumerate(prompts):
            Image.new("RGB", (40, 32), (40 * i, 200, 10)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "prompt": prompt}) + "\n")
    return root


def write_parquet(path, images, prompts=PROMPTS, prompt_column="prompt"):
    """A parquet file as other tools write it: image structs of bytes, no `datasets` metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({prompt_column: prompts, "image": [{"bytes": b, "path": None} for b in images]})
    pq.write_table(table, path)
    return path


def test_imagefolder_with_metadata_loads_prompts_and_images(tmp_path):
    dataset = load_expert(str(write_imagefolder(tmp_path / "folder")))
    check_expert(dataset)
    assert sorted(dataset["prompt"]) == sorted(PROMPTS)
    assert dataset[0]["image"].size == (40, 32)


def test_parquet_written_without_datasets_loads_and_its_images_decode(tmp_path):
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    folder = tmp_path / "pq"
    write_parquet(folder / "train.parquet", [png_bytes(c) for c in colours])
    expert = ExpertSet(load_expert(str(folder)), str(folder))
    check_expert(expert.dataset)
    assert expert.prompts == PROMPTS
    from finetune.expert import pixels

    red = pixels(expert.dataset[0]["image"], (16, 16))
    assert red.shape == (3, 16, 16)
    torch.testing.assert_close(red[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_shapes_dataset_command_writes_the_train_split_without_eval_prompts(tmp_path):
    from eval.shapes.grammar import split
    from finetune.cli import main

    assert main(["shapes", "dataset", "--split", "train", "--out", str(tmp_path / "ds"), "--images-per-prompt", "1"]) == 0
    dataset = load_expert(str(tmp_path / "ds"))
    train, held_out = split("train"), split("eval")
    assert len(dataset) == len(train) and set(dataset["prompt"]) == {r["prompt"] for r in train}
    check_expert(dataset, eval_prompts=[r["prompt"] for r in held_out])  # raises on any shared prompt
    assert dataset[0]["image"].size == (64, 64) and "tag" in dataset.column_names


@pytest.mark.parametrize("case, fragment", [
    ("no prompt column", "no 'prompt' column"),
    ("empty prompt", "have no prompt"),
    ("smaller than a batch", "fewer than one training batch"),
    ("eval prompts", "are eval prompts"),
    ("missing path", "cannot load the expert dataset"),
])
def test_bad_expert_sets_are_refused_naming_the_field_and_the_fix(tmp_path, case, fragment):
    images = [png_bytes((i, i, i)) for i in range(3)]
    source, min_rows, eval_prompts = tmp_path / "pq", 1, []
    if case == "no prompt column":
        write_parquet(source / "a.parquet", images, prompt_column="text")
    elif case == "empty prompt":
        write_parquet(source / "a.parquet", images, prompts=["a photo of a circle", "", None])
    elif case == "smaller than a batch":
        write_parquet(source / "a.parquet", images)
        min_rows = 8
    elif case == "eval prompts":
        write_parquet(source / "a.parquet", images)
        eval_prompts = [PROMPTS[1]]
    else:
        source = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=fragment) as err:
        check_expert(load_expert(str(source)), min_rows=min_rows, eval_prompts=eval_prompts)
    assert "data.expert" in str(err.value)


def test_an_unreadable_image_names_its_row(tmp_path):
    from tests.helpers import tiny_sd
    from finetune.models.sd import SDPolicy

    folder = tmp_path / "pq"
    write_parquet(folder / "a.parquet", [png_bytes((0, 0, 0)), b"not a png", png_bytes((9, 9, 9))])
    expert = ExpertSet(load_expert(str(folder)), str(folder))
    with pytest.raises(ValueError, match=r"row 1 .*unreadable image"):
        expert.encode(SDPolicy(tiny_sd(), 1.0, 3, 1.0))


def test_latents_are_the_vae_posterior_means_scaled_and_cached(tmp_path):
    from tests.helpers import tiny_sd3
    from eval.generate import sample_pixels
    from finetune.expert import pixels
    from finetune.models.flow import FlowPolicy

    policy = FlowPolicy(tiny_sd3(), 1.0, 3, 0.7)
    folder = write_imagefolder(tmp_path / "folder")
    expert = ExpertSet(load_expert(str(folder)), str(folder))
    cache = tmp_path / "cache.safetensors"
    expert.encode(policy, cache, batch_size=2)
    vae = policy.pipe.vae
    image = pixels(expert.dataset[1]["image"], sample_pixels(policy.pipe))
    with torch.no_grad():
        mean = vae.encode(image[None]).latent_dist.mean
    expected = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(expert.latents(policy, [1]), expected, rtol=1e-4, atol=1e-5)
    # A second set over the same data reads the cache instead of running the VAE.
    again = ExpertSet(load_expert(str(folder)), str(folder))
    vae.encode = None
    again.encode(policy, cache)
    torch.testing.assert_close(again.mean, expert.mean)


def test_preflight_refuses_a_bad_expert_set_before_the_model_loads(tmp_path):
    from finetune.config import load_config
    from finetune.preflight import preflight

    cfg = load_config("configs/dro_shapes_sd.yaml", [f"output_dir={tmp_path / 'run'}", "model.path=shapes-sd",
                                                     f"data.expert={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="data.expert"):
        preflight(cfg)


def test_tag_balanced_draws_visit_every_tag():
    import random

    expert = ExpertSet.__new__(ExpertSet)
    expert.prompts = [f"p{i}" for i in range(100)]
    expert.tags = ["common"] * 98 + ["rare"] * 2
    drawn = expert.draw(400, random.Random(0), balance_tags=True)
    rare = sum(expert.tags[i] == "rare" for i in drawn)
    assert 150 < rare < 250  # ~half, against 2 % drawn uniformly


def test_prepare_expert_defaults_to_the_shapes_train_split(monkeypatch):
    from omegaconf import OmegaConf

    import finetune.expert as expert_module
    from finetune.expert import shapes_dataset

    asked = []
    monkeypatch.setattr(expert_module, "shapes_dataset",
                        lambda split: asked.append(split) or shapes_dataset(split, images_per_prompt=1).select(range(8)))
    expert = prepare_expert(OmegaConf.create({"data": {"expert": None}}), 4, [{"prompt": "a photo of a circle"}])
    assert asked == ["train"] and len(expert) == 8
