"""Rewards from other packages, loaded only when a config names them.

Two explicit ways: an entry point in group ``diffrl.rewards`` (declared in the plugin's pyproject as
``[project.entry-points."diffrl.rewards"] myreward = "mypkg.module:MyReward"``) loaded by its name,
and a ``module:attr`` reference. Listing installed names reads package metadata only: a plugin that
is installed but not named never has its code imported.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

GROUP = "diffrl.rewards"


def entry_point_names() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def find_entry_point(name: str) -> EntryPoint | None:
    found = {ep.value: ep for ep in entry_points(group=GROUP) if ep.name == name}
    if len(found) > 1:
        # Refuse to guess which package's code to run.
        raise ValueError(f"reward {name!r} is declared by several installed packages ({', '.join(sorted(found))}); "
                         "uninstall all but one or use a module:attr reference")
    return next(iter(found.values()), None)


def load_reference(reference: str):
    """The object named by ``package.module:attr`` (``attr`` may be dotted)."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward reference {reference!r} must look like 'package.module:ClassName'")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve(name: str):
    """The reward factory for a ``module:attr`` reference or an entry-point name, else None."""
    if ":" in name:
        return load_reference(name)
    ep = find_entry_point(name)
    return ep.load() if ep is not None else None
