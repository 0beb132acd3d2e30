"""Per-layer explained variance against rank for keys (pre- and post-RoPE) and values -> PNG + markdown.

Uses the same calibration text and on-disk projection files as ``kvc storage=latent``. It also fits (once,
from one pass over the calibration text) the projections of every PCA setting the lowrank sweep uses,
so the sweep's runs only load files.

    .venv/bin/python scripts/lowrank_energy.py                       # SmolLM2-135M, results/lowrank/
    .venv/bin/python scripts/lowrank_energy.py model=stories260k out=/tmp/energy
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from kvcompress.cache.storage.latent.calibrate import PCASettings, explained, load_or_fit  # noqa: E402
from kvcompress.engine.loaders import load, read_config, resolve_source  # noqa: E402
from kvcompress.eval.calibration import Calibration  # noqa: E402
from kvcompress.run import CONF_DIR  # noqa: E402

LEVELS = (0.9, 0.95, 0.99)
SWEEP_SETTINGS = [PCASettings(joint_kv=True), PCASettings(rope_dims=16), PCASettings(rope_dims=16, joint_kv=True),
                  PCASettings(per_head=True)]


def curves(layers: list[dict], name: str) -> list[torch.Tensor]:
    """Cumulative explained fraction per rank, one (n,) curve per layer (mean over groups)."""
    return [explained(layer[name]["eig"]).mean(0) for layer in layers]


def rank_for(curve: torch.Tensor, level: float) -> int:
    return int((curve < level - 1e-9).sum()) + 1


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    out = Path(opts.pop("out", "results/lowrank"))
    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[f"{k}={v}" for k, v in opts.items()] + ["device=cpu"])
    source = resolve_source(str(cfg.model.source), cfg.paths.models)
    read_config(source, cfg.model.name)
    model, tok = load(source, cfg.model.name, torch.device("cpu"), torch.float32)
    cal = cfg.calibration
    ctx = Calibration(model, tok, Path(cfg.paths.data).expanduser(), cal.dataset, cal.tokens, cal.window,
                      Path(cfg.paths.calibration).expanduser())
    pre, _ = load_or_fit(ctx, PCASettings(keys="pre_rope"))
    post, _ = load_or_fit(ctx, PCASettings(keys="post_rope"))
    for s in SWEEP_SETTINGS:
        load_or_fit(ctx, s)
    panels = [("keys, pre-RoPE", curves(pre, "key")), ("keys, post-RoPE", curves(post, "key")),
              ("values", curves(pre, "value"))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, (title, cs) in zip(axes, panels, strict=True):
        n = cs[0].shape[0]
        for i, c in enumerate(cs):
            ax.plot(torch.arange(1, n + 1) / n, c.numpy(), color=cmap(i / max(1, len(cs) - 1)), lw=1)
        ax.set_title(f"{title} (dim {n} per layer)")
        ax.set_xlabel("rank / dimension")
        ax.grid(alpha=0.3)
        for level in LEVELS:
            ax.axhline(level, color="grey", lw=0.5, ls="--")
    axes[0].set_ylabel("explained variance (centered)")
    axes[0].set_ylim(0.5, 1.001)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(pre) - 1))
    fig.colorbar(sm, ax=axes, label="layer", fraction=0.02)
    fig.suptitle(f"{cfg.model.name}: per-layer explained variance vs rank, {ctx.key}")
    out.mkdir(parents=True, exist_ok=True)
    png = out / "energy.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    lines = [f"Rank (as % of the dimension) needed for {', '.join(f'{x:.0%}' for x in LEVELS)} of the "
             f"variance per layer; `{' '.join(['python', 'scripts/lowrank_energy.py', *argv])}`.", "",
             "| layer | " + " | ".join(f"{t} {x:.0%}" for t, _ in panels for x in LEVELS) + " |",
             "|---:|" + "---:|" * (len(panels) * len(LEVELS))]
    for i in range(len(pre)):
        cells = [f"{rank_for(cs[i], x) / cs[i].shape[0]:.0%}" for _, cs in panels for x in LEVELS]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    (out / "energy.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {png} and {out / 'energy.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
