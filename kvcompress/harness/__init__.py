"""lm-evaluation-harness integration: the ``kvcompress`` model and the offline ``kvc_*`` tasks.

Importing this package registers the model under the name ``kvcompress`` in lm-eval's registry
(lm-eval 0.4.x has no plugin discovery, so something must import it: ``kvc-lm-eval`` /
``python -m kvcompress.harness`` do; ``eval=lm_eval`` passes its LM object and needs no registration).
"""
from __future__ import annotations

import lm_eval.models  # noqa: F401  (fills lm-eval's lazy model table first: get_model skips it once non-empty)
from lm_eval.api.registry import model_registry

from kvcompress.eval.harness import LOCAL_TASKS, TASKS_DIR  # the offline kvc_* tasks

MODEL_NAME = "kvcompress"

if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME, target="kvcompress.harness.model:HarnessLM")

__all__ = ["LOCAL_TASKS", "MODEL_NAME", "TASKS_DIR"]
