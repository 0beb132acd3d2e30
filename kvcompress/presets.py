"""The presets under ``conf/<axis>/`` (``conf/policy/h2o.yaml`` ...) read as Hydra composes them, for code that reads
a preset outside a Hydra run (record settings, a run's effective preset, the contract suite, tests).

A preset's defaults list is merged in order, the preset itself at ``_self_`` (last when not listed): ``- name`` or
``- name@_here_`` merges ``name.yaml`` of the same folder (``base/eviction`` a sub-folder) into this node, and
``- sub: choice`` nests ``sub/choice.yaml`` under the key ``sub``; those are the forms conf/ uses (others refused).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _entry(path: Path, entry) -> DictConfig | dict:
    """One defaults-list entry of the preset at ``path``, as the node it merges."""
    if isinstance(entry, str):
        name, _, package = entry.partition("@")
        if package not in ("", "_here_"):
            raise ValueError(f"{path}: defaults entry {entry!r}: only '@_here_' packages are read outside Hydra")
        return load(path.parent / f"{name}.yaml")
    if not isinstance(entry, (dict, DictConfig)) or len(entry) != 1 or "@" in next(iter(entry)):
        raise ValueError(f"{path}: defaults entry {entry!r}: expected 'name', 'name@_here_' or 'group: choice'")
    (sub, choice), = entry.items()
    return {sub: load(path.parent / sub / f"{choice}.yaml")}


def load(path: Path | str) -> DictConfig:
    """The preset at ``path`` with its defaults list resolved (what ``kvc <axis>=<name>`` composes)."""
    path = Path(path)
    cfg = OmegaConf.load(path)
    entries = list(cfg.pop("defaults", None) or [])
    if "_self_" not in entries:
        entries.append("_self_")
    out = OmegaConf.create({})
    for entry in entries:
        out = OmegaConf.merge(out, cfg if entry == "_self_" else _entry(path, entry))
    return out


def names(axis: str) -> list[str]:
    """The built-in presets of an axis: ``conf/<axis>/*.yaml`` (sub-folders hold bases and nested nodes)."""
    return sorted(p.stem for p in (CONF_DIR / axis).glob("*.yaml"))


def settings(axis: str, name: str) -> dict:
    """``conf/<axis>/<name>.yaml`` resolved, as a plain dict with interpolations unresolved ({} when there is no
    such preset)."""
    path = CONF_DIR / axis / f"{name}.yaml"
    if not path.is_file():
        return {}
    conf = OmegaConf.to_container(load(path), resolve=False)
    return conf if isinstance(conf, dict) else {}
