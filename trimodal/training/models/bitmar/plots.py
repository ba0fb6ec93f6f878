"""Plots of bitmar's own: its ternary weights after each epoch, and how evaluation addressed the memory's slots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_quantisation(report: dict, path: Path) -> Path:
    """Shares of -1 / 0 / +1 weights in every BitLinear (stacked bars), packed vs fp16 size in the title."""
    names = list(report["layers"])
    figure, axis = plt.subplots(figsize=(8, max(3.0, 0.22 * len(names) + 1.5)))
    left = [0.0] * len(names)
    for label, colour in (("-1", "tab:blue"), ("0", "lightgrey"), ("+1", "tab:red")):
        shares = [report["layers"][name][label] for name in names]
        axis.barh(names, shares, left=left, color=colour, label=label)
        left = [a + b for a, b in zip(left, shares)]
    axis.set(xlim=(0, 1), xlabel="share of the layer's weights",
             title=f"ternary weights after epoch {report['epoch'] + 1}: {report['packed_bytes'] / 1e6:.2f} MB packed "
                   f"(1.58 bits) vs {report['fp16_bytes'] / 1e6:.2f} MB fp16")
    axis.tick_params(axis="y", labelsize=6)
    axis.invert_yaxis()
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path




def plot_slot_access(access: list[float], path: Path, title: str) -> Path:
    """Episodic-memory usage: the mean |addressing weight| each slot received, and how those spread."""
    figure, (bars, spread) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    bars.bar(range(len(access)), access, width=1.0, color="tab:purple")
    bars.set(xlabel="memory slot", ylabel="mean |w|", title=title)
    spread.hist(access, bins=30, color="tab:purple")
    spread.set(xlabel="mean |w| of a slot", ylabel="slots")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
