"""Do cache rankings agree across models? The analysis behind results/transfer/ (``kvc-report --table``).

A cache's score on a model is against that model's own full cache: on long texts, the mean over the texts t of
log(ppl_cache(t) / ppl_full(t)) (prefill-then-score perplexity; lower is better); on RULER, the needle accuracy
(higher is better). Two models agree as far as Kendall's tau-b of their scores over the caches both measured says
(the full cache left out: it is the reference), with a 95% bootstrap interval over those caches
(``kvcompress.eval.stats.kendall_tau_ci``). A pair of caches holds when every model orders it the same way, else
it flips; a model separates the pair when the two caches' bootstrap intervals do not overlap.

Records are the builder's (``expr.Rec``) or plain dicts; models are passed in, in the order the tables show them.
"""
from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

from kvcompress.eval.stats import kendall_tau, kendall_tau_ci

FULL = "full"  # the label of the identity cache on every axis: the reference
TAU_RESAMPLES = 2000


def cache_label(r: Mapping) -> str:
    """The cache by its three axes, e.g. ``int4 x snapkv 0.5 x cla 0.2``; ``full`` for the identity on each."""
    s, sp, p, pp, lay, lp = (r["storage"], r["storage_params"], r["policy"], r["policy_params"], r["layout"],
                             r["layout_params"])
    parts = []
    if s != "dense":
        parts.append(f"{s} {sp['rank_fraction']:g}" if s == "latent" else f"{s}-{sp['bits']}" if s in
                     ("kivi", "kvquant") else s)
    if p != "none":
        scorer = pp.get("scorer", {}).get("_target_", "").rsplit(".", 1)[-1].lower()
        parts.append(f"{p}({scorer}) {pp['budget']:g}" if scorer else f"{p} {pp['budget']:g}")
    if lay != "per_layer":
        parts.append(f"{lay} {lp['share_fraction']:g}" if "share_fraction" in lp else lay)
    return " x ".join(parts) or FULL


def text_scores(records: Iterable[Mapping]) -> dict[str, dict[str, dict[str, Mapping]]]:
    """model -> text -> cache label -> metrics, of the eval=prefill_decode records."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["eval"] == "prefill_decode":
            out[r["model"]][r["eval_params"]["dataset"]][cache_label(r)] = r["metrics"]
    return out


def ruler_scores(records: Iterable[Mapping]) -> dict[str, dict[str, Mapping]]:
    """model -> cache label -> metrics, of the eval=ruler records."""
    out: dict = defaultdict(dict)
    for r in records:
        if r["eval"] == "ruler":
            out[r["model"]][cache_label(r)] = r["metrics"]
    return out


def ruler_accuracy(ruler: Mapping[str, Mapping[str, Mapping]]) -> dict[str, dict[str, float]]:
    """model -> cache -> accuracy, for the models whose full cache finds some needle (the others rank nothing)."""
    return {m: {c: v["accuracy"] for c, v in caches.items()} for m, caches in ruler.items()
            if caches.get(FULL, {}).get("accuracy", 0) > 0}


def one_axis_families(records: Iterable[Mapping]) -> dict[str, set[str]]:
    """Caches that change one axis only: storages (no policy, per-layer), policies (dense, per-layer)."""
    out: dict[str, set[str]] = {"storage alone": set(), "policy alone (prefill)": set()}
    for r in records:
        changed = [r["storage"] != "dense", r["policy"] != "none", r["layout"] != "per_layer"]
        if changed == [True, False, False]:
            out["storage alone"].add(cache_label(r))
        elif changed == [False, True, False]:
            out["policy alone (prefill)"].add(cache_label(r))
    return out


def keys_in_all(mappings: Iterable[Mapping]) -> set:
    """The keys every one of ``mappings`` holds (none of none)."""
    sets = [set(m) for m in mappings]
    return set.intersection(*sets) if sets else set()


def mean_log_ppl_ratio(texts: Mapping[str, Mapping[str, Mapping]], which: list[str]) -> dict[str, float]:
    """cache -> mean over the texts ``which`` of log(ppl / ppl_full), for the caches measured on each of them;
    {} without texts or without the full cache on one."""
    if not which or any(FULL not in texts[t] for t in which):
        return {}
    return {c: sum(math.log(texts[t][c]["ppl"] / texts[t][FULL]["ppl"]) for t in which) / len(which)
            for c in sorted(keys_in_all(texts[t] for t in which))}


def ranked(scores: Mapping[str, float]) -> list[str]:
    """The caches, the full cache first, then by score, lowest first."""
    return sorted(scores, key=lambda c: (c != FULL, scores[c]))


def family_orders(scores: Mapping[str, Mapping[str, float]], members: set[str]) -> dict[str, list[str]]:
    """model -> the ``members`` that every model scored, lowest score first."""
    common = keys_in_all(scores.values()) & set(members)
    return {m: [c for c in ranked(s) if c in common] for m, s in scores.items()}


def tau_row(model_a: str, model_b: str, scores_a: Mapping[str, float], scores_b: Mapping[str, float],
            on: str) -> dict | None:
    """Kendall's tau-b of two models' scores over the caches both scored (full left out), its 95% bootstrap
    interval and what it says; None under 3 caches."""
    common = sorted((set(scores_a) & set(scores_b)) - {FULL})
    if len(common) < 3:
        return None
    x, y = [scores_a[c] for c in common], [scores_b[c] for c in common]
    tau, (low, high) = kendall_tau(x, y), kendall_tau_ci(x, y, resamples=TAU_RESAMPLES, seed=0)
    verdict = ("agree beyond chance (the interval excludes 0)" if low > 0 else
               "disagree (the interval is below 0)" if high < 0 else "are not told apart from unrelated orders")
    return {"model_a": model_a, "model_b": model_b, "on": on, "caches": len(common), "tau": tau, "low": low,
            "high": high, "verdict": verdict}


def separated(a: Mapping, b: Mapping, key: str) -> bool:
    """Do the two caches' bootstrap intervals on ``key`` not overlap?"""
    lo, hi = f"{key}/ci_low", f"{key}/ci_high"
    return all(k in a and k in b for k in (lo, hi)) and (a[hi] < b[lo] or b[hi] < a[lo])


def order_sign(difference: float, better_low: bool) -> int:
    """+1 when the first of two caches is the better (a score ``difference`` in the better direction), -1 the
    worse, 0 a tie."""
    return 0 if difference == 0 else 1 if (difference < 0) == better_low else -1


def pair_verdicts(scores: Mapping[str, Mapping[str, float]], models: list[str], better_low: bool = True,
                  intervals: Mapping[str, Mapping[str, Mapping]] | None = None, key: str = "ppl") -> dict:
    """Every pair of caches that all ``models`` scored (full left out): ``held`` ('a > b': a is better on every
    model) or ``flipped`` (the order on each model); each notes the models that separate the pair, by the
    intervals on ``key`` in ``intervals`` (model -> cache -> metrics; None: no model separates any pair)."""
    held, flipped = [], []
    for c1, c2 in itertools.combinations(sorted(keys_in_all(scores[m] for m in models) - {FULL}), 2):
        signs = [order_sign(scores[m][c1] - scores[m][c2], better_low) for m in models]
        apart = [m for m in models if intervals is not None and separated(intervals[m][c1], intervals[m][c2], key)]
        note = f"separated on {', '.join(apart) or 'none'}"
        if all(s == signs[0] != 0 for s in signs):
            win, lose = (c1, c2) if signs[0] > 0 else (c2, c1)
            held.append(f"{win} > {lose} ({note})")
        else:
            orders = (f"{m} {'>' if s > 0 else '<' if s < 0 else '='}" for m, s in zip(models, signs, strict=True))
            flipped.append(f"{c1} vs {c2}: {', '.join(orders)} ({note})")
    return {"held": held, "flipped": flipped}

