"""Loss and probe-accuracy curves of a run, drawn from its epoch history (complete across restarts)."""
from __future__ import annotations

from pathlib import Path

CURVES = (("epoch_loss", "BYOL loss (2 − 2cos, symmetrised)", "loss.png"),
          ("epoch_classifier_acc", "online linear probe accuracy (train)", "probe_accuracy.png"))


def plot_curves(history: list[dict[str, float]], out_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` and ``probe_accuracy.png`` (vs epoch) under ``out_dir``.

    Args:
        history: the run's epoch rows (``epoch``, ``epoch_loss``, ``epoch_classifier_acc``).
        out_dir: folder for the PNG files; created.

    Returns:
        The files written (a curve with no points is skipped).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title, name in CURVES:
        points = [(row["epoch"], row[key]) for row in history if key in row and "epoch" in row]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written
