"""Plot a layer-similarity calibration (kvcompress/cache/layout/similarity.py) as a heatmap PNG.

    .venv/bin/python scripts/sharing_heatmap.py [similarity-<key>.pt] [--out results/sharing/similarity.png]

Without a file, the newest ``similarity-*.pt`` in the calibration folder ($KVC_CALIBRATION_DIR or
~/.cache/kvcompress/calibration) is used; ``kvc layout=cla layout.groups=auto`` writes it. Also prints the
adjacent-pair table (markdown) that results/sharing/README.md quotes.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kvcompress.cache.layout.similarity import LayerSimilarity  # noqa: E402


def plot(sim: LayerSimilarity, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, name, mat in ((axes[0], "keys (pre-RoPE)", sim.key_cos), (axes[1], "values", sim.value_cos)):
        im = ax.imshow(mat.numpy(), cmap="viridis", vmin=min(0.0, float(mat.min())), vmax=1.0)
        ax.set(title=f"mean cosine between layers: {name}", xlabel="layer", ylabel="layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    n = len(sim.pair_dnll)
    axes[2].bar(range(1, n + 1), sim.pair_dnll.numpy(), color="tab:red")
    axes[2].set(title=f"NLL increase when layer i reads layer i-1 (base NLL {sim.base_nll:.3f})",
                xlabel="consumer layer i", ylabel="ΔNLL (nats/token)")
    fig.suptitle(f"layer similarity on calibration text: {sim.key}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def table(sim: LayerSimilarity) -> str:
    rows = ["| pair | key cos | value cos | ΔNLL |", "|---|---|---|---|"]
    for i, d in enumerate(sim.pair_dnll.tolist()):
        rows.append(f"| {i}-{i + 1} | {float(sim.key_cos[i, i + 1]):.3f} | {float(sim.value_cos[i, i + 1]):.3f} "
                    f"| {d:+.4f} |")
    return "\n".join(rows)


def newest_saved(model: str = "") -> Path | None:
    """The most recent similarity file (of ``model``) in $KVC_CALIBRATION_DIR or the kvc default calibration folder."""
    folder = Path(os.environ.get("KVC_CALIBRATION_DIR", "~/.cache/kvcompress/calibration")).expanduser()
    files = sorted(folder.glob(f"similarity-{model}*.pt"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/sharing/similarity.png"))
    args = ap.parse_args()
    path = args.file or newest_saved()
    if path is None:
        raise SystemExit("no similarity-*.pt in the calibration folder; run `kvc layout=cla layout.groups=auto` first")
    sim = LayerSimilarity.load(path)
    plot(sim, args.out)
    print(f"<!-- {path.name} -> {args.out} -->")
    print(table(sim))


if __name__ == "__main__":
    main()
