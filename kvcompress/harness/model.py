"""The ``kvcompress`` model registered with lm-eval: model args -> a kvc config -> the evaluation layer's LM.

    kvc-lm-eval --model kvcompress --model_args model=smollm2-135m,policy=h2o,policy.budget=256 --tasks ...

The LM's own options (``batch_size``, ``chunk``, ``prefill_chunk``, ``window``, ``bos``, ``rolling``,
``max_length``, ``max_gen_toks``; ``kvcompress.eval.lm_model``) are taken out; every other arg is a kvc Hydra
override (``model``, ``storage``, ``policy``, ``layout`` and their settings, ``dtype``, ``device``, ``seed``,
``paths.*``, ``calibration.*``), composed from conf/ and built like ``kvc`` builds a run (``config.py``).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from kvcompress.eval.lm_model import KVCompressLM, length_checks

log = logging.getLogger(__name__)
LM_OPTIONS = set(inspect.signature(KVCompressLM.__init__).parameters) - {"self", "loaded"}


def _device(value: str | None) -> str | None:
    if value and value.startswith("cuda") and not torch.cuda.is_available():
        log.warning("kvcompress: device=%s but CUDA is not available; using cpu", value)
        return "cpu"
    return value


class HarnessLM(KVCompressLM):
    """``--model kvcompress``: composes and builds the model and cache from model args, then scores as the LM."""

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> HarnessLM:
        """lm-eval's CLI passes its own ``--batch_size`` (default 1), ``--max_batch_size`` and ``--device`` beside
        the model args: a setting given in ``--model_args`` wins over the CLI's (never a duplicate keyword)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> HarnessLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def __init__(self, **args: Any) -> None:
        from kvcompress.harness.config import build, compose
        from kvcompress.job import cache_fields

        options = {k: args.pop(k) for k in list(args) if k in LM_OPTIONS}
        if device := _device(args.pop("device", None)):
            args["device"] = device
        cfg = compose(args)
        check = length_checks(options.get("max_length"), options.get("window"))  # before weights load
        super().__init__(**options, loaded=build(cfg, cache_fields(cfg)["cache"], check))
