"""Pre-axes records get axis fields that the new configs accept, with their numbers untouched."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvcompress import presets

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("migrate_records", REPO / "scripts" / "migrate_records.py")
migrate_records = importlib.util.module_from_spec(spec)
spec.loader.exec_module(migrate_records)
migrate = migrate_records.migrate


@pytest.mark.parametrize("cache, params, want", [
    ("full", {}, ("full", "dense", "none", "per_layer")),
    ("int4", {"bits": 4, "group_size": 64, "keys": "pre_rope"}, ("int4", "int4", "none", "per_layer")),
    ("bnb_nf4", {"kind": "nf4", "blocksize": 64, "keys": "post_rope"}, ("bnb_nf4", "bnb_nf4", "none", "per_layer")),
    ("lowrank", {"rank_fraction": 0.5}, ("latent", "latent", "none", "per_layer")),
    ("h2o", {"budget": 0.5, "storage": "int4", "storage_params": {}}, ("int4+h2o", "int4", "h2o", "per_layer")),
    ("cla", {"groups": "auto", "storage": "int8", "keys": "post_rope"}, ("int8+cla", "int8", "none", "cla")),
    ("streaming", {"budget": 64, "rerotate": True}, ("streaming", "dense", "streaming", "per_layer")),
])
def test_old_names_map_to_the_axes(cache, params, want):
    rec = {"cache": cache, "cache_params": params, "metrics": {"ppl": 12.5}, "status": "ok"}
    new = migrate(rec)
    assert (new["cache"], new["storage"], new["policy"], new["layout"]) == want
    assert new["metrics"] == {"ppl": 12.5} and new["pre_axes"]["cache"] == cache and migrate(new) == new
    if cache == "streaming":
        assert new["storage_params"]["keys"] == "pre_rope" and new["policy_params"]["rerotate"] is True
    if cache == "h2o":
        assert new["cache_params"] == {"storage.bits": 4, "policy.budget": 0.5}


def test_committed_records_speak_configs_that_exist():
    """Every committed record's axis choice and setting names exist in conf/<axis>/<choice>.yaml."""
    for path in sorted((REPO / "results").rglob("records.jsonl")):
        for line in path.read_text().splitlines():
            rec = migrate(json.loads(line))
            for axis in ("storage", "policy", "layout"):
                if rec.get(axis) is None:
                    continue
                yaml = REPO / "conf" / axis / f"{rec[axis]}.yaml"
                assert yaml.is_file(), f"{path}: {axis}={rec[axis]} has no {yaml.name}"
                known = set(presets.load(yaml)) | {"scorer"}  # base/ and scorer defaults resolved
                if rec[axis] == "none":  # policy=none ignores a sweep's shared eviction settings (and says so)
                    known |= {"budget", "sinks", "recent", "when", "slack", "per_head", "rerotate"}
                unknown = set(rec[f"{axis}_params"]) - known
                assert not unknown, f"{path}: {axis}={rec[axis]} has unknown settings {unknown}"
