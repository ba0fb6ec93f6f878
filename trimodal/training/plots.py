"""PNG plots of a run's metrics: training losses per step, validation recalls per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_run(run: Path) -> list[Path]:
    records = read_metrics(run / "metrics.jsonl")
    out = run / "plots"
    out.mkdir(exist_ok=True)
    written = []
    train = [r for r in records if r["type"] == "train"]
    if train:
        figure, axis = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in train]
        axis.plot(steps, [r["loss"] for r in train], label="total", linewidth=2)
        for pair in sorted({p for r in train for p in r["losses"]}):
            axis.plot(steps, [r["losses"].get(pair) for r in train], label=pair, alpha=0.7)
        axis.set(xlabel="optimizer step", ylabel="loss", title="training loss")
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / "losses.png", dpi=120)
        plt.close(figure)
        written.append(out / "losses.png")
    val = [r for r in records if r["type"] == "val" and r.get("directions")]
    if val:
        figure, axis = plt.subplots(figsize=(7, 4))
        epochs = [r["epoch"] for r in val]
        for direction in val[-1]["directions"]:
            axis.plot(epochs, [r["directions"].get(direction, {}).get("R@10") for r in val], marker="o", label=direction)
        chance = [m["chance@10"] for m in val[-1]["directions"].values()]
        if chance:
            axis.axhline(max(chance), color="grey", linestyle="--", label="chance@10 (max)")
        axis.set(xlabel="epoch", ylabel="R@10", title="validation retrieval", ylim=(0, 1))
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / "recalls.png", dpi=120)
        plt.close(figure)
        written.append(out / "recalls.png")
    if train and any(key in train[-1] for key in OPTIMIZATION_PLOTS):
        written.append(plot_optimization(train, out / "optimization.png"))
    quantisation = [r for r in records if r["type"] == "quantisation"]
    if quantisation:
        written.append(plot_quantisation(quantisation[-1], out / "quantisation.png"))
    return written


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


# What families log about their own optimization, plotted per step: (record key, series, y label).
OPTIMIZATION_PLOTS = {
    "levels": (("change_norm", "‖Δθ‖ of the last update"), ("updates", "updates so far")),
    "controller": (("lr_multiplier", "learning-rate multiplier"), ("reward", "reward of the last window")),
}


def plot_optimization(train: list[dict], path: Path) -> Path:
    """`nlmm`'s per-level updates and change norms, or `dualloop`'s controller, against the step."""
    panels = [(key, series, label) for key, plots in OPTIMIZATION_PLOTS.items() if key in train[-1]
              for series, label in plots]
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for axis, (key, series, label) in zip(axes[:, 0], panels):
        records = [r for r in train if key in r]
        steps = [r["step"] for r in records]
        values = records[-1][key]
        if series in values:  # one series (the controller)
            axis.plot(steps, [_number(r[key][series]) for r in records])
        else:  # one series per level
            for name in values:
                axis.plot(steps, [_number(r[key].get(name, {}).get(series)) for r in records], label=name)
            axis.legend(fontsize=8)
        axis.set(ylabel=label)
        axis.grid(alpha=0.3)
    axes[-1, 0].set(xlabel="optimizer step")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _number(value) -> float:
    return float("nan") if value is None else float(value)
