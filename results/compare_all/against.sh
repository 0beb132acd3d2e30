#!/usr/bin/env bash
# The compare_all perplexity jobs under an older commit's code, on this host, against this folder's newest records:
#   bash results/compare_all/against.sh 5aa456e    # the commit that made the pre-redesign records (2026-12-02)
# Runs the sweep from a detached worktree of <commit> (its own code, this venv) into /tmp, then prints one row per
# point: ppl then, ppl now, relative difference. Records made on another host differ by the host's rounding
# (results/hosts/); this compares code alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
COMMIT=${1:?usage: against.sh <commit>}
TREE=$(mktemp -d)/tree OUT=$(mktemp -d)
git worktree add --detach "$TREE" "$COMMIT" -q
trap 'git worktree remove --force "$TREE"' EXIT
ln -s "$(cd .. && pwd)/shared" "$(dirname "$TREE")/shared" 2>/dev/null || true
(cd "$TREE" && PYTHONPATH="$TREE" "$OLDPWD/.venv/bin/python" -m kvcompress.run -m experiment=compare_all \
  +experiment/bench=ppl results_dir="$OUT" progress=false >"$OUT/log" 2>&1) || { tail "$OUT/log"; exit 1; }
.venv/bin/python - "$OUT/records.jsonl" results/compare_all/records.jsonl <<'PY'
import json, sys
def point(r):  # one compare_all point: its axes and their settings
    return json.dumps([r[a] for a in ("storage", "policy", "layout")]
                      + [r[a + "_params"] for a in ("storage", "policy", "layout")], sort_keys=True)
def ok(path):
    return [r for r in map(json.loads, open(path)) if r["status"] == "ok"]
then = {point(r): r for r in ok(sys.argv[1])}
rows = ok(sys.argv[2])
newest = rows[-1]["code_version"]
print("| storage + policy + layout | ppl then | ppl now | relative |\n|---|---|---|---|")
for r in (r for r in rows if r["code_version"] == newest and point(r) in then):
    a, b = then[point(r)]["metrics"]["ppl"], r["metrics"]["ppl"]
    name = " + ".join(x for x in (r["storage"], r["policy"], r["layout"]) if x not in ("dense", "none", "per_layer"))
    print(f"| {name or 'full'} | {a:.6f} | {b:.6f} | {abs(b - a) / a:.1e} |")
PY
