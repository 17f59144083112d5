"""Files a run leaves behind: results.json, heatmaps, sample grids, the summary table.

Every file is written atomically through ``fastcp.files``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fastcp.files import atomic_write_bytes, atomic_write_png, images_to_uint8


def _atomic_savefig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def save_heatmap(matrix, names: list[str], title: str, path: str | Path, higher_is_better: bool = True) -> None:
    """Heatmap PNG of a T×T matrix: rows = after task n, columns = concept j."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=float)
    T = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * T, 0.8 + 0.65 * T))
    # cells of concepts not learned yet (NaN) are masked: blank, and out of the colour scale
    cmap = matplotlib.colormaps["viridis" if higher_is_better else "viridis_r"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap)
    ax.set_xticks(range(T), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(T), [f"after {i + 1}" for i in range(T)], fontsize=8)
    ax.set_xlabel("concept")
    ax.set_title(title, fontsize=10)
    for i in range(T):
        for j in range(T):
            if math.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _atomic_savefig(fig, Path(path))
    plt.close(fig)


def save_sample_grid(samples: dict[int, torch.Tensor], names: list[str], path: str | Path, upscale: int = 3) -> None:
    """PNG grid: one row per concept (label on the left), its samples left to right."""
    from PIL import Image, ImageDraw

    rows = [samples[j] for j in sorted(samples)]
    g = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    h, w = h * upscale, w * upscale
    label_w = 130
    canvas = Image.new("RGB", (label_w + g * (w + 2), len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (j, imgs) in enumerate(sorted(samples.items())):
        draw.text((4, i * (h + 2) + h // 2 - 5), names[j][:20], fill="black")
        for k, a in enumerate(images_to_uint8(imgs)):
            tile = Image.fromarray(a).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + k * (w + 2), i * (h + 2)))
    atomic_write_png(path, canvas)


def format_table(summary: dict, names: list[str]) -> str:
    """Plain-text table: per metric, the last row per concept, average and forgetting."""
    lines = []
    head = f"{'metric':<13}" + "".join(f"{n[:14]:>15}" for n in names) + f"{'average':>10}{'forgetting':>12}"
    lines.append(head)
    lines.append("-" * len(head))
    for metric, s in summary.items():
        last = s["matrix"][-1]
        cells = "".join(f"{v:>15.3f}" if v is not None and math.isfinite(v) else f"{'-':>15}" for v in last)
        lines.append(f"{metric:<13}{cells}{s['average']:>10.3f}{s['forgetting']:>12.3f}")
    return "\n".join(lines)


def format_matrix(matrix, names: list[str], title: str) -> str:
    """Plain-text T×T matrix, one line per task; "–" where a concept is not learned yet (NaN in
    the evaluator, null in results.json)."""
    lines = [title, " " * 10 + "".join(f"{n[:10]:>11}" for n in names)]
    for i, row in enumerate(matrix):
        lines.append(f"{'after ' + str(i + 1):<10}"
                     + "".join(f"{v:>11.3f}" if v is not None and math.isfinite(v) else f"{'–':>11}" for v in row))
    return "\n".join(lines)


def save_forgetting_figure(summary: dict[str, dict], path: str | Path) -> None:
    """Line plot PNG, one panel per method: the fidelity of each concept after every task (x = after
    task n, a concept's line starts at its own task), the same colour for a concept in every panel.

    summary: {method: {"matrix": T×T (None/NaN above the diagonal), "concepts": names,
    "learned", "average", "forgetting"}} (``fastcp.demo.summarize_runs``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), sharey=True, squeeze=False)
    colours = matplotlib.colormaps["tab10"]
    for ax, m in zip(axes[0], methods):
        s = summary[m]
        M = np.array([[math.nan if v is None else v for v in row] for row in s["matrix"]], dtype=float)
        T = M.shape[0]
        for j, name in enumerate(s["concepts"]):
            ax.plot(range(j + 1, T + 1), M[j:, j], marker="o", color=colours(j % 10), label=name)
        ax.set_title(f"{m}: learned {s['learned']:.2f}, forgetting {s['forgetting']:.2f}", fontsize=9)
        ax.set_xticks(range(1, T + 1))
        ax.set_xlabel("after task")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fidelity (judge)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    _atomic_savefig(fig, Path(path))
    plt.close(fig)


def save_side_by_side(images: list[str | Path], labels: list[str], path: str | Path) -> None:
    """PNG of the given images left to right, each under its label (e.g. two runs' sample grids)."""
    from PIL import Image, ImageDraw

    tiles = [Image.open(p).convert("RGB") for p in images]
    head, gap = 18, 12
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), head + max(t.height for t in tiles)),
                       "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for tile, label in zip(tiles, labels):
        draw.text((x + 4, 3), label, fill="black")
        canvas.paste(tile, (x, head))
        x += tile.width + gap
    atomic_write_png(path, canvas)
