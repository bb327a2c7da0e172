"""Recipe configs: YAML files merged over their ``base:`` file, then ``key=value`` overrides.

An override that switches a named component (``objective.name=nft``, ``reward=jpeg_compressibility``,
``reward={name: pickscore, model: ...}``, a reward mix) replaces that section instead of merging
into it: the recipe's options belong to the component it named (a DDPO clip range means nothing
to DiffusionNFT), so the new component starts from its own defaults plus what the override gives.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]


SWITCHABLE = ("objective", "reward")


def switched(section: str, overrides: list[str], current) -> bool:
    """Whether the overrides assign a whole new ``section`` or give it a different ``name``."""
    current_name = current if isinstance(current, str) else (current or {}).get("name")
    for override in overrides:
        key, _, value = override.partition("=")
        if key.strip() == section or (key.strip() == f"{section}.name" and value.strip() != current_name):
            return True
    return False


def component_name(section):
    """The name a reward/objective section selects (a string, ``{name: ...}``, or None for a reward mix)."""
    if isinstance(section, str):
        return section
    return section.get("name") if isinstance(section, DictConfig) else None


def merge_recipe(base: DictConfig, recipe: DictConfig) -> DictConfig:
    """``recipe`` over ``base``; a section naming another component replaces the base's section."""
    base = base.copy()
    for section in SWITCHABLE:
        named = component_name(recipe[section]) if section in recipe else None  # None: options of the base's
        if named is not None and section in base and named != component_name(base[section]):
            base.pop(section)
    return OmegaConf.merge(base, recipe)


def recipe_names(folder: str = "configs") -> list[str]:
    """The recipes shipped in ``folder`` (relative to the repository), by name."""
    return sorted(p.stem for p in (ROOT / folder).glob("*.yaml") if p.stem != "base")


def demo_recipes(name: str) -> list[str]:
    """A recipe file, a demo recipe's name (``nft_shapes_flow``) or an objective's name (``dro``: its demo
    recipes on every shipped model) -> recipe paths."""
    if Path(name).exists() or (ROOT / name).exists():
        return [name]
    exact = ROOT / "configs" / "demo" / f"{name}.yaml"
    found = [exact] if exact.exists() else sorted((ROOT / "configs" / "demo").glob(f"{name}_shapes_*.yaml"))
    if not found:
        raise FileNotFoundError(f"--recipes {name!r}: no such file, and no demo recipe of that name; choose from "
                                f"{', '.join(recipe_names('configs/demo'))}, an objective's name or a YAML path")
    return [str(p.relative_to(ROOT)) for p in found]


def load_config(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    path = Path(path)
    if not path.exists() and (ROOT / path).exists():
        path = ROOT / path  # recipes shipped in the repository, from any working directory
    elif not path.exists() and (ROOT / "configs" / f"{path}.yaml").exists():
        path = ROOT / "configs" / f"{path}.yaml"  # a shipped recipe by name
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist; pass a YAML path or a recipe name: "
                                f"{', '.join(recipe_names())}")
    cfg = OmegaConf.load(path)
    layers = [cfg]
    while "base" in layers[0]:
        base_path = (path.parent / layers[0].pop("base")).resolve()
        layers.insert(0, OmegaConf.load(base_path))
        path = base_path
    merged = layers[0]
    for layer in layers[1:]:
        merged = merge_recipe(merged, layer)
    overrides = list(overrides or [])
    for i, override in enumerate(overrides):
        if "=" not in override:
            value = overrides[i + 1] if i + 1 < len(overrides) and "=" not in overrides[i + 1] else "VALUE"
            raise ValueError(f"override `{override}` has no `=`: write key=value without spaces, "
                             f"e.g. {override}={value}")
    try:
        changes = OmegaConf.from_dotlist(list(overrides or []))
        for section in SWITCHABLE:
            if section in merged and switched(section, list(overrides or []), merged[section]):
                merged.pop(section)
        merged = OmegaConf.merge(merged, changes)
    except Exception as err:  # omegaconf raises several grammar errors
        raise ValueError(f"bad override in {overrides}: {err}") from None
    OmegaConf.set_struct(merged, False)
    check_keys(merged)
    return merged


def leaf_keys(tree, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict):
            keys += leaf_keys(value, f"{prefix}{key}.") or [f"{prefix}{key}"]
        else:
            keys.append(f"{prefix}{key}")
    return keys


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`? " if close else ""


def check_keys(cfg: DictConfig) -> None:
    """Reject keys that ``configs/base.yaml`` does not define, naming the closest valid one.

    ``objective`` and ``reward`` hold the named component's own options; their builders check
    those against the component's signature (``check_options``).
    """
    valid = set(leaf_keys(OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "base.yaml"))))
    given = OmegaConf.to_container(cfg)
    for key in leaf_keys({k: v for k, v in given.items() if k not in SWITCHABLE}):
        # A key that holds a whole section (``log: null``) is a prefix of valid keys: accepted.
        if key in valid or any(v.startswith(key + ".") for v in valid):
            continue
        raise ValueError(f"unknown config key `{key}`; {did_you_mean(key, valid)}"
                         "the valid keys and their defaults are in configs/base.yaml")


def check_options(field: str, name: str, factory, options: dict) -> None:
    """Options for a named component (``objective.*``, ``reward.*``) must be arguments of its constructor."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [n for n in parameters if n != "self"]
    for option in options:
        if option not in accepted:
            raise ValueError(f"unknown option `{field}.{option}` for {field} {name!r}; "
                             f"{did_you_mean(option, accepted)}its options are: {', '.join(accepted) or 'none'}")
