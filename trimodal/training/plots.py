"""PNG plots of a run's metrics: training losses per step, validation recalls per epoch, attention heads."""

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


def plot_run(run: Path, family=None) -> list[Path]:
    """losses.png and recalls.png from metrics.jsonl, and the family's own plots (`Family.plots`)."""
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
    written += plot_attention_heads([r for r in records if r["type"] == "attention"], out / "attention-heads.png")
    if family is not None:
        written += family.plots(records, out)
    return written


def plot_attention_heads(records: list[dict], path: Path) -> list[Path]:
    """Heads × steps: each attention head's focus (`trimodal.training.attention_heads`) at every probe."""
    if not records:
        return []
    rows = [(module, head) for module, focus in records[-1]["heads"].items() for head in range(len(focus))]
    grid = [[_number(_at(r["heads"].get(module), head)) for r in records] for module, head in rows]
    figure, axis = plt.subplots(figsize=(min(14, 3 + 0.25 * len(records)), min(30, 1.5 + 0.22 * len(rows))))
    image = axis.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    axis.set_yticks(range(len(rows)), [f"{module} · {head}" for module, head in rows], fontsize=6)
    ticks = list(range(0, len(records), max(1, len(records) // 10)))
    axis.set_xticks(ticks, [str(records[i]["step"]) for i in ticks], fontsize=7)
    axis.set(xlabel="optimizer step", title="attention heads: focus (1 − entropy / log keys)")
    figure.colorbar(image, ax=axis, fraction=0.03)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]


def plot_attention_maps(maps: dict, path: Path) -> Path:
    """One row per module, one column per probe row: its attention (query × key positions, mean over heads)."""
    modules = list(maps)
    columns = max(len(m) for m in maps.values())
    figure, axes = plt.subplots(len(modules), columns, figsize=(3.2 * columns, 3 * len(modules)), squeeze=False)
    for row, module in enumerate(modules):
        for column in range(columns):
            axis = axes[row, column]
            if column < len(maps[module]):
                axis.imshow(maps[module][column], aspect="auto", cmap="magma", interpolation="nearest")
                axis.set_title(f"{module}\nprobe row {column}", fontsize=7)
            axis.set(xlabel="key position", ylabel="query position")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _at(values, index):
    return values[index] if values is not None and index < len(values) else None


def plot_series(records: list[dict], key: str, series: tuple[tuple[str, str], ...], path: Path) -> list[Path]:
    """One panel per (series, y label) of what the training records hold under `key`, against the step: a
    single line when `record[key][series]` is a number, one line per entry when `record[key]` holds named
    entries (e.g. one per memory level). Nothing when no training record has `key`."""
    train = [r for r in records if r["type"] == "train" and key in r]
    if not train:
        return []
    figure, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), sharex=True, squeeze=False)
    steps = [r["step"] for r in train]
    for axis, (name, label) in zip(axes[:, 0], series):
        values = train[-1][key]
        if name in values:
            axis.plot(steps, [_number(r[key].get(name)) for r in train])
        else:
            for entry in values:
                axis.plot(steps, [_number(r[key].get(entry, {}).get(name)) for r in train], label=entry)
            axis.legend(fontsize=8)
        axis.set(ylabel=label)
        axis.grid(alpha=0.3)
    axes[-1, 0].set(xlabel="optimizer step")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]


def _number(value) -> float:
    return float("nan") if value is None else float(value)
