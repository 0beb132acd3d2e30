"""One job from a composed config: the cache from its three axes (or the ``cache=`` escape hatch), the record's
cache fields, and validate -> load -> calibrate. ``kvc`` and ``kvc-lm-eval`` both build runs here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kvcompress.cache import ComposedCache, KVCache
from kvcompress.presets import names, settings

AXES = ("storage", "policy", "layout")
IDENTITY = {"storage": "dense", "policy": "none", "layout": "per_layer"}


def presets(axis: str) -> dict[str, dict]:
    """``conf/<axis>/<name>.yaml`` -> its settings (``_target_`` included), defaults lists resolved."""
    return {name: settings(axis, name) for name in names(axis)}


def effective_choice(axis: str, choice: str, settings: dict) -> str:
    """The preset a run's settings make: ``storage=int4 storage.bits=8`` is int8 (so recorded). A preset's defining
    settings are those in which it differs from a sibling preset (same class) in that one setting only (int4 vs
    int8: ``bits``); when the run changes one to a sibling's value, the run is that sibling (its other settings
    then show as changes against the sibling's file)."""
    known = presets(axis)
    mine = known.get(choice)
    if mine is None:
        return choice
    for name, other in known.items():
        if name == choice or other.get("_target_") != mine.get("_target_") or set(other) != set(mine):
            continue
        differ = [k for k in mine if k != "_target_" and other[k] != mine[k]]
        if len(differ) == 1 and settings.get(differ[0], mine[differ[0]]) == other[differ[0]]:
            return name
    return choice


def choices(cfg: DictConfig) -> dict[str, str]:
    """The config-group choice of each axis (and ``cache``, ``eval``): from Hydra, else from the config itself."""
    from hydra.core.hydra_config import HydraConfig

    try:
        found = dict(HydraConfig.get().runtime.choices)
    except ValueError:  # compose API or tests: composed with return_hydra_config, or named by _target_
        found = dict(OmegaConf.select(cfg, "hydra.runtime.choices", default={}) or {})
    for axis in AXES:
        if not found.get(axis) and cfg.get(axis) is not None:
            found[axis] = str(cfg[axis]._target_).rsplit(".", 1)[-1].lower()
    return {k: str(v) for k, v in found.items() if v is not None}


def params(node: Any) -> dict:
    return {k: v for k, v in (node or {}).items() if k not in ("_target_", "_partial_")}


def cache_fields(cfg: DictConfig) -> dict:
    """Record fields: each axis and its settings apart, a short readable name (identity axes left out, ``full``
    when all are), and ``cache_params`` merged (``policy.budget`` ...) for tables."""
    resolved = {g: OmegaConf.to_container(cfg[g], resolve=True) if cfg.get(g) is not None else None
                for g in (*AXES, "cache")}
    names = choices(cfg)
    if resolved.get("cache"):
        name = names.get("cache") or str(resolved["cache"].get("_target_", "?")).rsplit(".", 1)[-1]
        return {"cache": name, "cache_params": params(resolved["cache"]),
                **{axis: None for axis in AXES}, **{f"{axis}_params": None for axis in AXES}}
    fields: dict[str, Any] = {}
    merged: dict[str, Any] = {}
    for axis in AXES:
        fields[f"{axis}_params"] = params(resolved.get(axis))
        fields[axis] = effective_choice(axis, names.get(axis, "?"), fields[f"{axis}_params"])
        merged.update({f"{axis}.{k}": v for k, v in fields[f"{axis}_params"].items()})
    short = [fields[axis] for axis in AXES if fields[axis] != IDENTITY[axis]]
    return {"cache": "+".join(short) or "full", "cache_params": merged, **fields}


def build_cache(cfg: DictConfig) -> KVCache:
    """Instantiate the axes (or the escape hatch); a setting's error names the axis choice it belongs to."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    names = choices(cfg)

    def make(group: str):
        try:
            return instantiate(cfg[group], _convert_="all")
        except InstantiationException as e:  # Hydra wraps the class's own ValueError (setting + range)
            raise ValueError(f"{group}={names.get(group, '?')}: {e.__cause__ or e}") from e

    if cfg.get("cache"):
        chosen = [f"{a}={names.get(a)}" for a in AXES if names.get(a, IDENTITY[a]) != IDENTITY[a]]
        if chosen:
            raise ValueError(f"cache={names.get('cache')} implements the whole cache interface; it cannot be combined "
                             f"with {' '.join(chosen)} (drop them, or use the three axes instead of cache=)")
        return make("cache")
    return ComposedCache(**{axis: make(axis) for axis in AXES})


def check_combination(cache: KVCache, cfg: DictConfig) -> None:
    """Combinations refused before weights load, naming both choices: a policy whose heads keep different numbers
    of tokens (``uneven_heads``: AdaKV, DuoAttention, per-head global budgets) over a MiniCache pair, which re-packs
    the pair's merged parts and cannot hold them."""
    from kvcompress.cache.layout.minicache import MiniCache

    if isinstance(cache, ComposedCache) and isinstance(cache.layout, MiniCache) and \
            getattr(cache.policy, "uneven_heads", False):
        names = choices(cfg)
        policy, layout = f"policy={names.get('policy', '?')}", f"layout={names.get('layout', 'minicache')}"
        raise ValueError(f"{policy} {layout}: {policy} keeps a different number of tokens per KV head, which "
                         f"{layout} cannot hold (a merged pair re-packs its parts for both layers); choose "
                         "layout=per_layer or layout=cla, or a policy that keeps the same tokens in every head "
                         "(e.g. policy=snapkv)")


def setup_cache(cache: KVCache, spec, cfg: DictConfig) -> None:
    """``cache.setup`` with the axis choices named in an impossible combination's error."""
    check_combination(cache, cfg)
    try:
        cache.setup(spec)
    except ValueError as e:
        names = choices(cfg)
        combo = " ".join(f"{a}={names[a]}" for a in (*AXES, "cache") if names.get(a))
        raise ValueError(f"{combo}: {e}") from e


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; valid choices here: auto, cpu")
    return torch.device(name)


def _tokenizer_or_none(load_tokenizer, source):
    """The tokenizer for the pre-load checks, or None where it cannot load yet (they then count bytes; loading
    the model reports the real problem)."""
    try:
        return load_tokenizer(source)
    except Exception:
        return None


@dataclass
class Prepared:
    model: Any
    tokenizer: Any
    cache: KVCache
    data_dir: Path
    device: torch.device


def prepare(cfg: DictConfig, check=None, check_cache=None) -> Prepared:
    """Validate everything (cache settings against the model's dimensions, ``check_cache(cache)``, then
    ``check(spec, data_dir, tokenizer)``) before any weights load; then load the model and calibrate the cache."""
    from kvcompress.engine.loaders import DTYPES, load, load_tokenizer, read_config, resolve_source
    from kvcompress.eval.calibration import Calibration

    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}; valid choices: {', '.join(DTYPES)}")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    cache = build_cache(cfg)
    source = resolve_source(str(cfg.model.source), cfg.paths.models)
    config = read_config(source, cfg.model.name)
    setup_cache(cache, config.spec(), cfg)
    if check_cache is not None:  # the evaluation against the cache (eval=ppl refuses prefill-time policies)
        check_cache(cache)
    data_dir = Path(cfg.paths.data).expanduser()
    if check is not None:  # the tokenizer loads without the weights: checks may count a text's tokens
        check(config.spec(), data_dir, _tokenizer_or_none(load_tokenizer, source))
    # -- everything above is validation; weights load below ----------------------------------------
    model, tokenizer = load(source, cfg.model.name, device, DTYPES[cfg.dtype])
    cal = cfg.calibration
    cache.calibrate(Calibration(model, tokenizer, data_dir, cal.dataset, cal.tokens, cal.window,
                                Path(cfg.paths.calibration).expanduser(), progress=bool(cfg.progress)))
    return Prepared(model, tokenizer, cache, data_dir, device)
