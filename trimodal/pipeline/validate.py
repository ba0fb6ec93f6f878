"""`mm validate`: every missing, corrupt or unmatched file of a raw dataset found and named."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from trimodal.pipeline.checks import image_problem, wav_file_problem
from trimodal.pipeline.samples import Problem
from trimodal.pipeline.sources import scan_source
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


def validate_dataset(name: str, root: Path, *, workers: int = 2, reporter: Reporter = SILENT) -> ValidationReport:
    """Check annotation files, then decode every split image and check every split wav."""
    root = Path(root)
    scan = scan_source(name, root)
    jobs: list[tuple[str, Path]] = []
    for sample in scan.samples:
        if sample.image is not None:
            jobs.append(("image", sample.image))
        jobs += [("wav", caption.audio) for caption in sample.captions if caption.audio is not None]

    problems = list(scan.problems)
    batches = [jobs[i : i + _BATCH] for i in range(0, len(jobs), _BATCH)]
    with reporter.task("check files", total=len(jobs), unit="files") as task, \
            ThreadPoolExecutor(max(1, workers)) as pool:
        for batch, found in zip(batches, pool.map(_check_batch, batches)):
            problems += [Problem(kind, "error", os.path.relpath(path, root), detail=detail) for kind, path, detail in found]
            task.advance(len(batch))

    counts = dict(scan.counts)
    counts["images_checked"] = sum(1 for kind, _ in jobs if kind == "image")
    counts["wavs_checked"] = len(jobs) - counts["images_checked"]
    order = {"error": 0, "warning": 1, "info": 2}
    problems.sort(key=lambda p: (order[p.severity], p.kind, p.file, p.line or 0))
    return ValidationReport(name, root, counts, problems)


def _check_batch(batch: list[tuple[str, Path]]) -> list[tuple[str, Path, str]]:
    found = []
    for kind, path in batch:
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
                found.append(("missing_wav", path, "listed in wav2capt.txt but not found"))
                continue
            problem = wav_file_problem(path)
            if problem:
                found.append((problem[0], path, problem[1]))
    return found
