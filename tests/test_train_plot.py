"""The loss plot of a stage (train/finish.py): both lines named in a legend (issue 10, item 7)."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from train.finish import loss_figure, plot_loss  # noqa: E402


def rows(n: int = 12) -> list[dict]:
    return [{"step": i + 1, "loss": 3.0 - 0.1 * i, "lr": 1e-3 * min(1.0, (i + 1) / 4)} for i in range(n)]


def test_the_legend_names_the_loss_and_the_learning_rate():
    fig = loss_figure(rows(), "smoke stage 1")
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    labels = [t.get_text() for t in legends[0].get_texts()]
    assert labels == ["training loss", "learning rate (right axis)"]
    colours = [h.get_color() for h in legends[0].legend_handles]
    assert colours[0] != colours[1]  # the two lines are told apart by colour
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss (mean over answer tokens)", "learning rate"]
    plt.close(fig)


def test_plot_loss_writes_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    out = tmp_path / "loss.png"
    plot_loss(metrics, out, "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
