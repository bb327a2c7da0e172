"""Recipe configs: YAML files merged over their ``base:`` file, then ``key=value`` overrides."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]


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
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides or [])))
    except Exception as err:  # omegaconf raises several grammar errors
        raise ValueError(f"bad override in {overrides}: {err}") from None
    OmegaConf.set_struct(merged, False)
    return merged
