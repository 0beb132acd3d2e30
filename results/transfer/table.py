"""The transfer study's tables from results/transfer/records.jsonl (written by run.sh):

    .venv/bin/python results/transfer/table.py > results/transfer/README.md

Per model, the caches ranked by their quality loss against the model's own full cache: on the long texts the score
is mean over texts of log(ppl_cache / ppl_full) (prefill-then-score perplexity, lower is better), on RULER the
needle accuracy (higher is better). Between two models, Kendall's tau-b of those scores over the caches both
measured (the full cache left out: it is the reference), with a 95% bootstrap interval over the caches
(``kvcompress.eval.stats.kendall_tau_ci``), on the texts both models were scored on. "Which conclusions transfer" is
every pair of caches: the same order on every model, or a flip, and whether each model's intervals separate the
two. Every figure printed comes from a record; nothing here is typed in.
"""
from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

from kvcompress.eval.stats import kendall_tau, kendall_tau_ci

HERE = Path(__file__).resolve().parent
MODELS = ["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"]  # by size; the largest leads the summary


def load(path: Path = HERE / "records.jsonl") -> list[dict]:
    """Ok records, the last one of each config (a re-run replaces an earlier one)."""
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        r = json.loads(line)
        if r["status"] == "ok":
            latest[r["config_hash"]] = r
    return list(latest.values())


def label(r: dict) -> str:
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
        parts.append(f"{lay} {lp.get('share_fraction', ''):g}" if "share_fraction" in lp else lay)
    return " x ".join(parts) or "full"


def fmt_ci(m: dict, key: str, spec: str) -> str:
    lo, hi = m.get(f"{key}/ci_low"), m.get(f"{key}/ci_high")
    return f"{m[key]:{spec}}" + (f" [{lo:{spec}}, {hi:{spec}}]" if lo is not None else "")


def text_scores(records: list[dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """model -> text -> cache label -> metrics, eval=prefill_decode."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r["eval"] == "prefill_decode":
            out[r["model"]][r["eval_params"]["dataset"]][label(r)] = r["metrics"]
    return out


def ruler_scores(records: list[dict]) -> dict[str, dict[str, dict]]:
    out: dict = defaultdict(dict)
    for r in records:
        if r["eval"] == "ruler":
            out[r["model"]][label(r)] = r["metrics"]
    return out


def families(records: list[dict]) -> dict[str, set[str]]:
    """Caches that change one axis only: storages (no policy, per-layer), policies (dense, per-layer)."""
    out: dict[str, set[str]] = {"storage alone": set(), "policy alone (prefill)": set()}
    for r in records:
        one = [r["storage"] != "dense", r["policy"] != "none", r["layout"] != "per_layer"]
        if one == [True, False, False]:
            out["storage alone"].add(label(r))
        elif one == [False, True, False]:
            out["policy alone (prefill)"].add(label(r))
    return out


def loss(texts: dict[str, dict[str, dict]], which: list[str]) -> dict[str, float]:
    """cache -> mean over the texts ``which`` of log(ppl / ppl_full); caches measured on each of them."""
    names = set.intersection(*(set(texts[t]) for t in which)) if which else set()
    if not which or any("full" not in texts[t] for t in which):
        return {}
    return {c: sum(math.log(texts[t][c]["ppl"] / texts[t]["full"]["ppl"]) for t in which) / len(which)
            for c in names}


def separated(a: dict, b: dict, key: str) -> bool:
    """Do the two caches' bootstrap intervals on ``key`` not overlap?"""
    lo, hi = f"{key}/ci_low", f"{key}/ci_high"
    return all(k in a and k in b for k in (lo, hi)) and (a[hi] < b[lo] or b[hi] < a[lo])


def grid_size() -> int:
    """The number of caches in conf/experiment/transfer.yaml's sweep."""
    from omegaconf import OmegaConf

    conf = OmegaConf.load(HERE.parents[1] / "conf" / "experiment" / "transfer.yaml")
    return len(str(conf.hydra.sweeper.params["+experiment/point"]).split(","))


def ranking_table(texts: dict[str, dict[str, dict]]) -> list[str]:
    which = sorted(texts)
    scores = loss(texts, which)
    if not scores:
        return ["(no full-cache record yet: no ranking)", ""]
    head = " | ".join(f"ppl {t} [95% CI]" for t in which)
    lines = [f"| rank | cache | ratio | {head} | mean log(ppl / full) |",
             "|---|---|---|" + "---|" * len(which) + "---|"]
    order = sorted(scores, key=lambda c: (c != "full", scores[c]))
    for i, c in enumerate(order):
        ratio = texts[which[0]][c].get("compression_ratio", float("nan"))
        cells = " | ".join(fmt_ci(texts[t][c], "ppl", ".2f") for t in which)
        lines.append(f"| {'ref' if c == 'full' else i} | {c} | {ratio:.2f} | {cells} | {scores[c]:+.4f} |")
    missing = sorted(set().union(*(set(texts[t]) for t in which)) - set(scores))
    return lines + (["", f"Not on every text (not ranked): {', '.join(missing)}."] if missing else []) + [""]


def tau_line(a: str, b: str, sa: dict[str, float], sb: dict[str, float], what: str) -> tuple[str, str] | None:
    """The table row and the summary's sentence for one pair of models."""
    common = sorted((set(sa) & set(sb)) - {"full"})
    if len(common) < 3:
        return None
    x, y = [sa[c] for c in common], [sb[c] for c in common]
    tau, (lo, hi) = kendall_tau(x, y), kendall_tau_ci(x, y, resamples=2000, seed=0)
    verdict = ("agree beyond chance (the interval excludes 0)" if lo > 0 else
               "disagree (the interval is below 0)" if hi < 0 else "are not told apart from unrelated orders")
    return (f"| {a} | {b} | {what} | {len(common)} | {tau:+.2f} [{lo:+.2f}, {hi:+.2f}] |",
            f"- {a} vs {b}, {what}, {len(common)} caches: tau {tau:+.2f} [{lo:+.2f}, {hi:+.2f}]: the rankings "
            f"{verdict}.")


def pair_verdicts(per_model: dict[str, dict[str, float]], metrics: dict[str, dict[str, dict]], key: str | None,
                  better_low: bool) -> tuple[list[str], list[str]]:
    """Every pair of caches scored on every model: held (same order everywhere) or flipped. ``key``: the metric
    whose intervals (in ``metrics[model][cache]``) say whether a model separates the pair."""
    models = [m for m in MODELS if m in per_model]
    common = sorted(set.intersection(*(set(per_model[m]) for m in models)) - {"full"})
    held, flipped = [], []
    for c1, c2 in itertools.combinations(common, 2):
        signs = []
        for m in models:
            d = per_model[m][c1] - per_model[m][c2]
            signs.append(0 if d == 0 else (1 if (d < 0) == better_low else -1))
        sep = [key is not None and separated(metrics[m][c1], metrics[m][c2], key) for m in models]
        note = "separated on " + (", ".join(m for m, s in zip(models, sep, strict=False) if s) or "none")
        if all(s == signs[0] != 0 for s in signs):
            win, lose = (c1, c2) if signs[0] > 0 else (c2, c1)
            held.append(f"{win} > {lose} ({note})")
        else:
            flipped.append(f"{c1} vs {c2}: " + ", ".join(f"{m} {'>' if s > 0 else '<' if s < 0 else '='}"
                                                        for m, s in zip(models, signs, strict=False)) + f" ({note})")
    return held, flipped


def main() -> None:
    records = load()
    texts, ruler = text_scores(records), ruler_scores(records)
    out = ["# Do the rankings on SmolLM2-135M transfer to Qwen2.5 0.5B / 1.5B? (issue 23)", "",
           "Re-run: `bash results/transfer/run.sh` (records), then `.venv/bin/python results/transfer/table.py > "
           "results/transfer/README.md` (this file). Sizes and protocol: see the header of `run.sh`; every figure "
           "below comes from `records.jsonl`.", ""]
    some = next((r for r in records if r["eval"] == "prefill_decode"), None)
    if some:
        p = some["eval_params"]
        out += [f"Perplexity: eval=prefill_decode, {p['samples']} pieces of {p['context']} + {p['continuation']} "
                f"tokens per text, the prompt compressed once at its end (policies: when=prefill, budget = a "
                f"fraction of the prompt), the continuation teacher-forced {p['continuation_chunk']} tokens at a "
                f"time; 95% intervals resample the pieces ({p['samples']} per text: a rough spread, not a test). "
                f"ratio = fp16 reference bytes / bytes held after the last scored token (the fp32 full cache reads "
                f"0.5; a policy's ratio counts the {p['continuation']} continuation tokens, held in full after the "
                f"prompt "
                f"was compressed).", ""]
    # -- per model -------------------------------------------------------------------------------
    per_text_loss, text_metrics, summary = {}, {}, []
    head = len(out)
    for m in MODELS:
        if m not in texts:
            continue
        done = set.union(*(set(t) for t in texts[m].values()))
        out += [f"## {m}: perplexity after the compressed prompt", "",
                f"{len(done)} of the grid's {grid_size()} caches measured (the rest did not fit the CPU time)."
                if len(done) < grid_size() else f"All {len(done)} caches of the grid.", ""] + ranking_table(texts[m])
    if ruler:
        r0 = next(r for r in records if r["eval"] == "ruler")["eval_params"]
        out += [f"## RULER needles ({', '.join(r0['tasks'])}, length {r0['lengths']}, {r0['samples']} prompts "
                f"per task, {r0['protocol']}, chat={r0['chat']})", "",
                "| model | cache | ratio | accuracy [95% CI] |", "|---|---|---|---|"]
        for m in MODELS:
            for c, met in sorted(ruler.get(m, {}).items(), key=lambda kv: (kv[0] != "full", -kv[1]["accuracy"])):
                out.append(f"| {m} | {c} | {met['compression_ratio']:.2f} | {fmt_ci(met, 'accuracy', '.2f')} |")
        out.append("")
        dead = [m for m in ruler if ruler[m].get("full", {}).get("accuracy", 1) == 0]
        if dead:
            out += [f"Full cache accuracy 0 (not ranked on RULER): {', '.join(dead)}.", ""]
    # -- between models --------------------------------------------------------------------------
    out += ["## Between models: Kendall's tau-b of the cache rankings", "",
            "Over the caches both models measured (full cache left out), 95% bootstrap interval over the caches.",
            "", "| model A | model B | scored on | caches | tau [95% CI] |", "|---|---|---|---|---|"]
    for a, b in itertools.combinations([m for m in MODELS if m in texts], 2):
        which = sorted(set(texts[a]) & set(texts[b]))
        row = tau_line(a, b, loss(texts[a], which), loss(texts[b], which), "ppl: " + ", ".join(which))
        if row:
            out.append(row[0])
            summary.append(row[1])
    rl = {m: {c: v["accuracy"] for c, v in ruler[m].items()} for m in ruler
          if ruler[m].get("full", {}).get("accuracy", 0) > 0}
    for a, b in itertools.combinations([m for m in MODELS if m in rl], 2):
        row = tau_line(a, b, rl[a], rl[b], "RULER accuracy")
        if row:
            out.append(row[0])
            summary.append(row[1])
    # -- per axis: does the order within a family transfer ---------------------------------------
    scored = {m: loss(texts[m], sorted(texts[m])) for m in MODELS if m in texts}
    out += ["", "## Per family: the order on each model (perplexity, every text a model was scored on)", "",
            "| family | " + " | ".join(m for m in scored) + " | same order everywhere? |",
            "|---|" + "---|" * len(scored) + "---|"]
    for family, members in families(records).items():
        orders = [[c for c in sorted(scored[m], key=scored[m].get) if c in members] for m in scored]
        common = set.intersection(*(set(o) for o in orders)) if orders else set()
        orders = [[c for c in o if c in common] for o in orders]
        if len(common) < 2:
            continue
        same = "yes" if all(o == orders[0] for o in orders) else "no"
        if len(orders) > 1 and orders[0]:
            summary.append(f"- {family}: the order {'is the same on every model' if same == 'yes' else 'changes'}"
                           f" ({'; '.join(f'{m}: ' + ' < '.join(o) for m, o in zip(scored, orders, strict=False))}).")
        out.append(f"| {family} | " + " | ".join(" < ".join(o) for o in orders) + f" | {same} |")
    out += ["", "('a < b': a loses less perplexity than b.)"]
    # -- which pairwise conclusions hold on every model ------------------------------------------
    shared = sorted(set.intersection(*(set(texts[m]) for m in texts))) if texts else []
    for m in texts:
        per_text_loss[m] = loss(texts[m], shared)
        text_metrics[m] = texts[m][shared[0]] if len(shared) == 1 else {}
    if len(per_text_loss) >= 2 and all(len(v) > 2 for v in per_text_loss.values()):
        key = "ppl" if len(shared) == 1 else None
        held, flipped = pair_verdicts(per_text_loss, text_metrics, key, better_low=True)
        n = len(held) + len(flipped)
        both = [x for x in flipped if "separated on none" not in x]
        summary.append(f"- Pairs of caches (perplexity on {', '.join(shared)}): {len(held)} of {n} keep their order "
                       f"on every model, {len(flipped)} flip; of the flips, {len(both)} are separated by the "
                       f"intervals on some model (the rest lie within the intervals on every model).")
        out += ["", f"## Which pairwise conclusions transfer (perplexity on {', '.join(shared)}, models "
                f"{', '.join(m for m in MODELS if m in per_text_loss)})", "",
                f"Of {n} pairs of caches, {len(held)} keep their order on every model and {len(flipped)} flip. "
                "'a > b' = a loses less perplexity; 'separated on' = the models whose intervals do not overlap.", "",
                "<details><summary>Pairs that flip</summary>", ""] + [f"- {x}" for x in flipped] + \
               ["", "</details>", "", "<details><summary>Pairs that hold</summary>", ""] + \
               [f"- {x}" for x in held] + ["", "</details>", ""]
    largest = next((m for m in reversed(MODELS) if scored.get(m)), None)
    order = [c for c in sorted(scored[largest], key=scored[largest].get) if c != "full"] if largest else []
    if order:
        summary.insert(0, f"- {largest}, the largest model, ranks the caches (least perplexity lost first, on "
                          f"{', '.join(sorted(texts[largest]))}): {' < '.join(order)}.")
    summary += ["", "Why storage=int4 falls on the Qwen models (a cause measured outside the records): "
                "`.venv/bin/python results/transfer/key_bias.py` prints their key projections' biases: a few "
                "channels carry biases of a few hundred (Qwen2.5-1.5B: in layer 0) against a median below 1. "
                "storage=int4 codes each token's keys in groups of 64 channels with one min-max range, so such a "
                "channel sets the step of its group; KIVI-2 and KVQuant-3 code keys per channel and do not "
                "share that step. A conclusion about per-token key quantization drawn on SmolLM2 (a Llama model: "
                "no key biases) does not carry over."]
    out[head:head] = ["## What transfers (computed from the tables below)", ""] + summary + [""]
    out += checks(load(HERE / "checks" / "records.jsonl"))
    print("\n".join(out))


def checks(records: list[dict]) -> list[str]:
    """Issue 23's "Done means" commands (run.sh checks): each record's headline metric."""
    if not records:
        return []
    out = ["## Issue 23's commands (`run.sh checks`, small sizes)", "", "| model | cache | eval | result |",
           "|---|---|---|---|"]
    for r in records:
        m = r["metrics"]
        if r["eval"] == "ruler":
            lengths = r["eval_params"]["lengths"]
            res = ", ".join(f"{n}: {fmt_ci(m, f'all/{n}/acc', '.2f')}" for n in lengths if f"all/{n}/acc" in m)
            res = f"accuracy by length {res}"
        else:
            res = f"ppl {fmt_ci(m, 'ppl', '.2f')}"
        out.append(f"| {r['model']} | {label(r)} | {r['eval']} | {res} |")
    return out + [""]


if __name__ == "__main__":
    main()
