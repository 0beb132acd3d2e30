"""lm-eval ``model_args`` -> the kvc Hydra config: one source of truth for model, cache and their options.

``model=smollm2-135m,storage=kivi,policy=h2o,policy.budget=256`` is composed exactly like ``kvc
model=smollm2-135m storage=kivi policy=h2o policy.budget=256`` (conf/config.yaml, conf/policy/h2o.yaml, ...),
and built by the same code (``kvcompress.job.prepare``), so every option, default and check applies.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from kvcompress.eval.lm_model import Loaded


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
            return hydra_compose("config", overrides=args, return_hydra_config=True)
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return hydra_compose("config", overrides=args, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(f"kvcompress model_args {','.join(args)!r}: {e}") from e


def build(cfg: DictConfig, cache_name: str, check: Callable[[int], object] | None = None) -> Loaded:
    """Validate (cache settings, then ``check(max_position)``, before weights load), load, calibrate: as ``kvc``."""
    from kvcompress.job import prepare

    run = prepare(cfg, None if check is None else lambda spec, _data_dir, _tokenizer: check(spec.max_position))
    return Loaded(run.model, run.tokenizer, run.cache, str(cfg.model.name), cache_name)
