"""lm-eval ``model_args`` -> the kvc Hydra config: one source of truth for model, cache and their options.

``model=smollm2-135m,cache=h2o,cache.budget=256`` is composed exactly like ``kvc model=smollm2-135m
cache=h2o cache.budget=256`` (conf/config.yaml, conf/cache/h2o.yaml, ...), so every option, default and
check of the Hydra configs applies; nothing is parsed twice.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig


def _render(value: Any) -> str:
    """A parsed lm-eval arg value back to Hydra override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def compose(overrides: dict[str, Any]) -> DictConfig:
    """The kvc config with ``overrides`` applied; a clear ValueError for unknown names or keys."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from kvcompress.run import CONF_DIR  # registers the kvc_shared / kvc_data resolvers

    args = [f"{k}={_render(v)}" for k, v in overrides.items()]
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app: reuse its search path
            return hydra_compose("config", overrides=args)
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return hydra_compose("config", overrides=args)
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(f"kvcompress model_args {','.join(args)!r}: {e}") from e


@dataclass
class Built:
    model: Any
    tokenizer: Any
    cache: Any
    data_dir: Path
    seed: int
    name: str
    cache_name: str


def build(cfg: DictConfig, cache_name: str, check: Callable[[int], None] | None = None) -> Built:
    """Validate (cache.setup, then ``check(max_position)``, before weights load), load, calibrate: as ``kvc``."""
    from hydra.utils import instantiate

    from kvcompress.engine.loaders import DTYPES, load, read_config, resolve_source
    from kvcompress.eval.calibration import Calibration
    from kvcompress.run import resolve_device

    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {cfg.dtype!r}; valid choices: {', '.join(DTYPES)}")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    try:
        cache = instantiate(cfg.cache, _convert_="all")
    except Exception as e:  # Hydra wraps the strategy's own ValueError (it names the setting and its range)
        cause = e.__cause__ or e
        raise ValueError(f"kvcompress model_args: cache={cache_name}: {cause}") from e
    source = resolve_source(str(cfg.model.source), cfg.paths.models)
    config = read_config(source, cfg.model.name)
    cache.setup(config.spec())
    if check is not None:
        check(config.max_position)
    model, tokenizer = load(source, cfg.model.name, device, DTYPES[cfg.dtype])
    data_dir = Path(cfg.paths.data).expanduser()
    cal = cfg.calibration
    cache.calibrate(Calibration(model, tokenizer, data_dir, cal.dataset, cal.tokens, cal.window,
                                Path(cfg.paths.calibration).expanduser(), progress=bool(cfg.progress)))
    return Built(model, tokenizer, cache, data_dir, int(cfg.seed), str(cfg.model.name), cache_name)
