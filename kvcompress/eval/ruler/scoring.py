"""RULER's string-match scores (Hsieh et al., 2024), per sample, case-insensitive substring tests.

For an output o and references r_1..r_m (both lower-cased):
  all-of   s(o) = (1/m) * sum_j [r_j in o]    (needles, variable tracking, word extraction)
  part-of  s(o) = max_j [r_j in o]            (QA: any accepted answer)
Extra text around a reference does not count against it.
"""
from __future__ import annotations

from collections.abc import Sequence


def string_match_all(output: str, references: Sequence[str]) -> float:
    text = output.lower()
    return sum(r.lower() in text for r in references) / len(references)


def string_match_part(output: str, references: Sequence[str]) -> float:
    text = output.lower()
    return float(any(r.lower() in text for r in references))


SCORERS = {"all": string_match_all, "part": string_match_part}


def score(output: str, references: Sequence[str], metric: str = "all") -> float:
    return SCORERS[metric](output, references)
