"""Reports: composed-cache records beside old ones, one code version per table, loud warnings, no interval from one
sample, the hosts of the rows, corrupt lines, plots whose styles follow (strategy, settings), error bars from
``<metric>/ci_low|ci_high``, no Δppl without a baseline, W&B axis tags and folder; and the one table builder of the
results folders (``kvc-report --table``)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import PNG, REPO

from kvcompress.eval.stats import interval_metrics, mean_ci, ratio_ci, stratified_mean_ci
from kvcompress.records import host
from kvcompress.report import build_report
from kvcompress.report.cli import main as cli_main
from kvcompress.report.expr import SpecError
from kvcompress.report.markdown import markdown
from kvcompress.report.table import record_settings, rows
from kvcompress.report.tables import build_tables
from kvcompress.run import no_eviction_warning, summary_line


def rec(cache: str, ppl: float, ratio: float, params: dict | None = None, **extra) -> dict:
    return {"status": "ok", "model": "m", "dtype": "float32", "eval": "ppl", "eval_params": {"window": 64},
            "cache": cache, "cache_params": params or {}, "config_hash": f"{cache}-{ratio}-{ppl}",
            "code_version": "v1", "metrics": {"ppl": ppl, "compression_ratio": ratio, **extra.pop("metrics", {})},
            **extra}


def versioned(cache: str, ppl: float, version: str = "v1", **extra) -> dict:
    """A record whose config is its cache name (so a version's record and another's share it), of one version."""
    return rec(cache, ppl, 1.0 if cache == "full" else 4.0, config_hash=cache, code_version=version, error=None,
               **extra)


def axes(storage="dense", policy="none", layout="per_layer", **params) -> dict:
    """Fields of a composed-cache record: each axis and its settings, the short name, merged params."""
    split = {a: {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(a + ".")}
             for a in ("storage", "policy", "layout")}
    short = "+".join(n for n, ident in ((storage, "dense"), (policy, "none"), (layout, "per_layer")) if n != ident)
    return {"storage": storage, "policy": policy, "layout": layout, "storage_params": split["storage"],
            "policy_params": split["policy"], "layout_params": split["layout"], "cache": short or "full",
            "cache_params": {k: v for k, v in params.items()}}


def test_old_and_new_records_in_one_report(tmp_path):
    old = rec("h2o", 3.0, 2.0, {"budget": 0.25})
    new = {**rec("", 2.5, 4.0), **axes("kivi", "h2o", **{"policy.budget": 0.25, "storage.bits": 4})}
    full = {**rec("", 2.0, 1.0), **axes()}
    table = rows([old, new, full])
    by_cache = {r["cache"]: r for r in table}
    assert set(by_cache) == {"h2o", "kivi+h2o", "full"}
    assert "budget=0.25" in by_cache["kivi+h2o"]["settings"] and "bits=4" in by_cache["kivi+h2o"]["settings"]
    assert by_cache["kivi+h2o"]["policy"] == "h2o" and by_cache["h2o"]["policy"] is None
    assert by_cache["kivi+h2o"]["delta_ppl"] == pytest.approx(0.5)
    assert record_settings(full) == ""
    paths = build_report_from(tmp_path, [old, new, full])
    assert paths["ratio_plot"].read_bytes()[:8] == PNG
    assert "storage" in paths["csv"].read_text().splitlines()[0]


def build_report_from(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    from kvcompress.records import append_jsonl

    for r in records:
        append_jsonl(tmp_path / "records.jsonl", r)
    return build_report(tmp_path)


def test_no_baseline_says_ppl_not_dppl():
    from kvcompress.report.plots import xlabel

    table = rows([rec("h2o", 3.0, 2.0), rec("streaming", 4.0, 4.0)])
    md = markdown(table)
    assert "Pareto front (ratio up, ppl, no full baseline down)" in md
    assert "+3.000" not in md and "(2.00x, 3.000)" in md
    assert xlabel(table).startswith("ppl (no full baseline")
    assert xlabel(table, speed=True).startswith("ppl (no full baseline")
    with_base = rows([rec("full", 2.0, 1.0), rec("h2o", 3.0, 2.0)])
    assert xlabel(with_base).startswith("Δppl") and "(2.00x, +1.000)" in markdown(with_base)


def test_styles_follow_strategy_and_settings():
    from kvcompress.report.plots import styles

    table = rows([rec("full", 2.0, 1.0), rec("h2o", 3.0, 2.0, {"budget": 0.25}), rec("h2o", 2.5, 1.5, {"budget": 0.5}),
                  rec("int4", 2.1, 3.0)])
    style = styles(table)
    h2o = [style[k] for k in style if k.startswith("h2o")]
    assert len(h2o) == 2 and h2o[0][0] == h2o[1][0] and h2o[0][1] != h2o[1][1]  # one colour, two markers
    assert style["int4"][0] != h2o[0][0]
    # the same point keeps its style in a report with more rows of other strategies
    more = styles(table + rows([rec("tova", 5.0, 5.0)]))
    assert all(more[k] == v for k, v in style.items())


def test_error_bars_and_overlapping_intervals(tmp_path, monkeypatch):
    from kvcompress.report import plots

    ci = lambda lo, hi: {"metrics": {"ppl/ci_low": lo, "ppl/ci_high": hi}}
    records = [rec("full", 2.0, 1.0, **ci(1.9, 2.1)), rec("int8", 2.05, 2.0, **ci(1.95, 2.15)),
               rec("int4", 3.0, 4.0, **ci(2.9, 3.1))]
    table = rows(records)
    assert {r["cache"]: r["quality_ci"] for r in table}["int8"] == pytest.approx((-0.05, 0.15))
    md = markdown(table)
    assert "Intervals overlap" in md and "full ~ int8" in md and "int8 ~ int4" not in md
    calls, orig = [], plots._err
    monkeypatch.setattr(plots, "_err", lambda v, c: calls.append(c) or orig(v, c))
    plots.ratio_plot(table, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG
    assert any(c and any(c) for c in calls)  # the x intervals reached the plot


def test_wandb_tags_by_axis():
    from kvcompress.loggers.wandb_logger import axis_tags

    assert axis_tags(axes("kivi", "h2o", "cla")) == ["storage:kivi", "policy:h2o", "layout:cla"]
    assert axis_tags(axes("int4")) == ["storage:int4"]
    assert axis_tags(axes()) == ["baseline"]
    assert axis_tags({"cache": "h2o", "cache_params": {}}) == ["cache:h2o"]  # an old record
    assert axis_tags({"cache": "mine", "storage": None}) == ["cache:mine"]  # the cache= escape hatch


def test_lm_eval_table_reads_corrupt_lines(tmp_path):
    """results/lm_eval's spec over records with a partial last line: the table of the good ones, and a warning that
    names the line."""
    (tmp_path / "table.yaml").write_text((REPO / "results" / "lm_eval" / "table.yaml").read_text())
    good = '{"status": "ok", "eval": "lm_eval", "cache": "full", "metrics": {"kvc_passkey/acc": 1.0}}\n'
    (tmp_path / "records.jsonl").write_text(good + '{"status": "ok", "ca')
    with pytest.warns(UserWarning, match="records.jsonl:2"):
        (path,) = build_tables(tmp_path)
    assert "| full | 1.000 | ok |" in path.read_text()


def test_front_labels_do_not_overlap(tmp_path, monkeypatch):
    """Front points close together get their labels nudged apart (and never clipped at the axes)."""
    import matplotlib.axes

    from kvcompress.report import plots

    table = rows([rec("full", 2.0, 1.0), rec("int8", 2.01, 1.02), rec("int4", 2.02, 1.04), rec("kivi", 12.0, 8.0)])
    placed = []
    original = matplotlib.axes.Axes.annotate

    def spy(self, text, xy, **kw):
        placed.append((text, kw["xytext"], kw.get("annotation_clip")))
        return original(self, text, xy, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", spy)
    plots.ratio_plot(table, tmp_path / "r.png")
    near = [dy for text, (_, dy), _ in placed if text != "kivi"]
    assert len(placed) == 4 and len(set(near)) == 3  # the three crowded labels sit at different heights
    assert all(clip is False for *_, clip in placed)


def test_kvc_lm_eval_defaults():
    """lm-eval's own windowing by default (comparable with its hf model); no CUDA device asked for without CUDA."""
    import inspect

    import torch

    from kvcompress.eval.lm_model import KVCompressLM
    from kvcompress.harness.__main__ import default_device

    assert inspect.signature(KVCompressLM.__init__).parameters["rolling"].default == "lm_eval"
    args = ["--model", "kvcompress", "--tasks", "kvc_passkey"]
    assert default_device(args) == (args if torch.cuda.is_available() else [*args, "--device", "cpu"])
    assert default_device([*args, "--device", "cuda:1"]) == [*args, "--device", "cuda:1"]


def test_a_policy_that_evicted_nothing_is_flagged_loudly():
    r = {**versioned("snapkv", 9.6), "policy": "snapkv", "policy_params": {"budget": 0.25, "when": "prefill"}}
    r["metrics"].update(evictions=0, tokens_held_max=128)
    warning = no_eviction_warning(r)
    assert "evicted nothing" in warning and "policy.when=prefill" in warning and "full cache" in warning
    for budget, evictions, quiet in ((0.25, 3, True), (1.0, 0, True), (256, 0, True), (64, 0, False)):
        r2 = {**r, "policy_params": {"budget": budget}, "metrics": {**r["metrics"], "evictions": evictions}}
        assert (no_eviction_warning(r2) is None) == quiet, (budget, evictions)
    assert no_eviction_warning({**r, "policy": "none"}) is None
    r["warnings"] = [warning]
    assert "WARNING: policy=snapkv evicted nothing" in summary_line({**r, "duration_s": 1.0})
    table = rows([versioned("full", 9.6), r], current="v1")
    flagged = next(x for x in table if x["cache"] == "snapkv")
    assert flagged["warning"] == warning and not flagged["pareto"]  # never a clean point on the front
    md = markdown(table)
    assert "⚠ 1 row(s) carry a warning" in md and "evicted nothing" in md


def test_a_table_is_of_one_code_version(tmp_path, capsys):
    recs = [versioned("full", 10.0, "v1"), versioned("int4", 11.0, "v1"), versioned("int4", 60.0, "v2"),
            versioned("h2o", 12.0, "v2")]
    table = rows(recs, current="v1")
    by_cache = {r["cache"]: r for r in table}
    assert table.version == "v1" and by_cache["int4"]["ppl"] == 11.0  # never the other version's number
    assert by_cache["h2o"]["status"] == "missing" and "v2" in by_cache["h2o"]["error"]
    md = markdown(table)
    assert "Code version: `v1` (the current code)" in md and "## Missing" in md and "`v2` (2 records)" in md
    assert rows(recs, "v2", current="v1").version == "v2"
    assert rows(recs, current="v9").version == "v2"  # no record of the current code: the newest records'
    with pytest.raises(ValueError, match="v1, v2"):
        rows(recs, "v7")
    for r in recs:
        with (tmp_path / "records.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
    assert cli_main([str(tmp_path), "--code-version", "v2"]) == 0
    out = capsys.readouterr().out
    assert "code version v2 (asked for)" in out and "1 missing" in out
    summary = (tmp_path / "summary.md").read_text()
    assert "Code version: `v2` (asked for)" in summary and "60.000" in summary and "11.000" not in summary
    assert cli_main([str(tmp_path)]) == 0  # by default: the current code's, else the newest records' (v2 here)
    assert "Code version: `v2` (the newest records'" in (tmp_path / "summary.md").read_text()


def test_one_sample_has_no_interval():
    assert all(math.isnan(x) for x in mean_ci([0.5]) + ratio_ci([2.0], [3.0]) + stratified_mean_ci([[1.0], [2.0]]))
    assert interval_metrics("ppl", 9.0, ratio_ci([2.0], [3.0])) == {"ppl": 9.0}
    lo, hi = mean_ci([0.0, 1.0, 1.0, 0.0])
    assert lo < hi
    old = versioned("full", 9.0, metrics={"ppl": 9.0, "ppl/ci_low": 9.0, "ppl/ci_high": 9.0, "n_windows": 1})
    md = markdown(rows([old], current="v1"))
    assert "n=1" in md and "[9.000, 9.000]" not in md


def test_host_is_recorded_and_reported():
    h = host()
    assert h["isa"] == torch.backends.cpu.get_cpu_capability() and h["threads"] == torch.get_num_threads()
    a = {"cpu": "A", "isa": "AVX2", "threads": 2}
    b = {"cpu": "B", "isa": "AVX512", "threads": 16}
    assert "Host: A (AVX2, 2 threads)" in markdown(rows([versioned("full", 9.0, host=a)], current="v1"))
    md = markdown(rows([versioned("full", 9.0, host=a), versioned("int4", 9.5, host=b)], current="v1"))
    assert "Rows from 2 hosts" in md


def test_wandb_writes_into_wandb_dir(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from kvcompress.loggers.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "hydra_run"
    record = {**versioned("full", 9.0), "duration_s": 1.0}
    WandbLogger(system_stats=False).log_run(OmegaConf.create({"seed": 0}), record, run_dir)
    assert list((tmp_path / "wandb_home" / "wandb").glob("offline-run-*"))
    assert not (run_dir / "wandb").exists()


# --- the one table builder (kvc-report --table) over results/<exp>/table.yaml ---
SPECS = sorted(REPO.glob("results/**/table.yaml"))


def spec_case(path: Path):
    """A committed spec; one that reads a model's dimensions (``model_config``) needs SmolLM2-135M: slow."""
    slow = "model_config(" in path.read_text()
    return pytest.param(path, id=str(path.parent.relative_to(REPO)), marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("spec", [spec_case(p) for p in SPECS])
def test_committed_tables_rebuild_unchanged(spec, tmp_path):
    """Every table a results folder commits is what ``kvc-report --table <folder>`` makes of its records."""
    folder = spec.parent
    for path in build_tables(folder, tmp_path):
        committed = folder / path.name
        assert path.read_text() == committed.read_text(), (
            f"{committed} differs from `kvc-report --table {folder.relative_to(REPO)}`: rebuild it, or fix the spec")


def write_spec(folder: Path, spec: str, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.yaml").write_text(spec)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


TOY = [rec("full", 10.0, 1.0, device="cpu"), rec("int4", 12.0, 3.5, {"bits": 4}, device="cpu"),
       rec("int4", 11.0, 3.5, {"bits": 4}, device="cuda"), rec("int8", 10.5, 1.9, {"bits": 8}, device="cpu"),
       {**rec("int8", 99.0, 1.9, {"bits": 8}), "status": "failed"}]


def test_table_spec_rows_groups_columns_and_text(tmp_path):
    write_spec(tmp_path, """
let:
  full: "first(records, cache='full').metrics.ppl"
  devices: "sorted({r.device for r in records if r.device})"
documents:
  OUT.md:
    - text: "full {{ f'{full:.1f}' }} on {{ len(devices) }} devices\\n"
    - table:
        where: "r.status == 'ok'"
        latest: r.cache            # the last ok record of a cache, at its first place
        columns:
          - cache: r.cache
          - Δppl: "f'{r.metrics.ppl - full:+.1f}'"
          - {for: "d in devices", header: "on {{d}}", value: "r.device == d", align: right}
        sort: "(-r.metrics.compression_ratio, row['cache'])"
    - when: "full > 100"
      text: never shown
    - for: "d in devices"
      parts: [{text: "## {{d}}: "}, {text: "{{ len(where(records, device=d)) }} runs\\n", when: "d != 'none'"}]
    - table:
        group: r.cache
        columns: [{cache: key}, {runs: len(rs)}, {"mean ppl": "f'{mean(x.metrics.ppl for x in rs):.2f}'"}]
""", TOY)
    (path,) = build_tables(tmp_path)
    assert path.read_text() == (
        "full 10.0 on 2 devices\n"
        "| cache | Δppl | on cpu | on cuda |\n|---|---|---:|---:|\n"
        "| int4 | +1.0 | False | True |\n| int8 | +0.5 | True | False |\n| full | +0.0 | True | False |\n"
        "## cpu: 3 runs\n## cuda: 1 runs\n"
        "| cache | runs | mean ppl |\n|---|---|---|\n"
        "| full | 1 | 10.00 |\n| int4 | 2 | 11.50 |\n| int8 | 2 | 54.75 |\n")


@pytest.mark.parametrize("expr, message", [
    ("r.__class__", "names starting with '_'"),
    ("'{0.__class__}'.format(r)", "format"),
    ("(x := 1)", "NamedExpr is not allowed"),
    ("open('/etc/passwd')", "NameError"),
    ("r.metrics.ppl +", "not a Python expression"),
])
def test_table_spec_refuses_unsafe_or_broken_expressions(tmp_path, expr, message):
    write_spec(tmp_path, f'documents:\n  OUT.md:\n    - table:\n        columns: [{{x: "{expr}"}}]\n', TOY)
    with pytest.raises(SpecError, match=message) as e:
        build_tables(tmp_path)
    assert "table.yaml" in str(e.value) and "column" in str(e.value)


@pytest.mark.parametrize("spec, message", [
    ("documents: {OUT.md: [{table: {columns: [{header: a, value: '1', align: up}]}}]}", "align='up'; choose one of"),
    ("documents: {OUT.md: [{chart: {}}]}", "unknown part key(s) chart; a part takes for, parts, plot, table, text"),
    ("documents: {OUT.md: [{when: 'True'}]}", "a part is one of text, table, plot, parts"),
    ("documents: {OUT.md: [{table: {}}]}", "a table needs 'columns'"),
    ("documents: {OUT.md: [{table: {colums: []}}]}", "unknown table key(s) colums; a table takes columns, group"),
    ("documents: {OUT.md: [{text: a, wehn: 'False'}]}", "unknown part key(s) wehn"),
    ("records: x.jsonl", "documents required"),
])
def test_table_spec_errors_name_the_setting(tmp_path, spec, message):
    write_spec(tmp_path, spec, TOY)
    with pytest.raises(SpecError, match=re.escape(message)):
        build_tables(tmp_path)


def test_table_spec_using_checks_and_plots(tmp_path):
    write_spec(tmp_path, """
let:
  cells: "{(r.cache, r.device): r.metrics.ppl for r in records if r.status == 'ok'}"
documents:
  OUT.md:
    - table: &grid
        using: {dev: "'cpu'"}
        rows: "sorted({k[0] for k in cells})"
        columns: [{cache: r}, {"ppl on {{dev}}": "cells.get((r, dev), '–')"}]
    - table: {<<: *grid, using: {dev: "'cuda'"}}
    - plot: {kind: bars, file: bars.png, groups: "['full', 'int4']", top: "11.5",
             series: [{for: "d in ['cpu', 'cuda']", name: "{{d}}",
                       values: "[cells.get((g, d), 0) for g in ['full', 'int4']]"}]}
    - plot: {file: points.png, yscale: symlog, hline: {y: "10.0", name: full}, columns: 2,
             panels: [{for: "d in ['cpu', 'cuda']", title: "{{d}}"}],
             series: [{points: "where(records, device=d)", x: p.metrics.compression_ratio, y: p.metrics.ppl,
                       label: p.cache}]}
""", TOY)
    (path,) = build_tables(tmp_path)
    assert path.read_text() == ("| cache | ppl on cpu |\n|---|---|\n| full | 10.0 |\n| int4 | 12.0 |\n| int8 | 10.5 |\n"
                                "| cache | ppl on cuda |\n|---|---|\n| full | – |\n| int4 | 11.0 |\n| int8 | – |\n")
    assert all((tmp_path / f).read_bytes().startswith(PNG) for f in ("bars.png", "points.png"))
    write_spec(tmp_path, """
documents:
  OUT.md:
    - text: "{{ [fail(f'{r.cache}: no eviction happened') for r in records if r.cache == 'int8'] }}"
""", TOY)
    with pytest.raises(SpecError, match="^int8: no eviction happened$"):
        build_tables(tmp_path)


def test_kvc_report_table_cli(tmp_path, capsys):
    assert cli_main(["--table", str(tmp_path)]) == 1
    assert "table.yaml does not exist" in capsys.readouterr().err
    write_spec(tmp_path / "exp", "documents: {OUT.md: [{text: '{{ len(records) }} records'}]}", TOY)
    assert cli_main(["--table", str(tmp_path / "exp"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "OUT.md").read_text() == "5 records"
