"""Datasets of the ``kvc_ruler_*`` lm-eval tasks: the ``eval=ruler`` generators (kvcompress/eval/ruler/) in text
form, so the same tasks run through the harness with any model it drives.

lm-eval hands the model text, so lengths are counted in characters here (``char_codec``): 4000 and 8000
characters (~1k and ~2k SmolLM2 tokens), 5 samples each, haystack Paradise Lost from the local data folder
(``KVC_DATA_DIR`` / ``paths.data`` as for the other kvc tasks). Deterministic: sample i of a task and length is
seeded as in ``eval=ruler`` with seed 0. Scored with RULER's all-of string match, as ``acc``.
"""
from __future__ import annotations

from datasets import Dataset, DatasetDict

from kvcompress.eval.data import load_text
from kvcompress.eval.ruler.evaluation import ALL_TASKS, sample_seed
from kvcompress.eval.ruler.haystack import char_codec
from kvcompress.eval.ruler.scoring import score
from kvcompress.eval.ruler.tasks import Haystacks
from kvcompress.harness.tasks.kvc_utils import data_dir

RULER_CHARS = (4000, 8000)
RULER_SAMPLES = 5
HAYSTACK = "paradise_lost"


def dataset(task: str, **kwargs) -> DatasetDict:
    """Samples ordered length-major: ``--limit 5`` runs the shorter length only."""
    folder = data_dir(kwargs)
    hay = Haystacks(char_codec(), lambda: load_text(HAYSTACK, folder))
    docs = []
    for n in RULER_CHARS:
        for i in range(RULER_SAMPLES):
            s = ALL_TASKS[task].make(sample_seed(0, task, n, i), hay, n, task)
            docs.append({"context": "".join(s.prompt.context), "question": "".join(s.prompt.question),
                         "outputs": s.references, "metric": s.metric, "length": n})
    return DatasetDict({"test": Dataset.from_list(docs)})


def results(doc: dict, results: list) -> dict:
    return {"acc": score(results[0], doc["outputs"], doc["metric"])}
