"""RULER-style long-context suite (Hsieh et al., 2024), generated offline: ``eval=ruler``.

Modules: ``words`` (random keys, values, vocabularies), ``haystack`` (exact-length prompts), ``tasks`` (needles,
variable tracking, word extraction), ``qa`` (hub-only QA), ``scoring`` (string match), ``decode`` (both
protocols, batched greedy answers), ``evaluation`` (the ``Ruler`` evaluation and its metric table).
"""
from kvcompress.eval.ruler.evaluation import ALL_TASKS, PROTOCOLS, Ruler, ruler_table

__all__ = ["ALL_TASKS", "PROTOCOLS", "Ruler", "ruler_table"]
