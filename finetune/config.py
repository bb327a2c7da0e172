"""Recipe configs: YAML files merged over their ``base:`` file, then ``key=value`` overrides.

An override that switches a named component (``objective.name=nft``, ``reward=jpeg_compressibility``,
``reward={name: pickscore, model: ...}``, a reward mix) replaces that section instead of merging
into it: the recipe's options belong to the component it named (a DDPO clip range means nothing
to DiffusionNFT), so the new component starts from its own defaults plus what the override gives.
"""

from __future__ import annotations

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


def load_config(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    path = Path(path)
    if not path.exists() and (ROOT / path).exists():
        path = ROOT / path  # recipes shipped in the repository, from any working directory
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    cfg = OmegaConf.load(path)
    layers = [cfg]
    while "base" in layers[0]:
        base_path = (path.parent / layers[0].pop("base")).resolve()
        layers.insert(0, OmegaConf.load(base_path))
        path = base_path
    merged = OmegaConf.merge(*layers)
    try:
        changes = OmegaConf.from_dotlist(list(overrides or []))
        for section in SWITCHABLE:
            if section in merged and switched(section, list(overrides or []), merged[section]):
                merged.pop(section)
        merged = OmegaConf.merge(merged, changes)
    except Exception as err:  # omegaconf raises several grammar errors
        raise ValueError(f"bad override in {overrides}: {err}") from None
    OmegaConf.set_struct(merged, False)
    return merged
