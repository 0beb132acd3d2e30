"""The evaluation contract: validate settings before weights load, then run with a cache in the loop."""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kvcompress.cache.base import KVCache, ModelSpec
from kvcompress.engine.model import Transformer


@dataclass
class EvalContext:
    model: Transformer
    tokenizer: Any
    cache: KVCache
    data_dir: Path
    seed: int = 0
    progress: bool = True


class Evaluation(ABC):
    """One evaluation mode (``eval=<name>``). Subclasses are dataclasses of their settings."""

    def check(self, spec: ModelSpec, data_dir: Path, tokenizer=None) -> None:
        """Raise ValueError naming the setting and its range; runs before any weights load. ``tokenizer`` (loaded
        without the weights, when the run has one) lets a check count a text's tokens."""

    # False: the evaluation only teacher-forces text (no prompt, so no ``KVCache.end_prompt``); a cache that acts
    # when the prompt ends (``policy.when=prefill|both``) would never act and is refused (``check_cache``)
    defines_prompt: ClassVar[bool] = True

    def check_cache(self, cache: KVCache) -> None:
        """Raise ValueError when the evaluation cannot measure ``cache`` (runs before any weights load)."""
        if not self.defines_prompt and cache.acts_at_prompt_end():
            name = getattr(self, "name", type(self).__name__)
            raise ValueError(
                f"policy.when=prefill|both compresses the cache when the prompt ends, and eval={name} has no prompt "
                "(every window is teacher-forced): the run would measure the full cache under the compressed "
                "cache's name. Use eval=prefill_decode (a prompt of eval.context tokens, then the continuation "
                "scored; eval.continuation_chunk > 1 teacher-forces it) or policy.when=decode")

    @abstractmethod
    def run(self, ctx: EvalContext) -> dict[str, float]:
        """Metrics of this evaluation, including the cache's memory report."""

    def params(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}


def require(ok: bool, setting: str, allowed: str, got: Any) -> None:
    """Raise a ValueError that names the setting, its allowed range and the value given."""
    if not ok:
        raise ValueError(f"{setting} must be {allowed}, got {got!r}")
