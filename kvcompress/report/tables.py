"""One table builder for every results folder: ``kvc-report --table results/<exp>`` writes the documents that
``results/<exp>/table.yaml`` describes from the folder's committed records.

A spec (YAML) says which records, how rows are chosen and grouped, the columns and their formats, and the prose
around the tables; every value is an expression (``report/expr.py``) over the records::

    records: records.jsonl            # read as `records` (file order); default records.jsonl
    let: {full: "first(records, cache='full')"}   # named values, in order, each may use the earlier ones
    documents:
      README.md:                      # written in the folder; its parts are concatenated
        - text: "ppl of the full cache: {{ f'{full.metrics.ppl:.3f}' }}\\n"   # {{ expr }} is replaced
        - when: "full is not None"    # any part: left out when false
          table:
            using: {cut: "2.0"}       # names of this table, bound before its rows
            rows: records             # default: records
            where: "r.status == 'ok'" # each item is `r`
            let: {m: r.metrics}       # per row, in order
            latest: r.config_hash     # one row per key: the last record, at the first one's place
            group: "(r.cache,)"       # one row per key: `rs` its records, `r` the first, `key` the key
            group_let: {n: len(rs)}   # per group, in order
            columns:                  # header: value, or {header, value, for, align}; headers fill {{ }}
              - cache: r.cache
              - {for: "d in devices", header: "tok/s ({{d}})", value: "...", align: right}
            sort: "(r.cache != 'full', row['cache'])"   # `row`: the cells by header
        - plot: {file: ppl.png, series: [{points: records, x: ..., y: ..., label: ...}], xlabel: ..., ylabel: ...}
        - plot: {kind: bars, file: b.png, groups: names, series: [{for: b in budgets, values: ...}], top: ...}
        - for: "model in models"      # any part: repeated per item; `parts` nests a list (a section per model)
          parts: [{text: "## {{model}}\\n"}, {table: ...}]

Helpers beyond ``expr.HELPERS``: ``load(path)`` (records of another file, relative to the folder), ``exists`` and
``read`` (a file of the folder), ``model_config(name)`` (a model's dimensions), ``uniform_groups`` and
``describe`` (layer groups, as the layouts make them), ``fail(message)`` (a check that stops the build),
``settings(r)`` (a record's settings, as summary.md names them), ``sweep_points(experiment)`` (the points of
``conf/experiment/<experiment>.yaml``'s sweep), and the cross-model rankings of ``report/rankings.py``.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from kvcompress.cache.layout.groups import describe, uniform_groups
from kvcompress.engine.loaders import read_config, resolve_source
from kvcompress.presets import CONF_DIR
from kvcompress.records import read_records, record_settings, write_text_atomic
from kvcompress.report import rankings
from kvcompress.report.expr import Rec, SpecError, evaluate, wrap
from kvcompress.report.plots import bar_plot, series_plot

SPEC_FILE = "table.yaml"
TEMPLATE = re.compile(r"\{\{(.+?)\}\}", re.S)
PART_KINDS = ("text", "table", "plot", "parts")
KEYS = {"part": {"when", "for", *PART_KINDS},
        "table": {"using", "rows", "where", "let", "latest", "group", "group_let", "columns", "sort"},
        "plot": {"kind", "file", "series", "groups", "top", "hline", "xlabel", "ylabel", "title", "ylim", "yscale",
                 "size", "label_size", "panels", "columns"}}


def check_keys(spec: dict, what: str, where: str) -> None:
    """A misspelt key is an error naming the valid ones, never silently ignored."""
    unknown = sorted(set(spec) - KEYS[what])
    if unknown:
        raise SpecError(f"{where}: unknown {what} key(s) {', '.join(unknown)}; a {what} takes "
                        f"{', '.join(sorted(KEYS[what]))}")
ALIGN = {"left": "---", "right": "---:", "center": ":---:"}


def model_config(name: str):
    """The dimensions (``engine.config.ModelConfig``) of a model of ``conf/model``, read from its weights' header."""
    return read_config(resolve_source(name), name)


def sweep_points(experiment: str) -> list[str]:
    """The points of ``conf/experiment/<experiment>.yaml``'s ``+experiment/point`` sweep, in its order."""
    conf = OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml")
    return str(conf.hydra.sweeper.params["+experiment/point"]).split(",")


RANKING_HELPERS = (rankings.cache_label, rankings.text_scores, rankings.ruler_scores, rankings.ruler_accuracy,
                   rankings.one_axis_families, rankings.keys_in_all, rankings.mean_log_ppl_ratio, rankings.ranked,
                   rankings.family_orders, rankings.tau_row, rankings.pair_verdicts)


def helpers(folder: Path) -> dict:
    def load(path: str) -> list[Rec]:
        return [wrap(r) for r in read_records(folder / path)]

    return {"load": load, "exists": lambda name: (folder / name).exists(),
            "read": lambda name: (folder / name).read_text(), "model_config": model_config,
            "uniform_groups": uniform_groups, "describe": describe, "settings": record_settings,
            "sweep_points": sweep_points, **{f.__name__: f for f in RANKING_HELPERS}}


def fill(template: str, ns: dict, where: str) -> str:
    """``template`` with every ``{{ expr }}`` replaced by its value (None: empty)."""
    def value(m: re.Match) -> str:
        v = evaluate(m.group(1), ns, where)
        return "" if v is None else str(v)

    return TEMPLATE.sub(value, str(template))


def bind(lets: dict | None, ns: dict, where: str) -> dict:
    """``ns`` with each ``let`` name bound, in order (a later one may use an earlier one)."""
    ns = dict(ns)
    for name, text in (lets or {}).items():
        value = evaluate(text, ns, f"{where} let {name}")
        ns[name] = wrapped(value) if callable(value) else wrap(value)
    return ns


def wrapped(f):
    """A spec's lambda whose result reads as attributes too (``lab(p).latent``)."""
    return lambda *args, **kwargs: wrap(f(*args, **kwargs))


def column_list(spec: list, ns: dict, where: str) -> list[tuple[str, str, str, dict]]:
    """(header, value expression, alignment, extra names) per column, ``for`` columns expanded."""
    out = []
    for i, col in enumerate(spec):
        at = f"{where} column {i + 1}"
        if not isinstance(col, dict):
            raise SpecError(f"{at}: a column is 'header: expression' or {{header, value, for, align}}, not {col!r}")
        if "value" not in col:
            if len(col) != 1:
                raise SpecError(f"{at}: 'header: expression' has one key; got {sorted(col)}")
            (header, value), = col.items()
            out.append((fill(str(header), ns, at), str(value), "left", {}))
            continue
        align = col.get("align", "left")
        if align not in ALIGN:
            raise SpecError(f"{at}: align={align!r}; choose one of {', '.join(ALIGN)}")
        for extra in expand(col.get("for"), ns, at):
            out.append((fill(col.get("header", ""), {**ns, **extra}, at), str(col["value"]), align, extra))
    return out


def expand(loop: str | None, ns: dict, where: str) -> list[dict]:
    """The names each repetition of a ``for: "a, b in expression"`` binds ([{}] without a loop)."""
    if loop is None:
        return [{}]
    names, found, items = str(loop).partition(" in ")
    names = [n.strip() for n in names.split(",")]
    if not found or not all(n.isidentifier() and not n.startswith("_") for n in names):
        raise SpecError(f"{where}: for: {loop!r} is not 'name[, name...] in expression'")
    return [dict(zip(names, item if len(names) > 1 else (item,), strict=True)) for item in evaluate(items, ns, where)]


def row_spaces(spec: dict, ns: dict, where: str) -> list[dict]:
    """The namespace of each row: the items of ``rows`` kept by ``where``, bound by ``let``, deduplicated by
    ``latest`` and grouped by ``group``."""
    items = evaluate(spec.get("rows", "records"), ns, f"{where} rows")  # ns: with the table's `using` names
    spaces = []
    for r in items:
        rns = {**ns, "r": wrap(r)}
        if "where" in spec and not evaluate(spec["where"], rns, f"{where} where"):
            continue
        spaces.append(bind(spec.get("let"), rns, where))
    if "latest" in spec:
        keyed: dict = {}
        for rns in spaces:
            keyed[evaluate(spec["latest"], rns, f"{where} latest")] = rns  # dict: first place, last value
        spaces = list(keyed.values())
    if "group" in spec:
        groups: dict = {}
        for rns in spaces:
            groups.setdefault(evaluate(spec["group"], rns, f"{where} group"), []).append(rns)
        spaces = [{**g[0], "key": key, "rs": [x["r"] for x in g]} for key, g in groups.items()]
        spaces = [bind(spec.get("group_let"), rns, where) for rns in spaces]
    return spaces


def cell(value) -> str:
    return "" if value is None else str(value)


def table_lines(spec: dict, ns: dict, where: str) -> list[str]:
    check_keys(spec, "table", where)
    if "columns" not in spec:
        raise SpecError(f"{where}: a table needs 'columns'")
    ns = bind(spec.get("using"), ns, f"{where} using")  # names of this table alone, bound before its rows
    spaces = row_spaces(spec, ns, where)
    cols = column_list(spec["columns"], ns, where)
    rows = []
    for rns in spaces:
        cells = [cell(evaluate(v, {**rns, **extra}, f"{where} column {h!r}")) for h, v, _, extra in cols]
        rows.append((cells, rns))
    if "sort" in spec:  # `row`: the cells by header (a repeated header: its last column)
        rows.sort(key=lambda x: evaluate(spec["sort"], {**x[1], "row": dict(zip([c[0] for c in cols], x[0],
                                                                                strict=True))}, f"{where} sort"))
    return ["| " + " | ".join(h for h, *_ in cols) + " |", "|" + "".join(ALIGN[a] + "|" for _, _, a, _ in cols),
            *("| " + " | ".join(cells) + " |" for cells, _ in rows)]


def one_series(s: dict, ns: dict, where: str) -> dict:
    """A plot series' points: ``points`` is the list, each item ``p``; ``x``, ``y``, ``label`` and ``interval``
    (low, high) are evaluated per point."""
    pts = [{**ns, "p": wrap(p)} for p in evaluate(s["points"], ns, where)]
    per_point = {key: [evaluate(s[key], p, f"{where} {key}") if key in s else None for p in pts]
                 for key in ("x", "y", "label", "interval")}
    return {"name": fill(s.get("name", ""), ns, where), "marker": fill(s.get("marker", "o"), ns, where),
            "xs": per_point["x"], "ys": per_point["y"], "labels": per_point["label"],
            "intervals": per_point["interval"]}


PLOT_KINDS = ("points", "bars")


def plot_part(spec: dict, ns: dict, out: Path, where: str) -> None:
    """``kind: points`` (default): scatters of one or more series (``for`` repeats one), labelled points, interval
    bars, in one panel or in ``panels`` (each may repeat with ``for``; ``columns`` a row; a panel's keys default to
    the plot's); ``kind: bars``: grouped bars, one per series (``values``) in each of ``groups``, cut at ``top``.
    Both: a dashed baseline ``hline``; ``ylim`` a [low, high] list or an expression."""
    check_keys(spec, "plot", where)
    kind = spec.get("kind", "points")
    if kind not in PLOT_KINDS:
        raise SpecError(f"{where}: plot kind={kind!r}; choose one of {', '.join(PLOT_KINDS)}")
    if kind == "bars":
        common = panel_of({**spec, "series": []}, ns, where)  # its bars are not point series
        series = [{"name": fill(s.get("name", ""), {**ns, **extra}, where),
                   "values": evaluate(s["values"], {**ns, **extra}, f"{where} series {i + 1} values")}
                  for i, s in enumerate(spec.get("series") or []) for extra in expand(s.get("for"), ns, where)]
        top = evaluate(spec["top"], ns, f"{where} top") if "top" in spec else None
        return bar_plot(evaluate(spec["groups"], ns, f"{where} groups"), series, out / spec["file"], top=top,
                        size=tuple(spec.get("size", (10, 4))), ylabel=common["ylabel"], title=common["title"],
                        ylim=common["ylim"], hline=common["hline"])
    panels = [panel_of({**spec, **p}, {**ns, **extra}, f"{where} panel {i + 1}")
              for i, p in enumerate(spec.get("panels") or [{}]) for extra in expand(p.get("for"), ns, where)]
    series_plot(panels, out / spec["file"], columns=spec.get("columns", 1), size=tuple(spec.get("size", (7, 4.5))))


def panel_of(spec: dict, ns: dict, where: str) -> dict:
    """One panel's series and settings, evaluated."""
    hline = spec.get("hline")
    ylim = spec.get("ylim")
    return {"series": [one_series(s, {**ns, **extra}, f"{where} series {i + 1}")
                       for i, s in enumerate(spec.get("series") or []) for extra in expand(s.get("for"), ns, where)],
            "hline": (evaluate(hline["y"], ns, f"{where} hline"), hline.get("name", "")) if hline else None,
            "ylim": evaluate(ylim, ns, f"{where} ylim") if isinstance(ylim, str) else ylim,
            "title": fill(spec.get("title", ""), ns, where), "xlabel": fill(spec.get("xlabel", ""), ns, where),
            "ylabel": fill(spec.get("ylabel", ""), ns, where), "yscale": spec.get("yscale", "linear"),
            "label_size": spec.get("label_size", 8)}


def document(parts: list, ns: dict, out: Path, where: str) -> str:
    pieces = []
    for i, part in enumerate(parts):
        at = f"{where} part {i + 1}"
        if not isinstance(part, dict):
            raise SpecError(f"{at}: a part is a mapping (text, table or plot), not {part!r}")
        check_keys(part, "part", at)
        kinds = [k for k in PART_KINDS if k in part]
        if len(kinds) != 1:
            raise SpecError(f"{at}: a part is one of {', '.join(PART_KINDS)} (with an optional 'when'); "
                            f"got {sorted(part)}")
        for extra in expand(part.get("for"), ns, at):  # a part repeated per item (``parts``: a section per model)
            pns = {**ns, **extra}
            if "when" in part and not evaluate(part["when"], pns, f"{at} when"):
                continue
            if kinds == ["text"]:
                pieces.append(fill(part["text"], pns, at))
            elif kinds == ["table"]:
                pieces.append("".join(line + "\n" for line in table_lines(part["table"], pns, at)))
            elif kinds == ["parts"]:
                pieces.append(document(part["parts"], pns, out, f"{at} parts"))
            else:
                plot_part(part["plot"], pns, out, at)
    return "".join(pieces)


def build_tables(folder: Path, out: Path | None = None, spec: Path | None = None) -> list[Path]:
    """Write every document (and plot) of ``spec`` (default ``folder/table.yaml``) into ``out`` (default: the
    folder), from the records in ``folder``; returns the documents' paths."""
    folder = Path(folder)
    out = Path(out) if out else folder
    path = Path(spec) if spec else folder / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: `kvc-report --table` needs a folder with a {SPEC_FILE} "
                                "(or --spec)")
    out.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: a table spec is a mapping (records, let, documents), not {type(spec).__name__}")
    unknown = set(spec) - {"records", "let", "documents"}
    if unknown or not spec.get("documents"):
        raise SpecError(f"{path}: keys are records, let, documents (documents required); got {sorted(spec)}")
    records_file = folder / spec.get("records", "records.jsonl")
    records = [wrap(r) for r in read_records(records_file)] if records_file.exists() else []
    ns = bind(spec.get("let"), {**helpers(folder), "records": records}, str(path))
    written = []
    for name, parts in spec["documents"].items():
        text = document(parts, ns, out, f"{path} {name}")
        write_text_atomic(out / name, text)
        written.append(out / name)
    return written
