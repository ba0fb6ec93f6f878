"""`mm validate`: every missing, corrupt or unmatched file of a raw dataset found and named."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from trimodal.pipeline.base.checks import WavFormat, flac_problem, format_problem, image_problem, wav_file_format
from trimodal.pipeline.base.samples import Problem
from trimodal.pipeline.base.scan import Scan
from trimodal.progress import SILENT, Reporter

_BATCH = 64


@dataclass
class ValidationReport:
    name: str
    root: Path
    counts: dict[str, int]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not any(problem.severity == "error" for problem in self.problems)

    def by_severity(self) -> Counter:
        return Counter(problem.severity for problem in self.problems)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "dataset": self.name, "root": str(self.root), "counts": self.counts,
                "problems": [problem.to_dict() for problem in self.problems]}


def validate_scan(scan: Scan, *, workers: int = 2, reporter: Reporter = SILENT) -> ValidationReport:
    """The problems a source found in the annotation files, then every split image decoded and every
    split wav checked.

    Wav formats are counted (`wavs at 16000 Hz, 1 channel(s), 16-bit PCM`); a source that promises one
    format (FACC) makes every other an error.
    """
    name, root = scan.name, scan.root
    jobs: list[tuple[str, Path]] = []
    for sample in scan.samples:
        if sample.image is not None:
            jobs.append(("image", sample.image))
        jobs += [("wav", caption.audio) for caption in sample.captions if caption.audio is not None]

    problems = list(scan.problems)
    batches = [jobs[i : i + _BATCH] for i in range(0, len(jobs), _BATCH)]
    formats: Counter = Counter()
    check = partial(_check_batch, wav_format=scan.wav_format)
    with reporter.task("check files", total=len(jobs), unit="files") as task, \
            ThreadPoolExecutor(max(1, workers)) as pool:
        for batch, (found, batch_formats) in zip(batches, pool.map(check, batches)):
            problems += [Problem(kind, "error", os.path.relpath(path, root), detail=detail) for kind, path, detail in found]
            formats.update(batch_formats)
            task.advance(len(batch))

    counts = dict(scan.counts)
    for wav_format, count in sorted(formats.items(), key=lambda item: -item[1]):
        counts[f"wavs at {wav_format.describe()}"] = count
    counts["images_checked"] = sum(1 for kind, _ in jobs if kind == "image")
    counts["wavs_checked"] = len(jobs) - counts["images_checked"]
    order = {"error": 0, "warning": 1, "info": 2}
    problems.sort(key=lambda p: (order[p.severity], p.kind, p.file, p.line or 0))
    return ValidationReport(name, root, counts, problems)


def _check_batch(batch: list[tuple[str, Path | str]], wav_format: WavFormat | None) -> tuple[list, Counter]:
    found, formats = [], Counter()
    for kind, path in batch:
        path = Path(path)
        if kind == "image":
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                found.append(("missing_image", path, "split image not found"))
                continue
            except OSError as error:
                found.append(("corrupt_image", path, f"cannot read: {error.strerror}"))
                continue
            reason = image_problem(data)
            if reason:
                found.append(("corrupt_image", path, reason))
        else:
            if not path.is_file():
                found.append(("missing_wav", path, "listed in the annotations but not found"))
                continue
            if path.suffix.lower() == ".flac":
                problem = flac_problem(path.read_bytes())
                if problem:
                    found.append((problem[0], path, problem[1]))
                continue
            header = wav_file_format(path)
            problem = header if isinstance(header, tuple) else format_problem(header, wav_format)
            if problem:
                found.append((problem[0], path, problem[1]))
            if not isinstance(header, tuple):
                formats[header] += 1
    return found, formats
