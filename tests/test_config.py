"""Recipe configs: base merging, dotted overrides, and switching a component by name."""

from pathlib import Path

from finetune.config import load_config

ROOT = Path(__file__).resolve().parents[1]

RECIPE = "configs/demo/ddpo_shapes_sd.yaml"


def test_dotted_overrides_merge_into_the_recipe():
    cfg = load_config(RECIPE, ["objective.clip_range=0.1", "reward.partial_credit=false", "train.lr=1e-5"])
    assert dict(cfg.objective) == {"name": "ddpo", "clip_range": 0.1, "adv_clip_max": 5.0}
    assert dict(cfg.reward) == {"name": "geneval", "partial_credit": False}
    assert cfg.train.lr == 1e-5 and cfg.train.batch_size == 32  # the rest of the recipe is kept


def test_switching_a_component_drops_the_old_components_options():
    cfg = load_config(RECIPE, ["objective.name=nft", "objective.beta=0.5"])
    assert dict(cfg.objective) == {"name": "nft", "beta": 0.5}  # no DDPO clip_range left for NFT
    cfg = load_config(RECIPE, ["reward={name: pickscore, model: shapes-clip}"])
    assert dict(cfg.reward) == {"name": "pickscore", "model": "shapes-clip"}  # no geneval partial_credit
    cfg = load_config(RECIPE, ["reward={pickscore: 1.0, jpeg_compressibility: 0.1}"])
    assert dict(cfg.reward) == {"pickscore": 1.0, "jpeg_compressibility": 0.1}
    assert load_config(RECIPE, ["objective.name=ddpo"]).objective.clip_range == 0.2  # same name: merged


def test_switched_objective_builds(tmp_path):
    from finetune.objectives import build_objective

    cfg = load_config(RECIPE, ["objective.name=nft"])
    options = dict(cfg.objective)
    objective = build_objective(options.pop("name"), "sd", **options)
    assert type(objective).__name__ == "DiffusionNFT" and objective.beta == 1.0


def test_unknown_keys_are_rejected_with_the_closest_valid_one():
    import pytest

    with pytest.raises(ValueError, match=r"unknown config key `train.lrr`; did you mean `train.lr`\?"):
        load_config(RECIPE, ["train.lrr=1e-3"])
    with pytest.raises(ValueError, match=r"unknown config key `sample.grop_size`; did you mean `sample.group_size`\?"):
        load_config(RECIPE, ["sample.grop_size=8"])
    with pytest.raises(ValueError, match=r"unknown config key `trian.lr`"):
        load_config(RECIPE, ["trian.lr=1e-3"])
    import glob

    for recipe in glob.glob("configs/**/*.yaml", recursive=True):  # every shipped recipe is valid
        load_config(recipe)


def test_a_recipe_naming_another_reward_replaces_the_base_section(tmp_path):
    """base.yaml's geneval options (partial_credit) must not leak into a recipe's aesthetic reward."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {ROOT / 'configs' / 'base.yaml'}\nreward: {{name: aesthetic, weights: w.pth}}\n")
    cfg = load_config(recipe)
    assert dict(cfg.reward) == {"name": "aesthetic", "weights": "w.pth"}
    recipe.write_text(f"base: {ROOT / 'configs' / 'base.yaml'}\nreward: {{name: geneval, partial_credit: graded}}\n")
    assert load_config(recipe).reward.partial_credit == "graded"  # same component: merged as before


def test_gpu_recipes_hold_only_valid_keys_values_and_options():
    """configs/gpu/ cannot be run here (no weights): check everything that does not need the model."""
    from finetune.objectives import build_objective
    from finetune.preflight import check_values
    from rewards.base import REGISTRY, _builtins

    _builtins()
    recipes = sorted((ROOT / "configs" / "gpu").glob("*.yaml"))
    assert len(recipes) >= 7
    for recipe in recipes:
        cfg = load_config(recipe)
        check_values(cfg)
        options = dict(cfg.objective)
        family = "sd" if "ddpo" in recipe.name else "flow"
        build_objective(options.pop("name"), family, **options)
        reward = cfg.reward if isinstance(cfg.reward, str) else cfg.reward.name
        assert reward in REGISTRY, reward  # its options need the reward's weights: checked where they exist


def test_every_shapes_recipe_passes_the_preflight(tmp_path):
    """Options, batching and objective/family pairs of every CPU recipe, before any model loads."""
    import glob

    from finetune.preflight import preflight

    recipes = sorted(glob.glob("configs/*.yaml") + glob.glob("configs/demo/*.yaml"))
    assert any("g2rpo" in r for r in recipes) and any("loop" in r for r in recipes)
    for recipe in recipes:
        if recipe.endswith("base.yaml"):
            continue
        checked = preflight(load_config(recipe, [f"output_dir={tmp_path / Path(recipe).stem}"]))
        assert checked.family in ("sd", "flow"), recipe
