"""``eval=lm_eval``: lm-evaluation-harness tasks with the chosen cache in the loop.

Each task's metrics land in the run record as ``<task>/<metric>`` (``kvc_wikitext2/word_perplexity``,
``kvc_tinystories_cloze/acc``, ...), plus the cache's memory report at its largest batch. Rows of a batch are
right-padded to the longest, and ``kv_bytes`` counts the padding slots the cache holds while ``kv_bytes_fp16``
counts real tokens only: ``kv_bytes`` is exact, but ``compression_ratio`` mixes in the padding share and is not
comparable with ``eval=ppl``'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvcompress.cache.base import ModelSpec
from kvcompress.eval.base import EvalContext, Evaluation, require

# The offline kvc_* tasks (lm-eval YAML beside the harness integration); the evaluation layer names their folder and
# never imports the top-level ``kvcompress.harness`` (which registers the model with lm-eval and imports this).
TASKS_DIR = Path(__file__).resolve().parents[1] / "harness" / "tasks"
LOCAL_TASKS = ("kvc_wikitext2", "kvc_tinystories_cloze", "kvc_passkey")


@dataclass
class LmEval(Evaluation):
    tasks: list[str] = field(default_factory=lambda: list(LOCAL_TASKS))
    limit: float | dict[str, float] | None = None  # examples per task (int) or fraction (< 1), or {task: limit}
    num_fewshot: int | None = None
    batch_size: int = 8
    chunk: int = 16                # tokens per forward step when scoring (1 = exact decode semantics)
    prefill_chunk: int | None = None
    window: int | None = None      # rolling-perplexity window, as eval=ppl; null = min(1024, max_position)
    bos: str | bool = "auto"
    rolling: str = "lm_eval"       # lm_eval (lm-eval's own windows) | ppl (eval=ppl's windows)
    max_gen_toks: int = 256
    include_path: str | None = None
    bootstrap_iters: int = 0       # > 0: stderr metrics too (slow)

    def _task_manager(self, data_dir: Path):
        from lm_eval.tasks import TaskManager

        paths = [str(TASKS_DIR)] + ([str(Path(self.include_path).expanduser())] if self.include_path else [])
        only_ours = all(t.startswith("kvc_") for t in self.tasks) and not self.include_path  # skip lm-eval's index
        return TaskManager(include_path=paths, include_defaults=not only_ours, metadata={"data_dir": str(data_dir)})

    def check(self, spec: ModelSpec, data_dir: Path, tokenizer=None) -> None:
        from kvcompress.eval.lm_model import ROLLING

        require(isinstance(self.tasks, list) and len(self.tasks) >= 1, "eval.tasks", "a non-empty list", self.tasks)
        limits = list(self.limit.values()) if isinstance(self.limit, dict) else [self.limit]
        require(all(v is None or v > 0 for v in limits), "eval.limit", "> 0 or null (or a {task: limit} map)",
                self.limit)
        if isinstance(self.limit, dict):
            require(set(self.limit) <= set(self.tasks), "eval.limit", f"keys among eval.tasks {self.tasks}",
                    sorted(self.limit))
        require(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
        require(self.chunk >= 1, "eval.chunk", ">= 1", self.chunk)
        require(self.prefill_chunk is None or self.prefill_chunk >= 1, "eval.prefill_chunk", ">= 1 or null",
                self.prefill_chunk)
        require(self.window is None or 2 <= self.window <= spec.max_position, "eval.window",
                f"null or in [2, {spec.max_position}]", self.window)
        require(self.rolling in ROLLING, "eval.rolling", " | ".join(ROLLING), self.rolling)
        require(self.bos in ("auto", True, False), "eval.bos", "auto, true or false", self.bos)
        require(self.max_gen_toks >= 1, "eval.max_gen_toks", ">= 1", self.max_gen_toks)
        known = self._task_manager(data_dir).all_tasks
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(f"eval.tasks: unknown lm-eval task(s) {unknown}; kvcompress tasks: "
                             f"{', '.join(LOCAL_TASKS)}, or any lm-eval task or group (`lm_eval ls tasks`)")

    def run(self, ctx: EvalContext) -> dict[str, float]:
        from lm_eval import simple_evaluate

        from kvcompress.eval.lm_model import KVCompressLM

        lm = KVCompressLM.from_context(ctx, batch_size=self.batch_size, chunk=self.chunk,
                                       prefill_chunk=self.prefill_chunk, window=self.window, bos=self.bos,
                                       rolling=self.rolling, max_gen_toks=self.max_gen_toks)
        manager = self._task_manager(ctx.data_dir)
        per_task = self.limit if isinstance(self.limit, dict) else {}
        groups: dict[float | None, list[str]] = {}  # one simple_evaluate per distinct limit
        for task in self.tasks:
            groups.setdefault(per_task.get(task) if per_task else self.limit, []).append(task)
        metrics: dict[str, float] = {}
        for limit, tasks in groups.items():
            out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                  num_fewshot=self.num_fewshot, bootstrap_iters=self.bootstrap_iters,
                                  random_seed=ctx.seed, numpy_random_seed=ctx.seed, torch_random_seed=ctx.seed,
                                  fewshot_random_seed=ctx.seed)
            metrics.update(flatten(out["results"]))
            for task, n in out.get("n-samples", {}).items():
                metrics[f"{task}/n_samples"] = n.get("effective", n.get("original"))
        return {**metrics, **lm.memory}


def flatten(results: dict[str, dict]) -> dict[str, float]:
    """``{"task": {"acc,none": x, "acc_stderr,none": "N/A"}}`` -> ``{"task/acc": x}`` (numeric values only)."""
    out: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            out[f"{task}/{metric}" + ("" if filt == "none" else f"_{filt}")] = float(value)
    return out
