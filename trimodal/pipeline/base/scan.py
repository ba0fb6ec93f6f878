"""What reading a dataset's raw layout gives: a `Scan` of its samples, problems and counts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trimodal.pipeline.base.checks import WavFormat
from trimodal.pipeline.base.samples import Problem, Sample


@dataclass
class Scan:
    """What a source read: the split samples (in the dataset's canonical order), problems and counts."""

    name: str
    root: Path
    dataset_dir: Path
    samples: list[Sample]
    problems: list[Problem]
    counts: dict[str, int]
    audio_source: str | None = None  # the dataset the spoken captions come from (facc, spokencoco, itself)
    audio_dir: Path | None = None
    # The format every wav must have; None accepts any PCM or float wav (featurize resamples).
    wav_format: WavFormat | None = None

    @property
    def has_audio(self) -> bool:
        return self.audio_source is not None

    @property
    def modalities(self) -> list[str]:
        return ["image", "text"] + (["audio"] if self.has_audio else [])


def compare_counts(counts: dict, expected: dict, name: str, problems: list[Problem]) -> None:
    """A warning for every count the manifest also states and that differs (same key in both)."""
    for key, value in expected.items():
        if key in counts and counts[key] != value:
            problems.append(Problem("count_differs", "warning", name,
                                    detail=f"{key}: found {counts[key]:,}, the {name} manifest says {value:,}"))
