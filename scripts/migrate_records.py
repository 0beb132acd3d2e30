"""Give records made before the three axes (``cache=h2o cache.storage=int4``) their axis fields, in place.

    python scripts/migrate_records.py results/quant/records.jsonl [...]

A record with a ``storage`` field is left alone. For the others, ``storage``, ``policy``, ``layout`` and their params
are derived from the old ``cache`` / ``cache_params`` exactly as the old classes composed them (an eviction or sharing
cache's ``storage`` / ``storage_params`` / ``keys`` become the storage; ``keys`` of a quantized or latent cache is a
storage setting; StreamingLLM's ``rerotate`` stored keys before RoPE). The old fields are kept under ``pre_axes``,
``cache`` becomes the short name (``int4+h2o``), and ``migrated`` says where the axis fields came from: the numbers
are the old code's, and ``code_version`` stays absent, so reports count these rows as of an unknown version.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

POLICIES = {"streaming", "h2o", "snapkv", "tova", "knorm", "random", "pyramid"}
LAYOUTS = {"cla", "minicache"}
STORAGE_KEYS = ("storage", "storage_params", "keys")
IDENTITY = {"storage": "dense", "policy": "none", "layout": "per_layer"}
NOTE = "axis fields derived from the pre-axes cache/cache_params by scripts/migrate_records.py; numbers unchanged"


def storage_of(name: str, params: dict) -> tuple[str, dict]:
    """The storage choice and settings of an old quantized / bnb / latent cache (or of an old ``storage=``)."""
    if name in ("quant", "int8", "int4", "int2"):
        bits = params.get("bits", {"int8": 8, "int4": 4, "int2": 2}.get(name, 4))
        return f"int{bits}", {**params, "bits": bits}
    if name.startswith("bnb_") or name == "bnb":
        kind = params.get("kind", name.removeprefix("bnb_"))
        return f"bnb_{kind}", {**params, "kind": kind}
    if name == "lowrank":
        return "latent", params
    return name, params


def axes_of(cache: str, params: dict) -> dict:
    params = dict(params or {})
    if cache == "full":
        return {"storage": "dense", "storage_params": {}, "policy": "none", "policy_params": {},
                "layout": "per_layer", "layout_params": {}}
    if cache in POLICIES or cache in LAYOUTS:
        store, store_params = storage_of(params.pop("storage", "dense"), dict(params.pop("storage_params", {})))
        keys = params.pop("keys", None)
        if cache == "streaming" and params.get("rerotate"):
            keys = "pre_rope"
        if keys is not None:
            store_params["keys"] = keys
        axis = "policy" if cache in POLICIES else "layout"
        other = "layout" if axis == "policy" else "policy"
        return {"storage": store, "storage_params": store_params, axis: cache, f"{axis}_params": params,
                other: IDENTITY[other], f"{other}_params": {}}
    store, store_params = storage_of(cache, params)
    return {"storage": store, "storage_params": store_params, "policy": "none", "policy_params": {},
            "layout": "per_layer", "layout_params": {}}


def migrate(record: dict) -> dict:
    if "storage" in record or record.get("cache") is None:
        return record
    axes = axes_of(record["cache"], record.get("cache_params"))
    short = [axes[a] for a in ("storage", "policy", "layout") if axes[a] != IDENTITY[a]]
    merged = {f"{a}.{k}": v for a in ("storage", "policy", "layout") for k, v in axes[f"{a}_params"].items()}
    return {**record, **axes, "cache": "+".join(short) or "full", "cache_params": merged,
            "pre_axes": {"cache": record["cache"], "cache_params": record.get("cache_params")}, "migrated": NOTE}


def main(*paths: str) -> None:
    for path in map(Path, paths):
        lines = path.read_text().splitlines()
        out = [json.dumps(migrate(json.loads(line))) if line.strip() else line for line in lines]
        path.write_text("\n".join(out) + "\n")
        print(f"{path}: {sum(a != b for a, b in zip(lines, out, strict=True))} of {len(lines)} records migrated")


if __name__ == "__main__":
    main(*sys.argv[1:])
