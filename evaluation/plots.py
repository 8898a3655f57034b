"""Matplotlib helpers shared by the evaluation pictures (headless backend, atomic PNG writes)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, out: str | Path) -> Path:
    """Write ``fig`` to ``out`` atomically (temp then rename) and close it."""
    from blt_pipeline.stage import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
    return out
