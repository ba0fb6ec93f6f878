"""`mm shard`: deterministic, resumable webdataset tars of (image, captions, spoken captions) samples.

Each tar is planned from the file listing before anything is read, written as `*.tmp` and renamed, and
recorded in a sidecar (`OUT/.shards/<name>.json`) with a fingerprint of its inputs; a rerun skips every
shard whose sidecar matches. `index.json` is written last, and only when the bad fraction is acceptable.
Shards are written by a pool of threads: jpeg decoding, sha256 and file I/O all release the GIL.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from trimodal import __version__
from trimodal.atomic import write_json
from trimodal.errors import ConfigError, DatasetLayoutError, ShardError, StorageError
from trimodal.pipeline.base.checks import WavFormat, flac_problem, image_problem, wav_problem
from trimodal.pipeline.base.samples import SPLITS, Problem, Sample
from trimodal.pipeline.base.scan import Scan
from trimodal.pipeline.read.index import FORMAT, INDEX
from trimodal.progress import SILENT, Reporter, Task
from trimodal.storage import location, open_atomic, prepare_folder, storage_errors

SIDECARS = ".shards"
TAR_MTIME = 1_577_836_800  # 2020-01-01: fixed, so the same inputs give byte-identical tars
SHARD_NAME = re.compile(r"(?P<split>[a-z]+)-(?P<number>\d{6})\.tar")
# Annotation problems that make the samples themselves uncertain: sharding stops on them.
FATAL_KINDS = {"missing_file", "malformed_line", "malformed_json", "duplicate_caption", "split_overlap",
               "duplicate_key", "duplicate_image_id"}


@dataclass(frozen=True)
class ShardOptions:
    max_samples: int = 1000
    max_mb: float = 500.0
    seed: int = 0
    max_bad: float = 0.001
    min_train_shards: int = 4
    workers: int = 1

    def check(self) -> None:
        problems = []
        if self.max_samples < 1:
            problems.append(f"--max-samples must be at least 1 (got {self.max_samples})")
        if self.max_mb <= 0:
            problems.append(f"--max-mb must be positive (got {self.max_mb})")
        if not 0 <= self.max_bad <= 1:
            problems.append(f"--max-bad is a fraction between 0 and 1 (got {self.max_bad})")
        if self.workers < 1:
            problems.append(f"--workers must be at least 1 (got {self.workers})")
        if problems:
            raise ConfigError("; ".join(problems))

    def args(self) -> dict:
        """The options that shape the output (the worker count does not)."""
        values = asdict(self)
        del values["workers"]
        return values


@dataclass(frozen=True)
class ShardJob:
    dataset: str
    split: str
    name: str
    samples: tuple[Sample, ...]
    audio_source: str | None  # the dataset the spoken captions come from, None without audio
    wav_format: WavFormat | None  # what every wav must be; None accepts any PCM or float wav
    fingerprint: str


def write_shards(scan: Scan, out: Path, options: ShardOptions = ShardOptions(), *,
                 reporter: Reporter = SILENT) -> dict:
    """Write `out/<split>-%06d.tar` for every split of `scan` and return the index it wrote (`index.json`,
    written last). Shards whose inputs did not change since an earlier run are kept."""
    options.check()
    out = location(out)
    name = scan.name
    fatal = [p for p in scan.problems if p.severity == "error" and p.kind in FATAL_KINDS]
    if fatal:
        examples = "; ".join(f"{p.file}{':' + str(p.line) if p.line else ''}: {p.detail}" for p in fatal[:5])
        raise DatasetLayoutError(f"{len(fatal)} problem(s) in the annotation files of {scan.dataset_dir}: {examples}; "
                                 f"`mm validate {name}` with the same options lists them all")
    if not scan.samples:
        raise DatasetLayoutError(f"nothing to shard: {scan.dataset_dir} has no sample in any split "
                                 f"(`mm validate {name}` with the same options says why)")
    jobs = _plan_jobs(scan, options)
    prepare_folder(out)
    prepare_folder(out / SIDECARS)
    with storage_errors(f"writing shards to {out}"):
        (out / INDEX).unlink(missing_ok=True)
        remove_stale(out, {job.name for job in jobs})

    records = {}
    pending = []
    for job in jobs:
        record = _completed_record(out, job)
        if record is not None:
            records[job.name] = record
        else:
            pending.append(job)
    total = sum(len(job.samples) for job in jobs)
    with reporter.task(f"shard {name}", total=total, unit="samples") as task:
        task.advance(sum(len(job.samples) for job in jobs if job.name in records))
        for record in _run(pending, out, options.workers, task):
            records[record["entry"]["name"]] = record

    index = _build_index(scan, jobs, records, options)
    totals = index["totals"]
    too_many = []
    for what in ("samples", "utterances"):
        planned, bad = totals[f"planned_{what}"], totals[f"bad_{what}"]
        if planned and bad / planned > options.max_bad:
            too_many.append(f"{bad} of {planned} {what} ({bad / planned:.2%})")
    if too_many:
        examples = "; ".join(f"{s['key']} {s['file']}: {s['reason']}" for s in index["skipped"][:10])
        raise ShardError(f"too many bad inputs: {' and '.join(too_many)} are bad, more than --max-bad "
                         f"{options.max_bad}; no {INDEX} written. Bad: {examples}"
                         + (f" … and {len(index['skipped']) - 10} more" if len(index["skipped"]) > 10 else ""))
    write_json(out / INDEX, index)
    return index


def _stat(path: Path | str | None) -> tuple[str, int, int] | None:
    """(path, size, mtime_ns) of an input file; size -1 when it is missing (it is skipped later)."""
    if path is None:
        return None
    try:
        info = os.stat(path)
        return str(path), info.st_size, info.st_mtime_ns
    except OSError:
        return str(path), -1, 0


def sample_files(sample: Sample) -> list:
    """The stat of the image, then of each caption's audio: what planning and fingerprints read."""
    return [_stat(sample.image)] + [_stat(caption.audio) for caption in sample.captions]


def sample_bytes(sample: Sample, files: list) -> int:
    """Approximate bytes the sample takes in a tar: member headers, padded payloads, text and json."""
    size = 4 * 512 + sum(len(caption.text) + 80 for caption in sample.captions)
    return size + sum(512 + math.ceil(f[1] / 512) * 512 for f in files if f is not None and f[1] > 0)


def plan_shards(sizes: list[int], max_samples: int, max_bytes: float, min_shards: int = 1) -> list[tuple[int, int]]:
    """Row ranges [start, end) of consecutive samples per shard: even counts, within both limits."""
    count = len(sizes)
    if count == 0:
        return []
    shards = min(count, max(math.ceil(count / max_samples), math.ceil(sum(sizes) / max_bytes), min_shards))
    per_shard = math.ceil(count / shards)
    bounds, start, filled = [], 0, 0
    for row, size in enumerate(sizes):
        if row > start and (row - start >= per_shard or filled + size > max_bytes):
            bounds.append((start, row))
            start, filled = row, 0
        filled += size
    bounds.append((start, count))
    return bounds


def _plan_jobs(scan: Scan, options: ShardOptions) -> list[ShardJob]:
    """Training samples sorted by key, then shuffled by seed; val and test keep the dataset's own order
    (so that folds of a test split, such as COCO's 1k protocol, are the published ones)."""
    jobs = []
    wav_format = asdict(scan.wav_format) if scan.wav_format else None
    for split in SPLITS:
        members = [s for s in scan.samples if s.split == split]
        if split == "train":
            members.sort(key=lambda s: s.key)
            random.Random(f"{options.seed}:{split}").shuffle(members)
        files = [sample_files(sample) for sample in members]
        sizes = [sample_bytes(sample, sample_file) for sample, sample_file in zip(members, files)]
        min_shards = options.min_train_shards if split == "train" and len(members) >= 40 else 1
        for number, (start, end) in enumerate(plan_shards(sizes, options.max_samples, options.max_mb * 1e6, min_shards)):
            chunk = tuple(members[start:end])
            name = f"{split}-{number:06d}.tar"
            fingerprint = _fingerprint([FORMAT, scan.name, split, name, scan.audio_source, wav_format],
                                       chunk, files[start:end])
            jobs.append(ShardJob(scan.name, split, name, chunk, scan.audio_source, scan.wav_format, fingerprint))
    return jobs


def _fingerprint(described: list, samples: tuple[Sample, ...], files: list) -> str:
    for sample, sample_file in zip(samples, files):
        described.append([sample.key, sample_file[0], sample.meta,
                          [[c.id, c.text, c.raw, c.speaker, f] for c, f in zip(sample.captions, sample_file[1:])]])
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def read_sidecar(out: Path, name: str) -> dict | None:
    """The record of a finished shard, or None when it (or its tar, at the recorded size) is missing."""
    try:
        record = json.loads((out / SIDECARS / (name + ".json")).read_text(encoding="utf-8"))
        if (out / name).stat().st_size == record["entry"]["bytes"]:
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _completed_record(out: Path, job: ShardJob) -> dict | None:
    record = read_sidecar(out, job.name)
    return record if record is not None and record.get("fingerprint") == job.fingerprint else None


def remove_stale(out: Path, planned: set[str]) -> None:
    """Shards of an earlier plan (other sizes or seed) would be read as part of this set: remove them."""
    if not out.exists():  # object storage: no "folder" before its first object
        return
    for path in out.iterdir():
        if (SHARD_NAME.fullmatch(path.name) or path.name.endswith(".tar.tmp")) and path.name not in planned:
            path.unlink()
            (out / SIDECARS / (path.name + ".json")).unlink(missing_ok=True)


def _run(jobs: list[ShardJob], out: Path, workers: int, task: Task):
    """Write shards on `workers` threads: decoding, hashing and file I/O all release the GIL."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield write_shard(job, out, task.advance)
        return
    with ThreadPoolExecutor(min(workers, len(jobs))) as pool:
        pending = [pool.submit(write_shard, job, out, task.advance) for job in jobs]
        try:
            for future in as_completed(pending):
                yield future.result()
        finally:
            for future in pending:
                future.cancel()


def write_shard(job: ShardJob, out: Path, advance=lambda n: None) -> dict:
    """Write one tar atomically, then its sidecar; returns the sidecar record."""
    target = out / job.name
    skipped: list[dict] = []
    counts = {"samples": 0, "captions": 0, "utterances": 0, "bad_samples": 0, "bad_utterances": 0,
              "planned_samples": len(job.samples), "planned_utterances": 0}
    keys = []
    try:
        # Whole or not at all, on disk (a *.tmp renamed) and in object storage (no partial object); a
        # stop signal or an error leaves nothing behind. No fsync: the rename is atomic against a crashed
        # process, and the index's sha256 of every shard catches what a power cut could leave behind.
        with open_atomic(target) as raw:
            tar = TarStream(raw)
            for number, sample in enumerate(job.samples, start=1):
                members = _sample_members(job, sample, skipped, counts)
                if members is not None:
                    keys.append(sample.key)
                    for member_name, data in members:
                        tar.add(member_name, data)
                if number % 16 == 0 or number == len(job.samples):
                    advance(16 if number % 16 == 0 else number % 16)
            tar.close()
    except StorageError as error:
        raise ShardError(f"cannot write {target}: {error}") from error
    except OSError as error:
        raise ShardError(f"cannot write {target}: {error.strerror or error}") from error
    entry = {"name": job.name, "samples": counts["samples"], "captions": counts["captions"],
             "utterances": counts["utterances"], "bytes": tar.size, "sha256": tar.sha256.hexdigest(),
             "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None}
    record = {"fingerprint": job.fingerprint, "split": job.split, "entry": entry, "skipped": skipped,
              **{k: counts[k] for k in ("bad_samples", "bad_utterances", "planned_samples", "planned_utterances")}}
    write_json(out / SIDECARS / (job.name + ".json"), record)
    return record


# The fixed part of every member header (mode 0444, uid/gid 0, no owner names, TAR_MTIME), as tarfile
# writes it for a short ASCII name; only name, size and checksum change from member to member.
_HEADER_TEMPLATE = bytearray(tarfile.BLOCKSIZE)
_HEADER_TEMPLATE[100:148] = b"0000444\x000000000\x000000000\x00" + b"00000000000\x00" + b"%011o\x00" % TAR_MTIME
_HEADER_TEMPLATE[148:156] = b" " * 8  # the checksum is computed over spaces here
_HEADER_TEMPLATE[156:157] = tarfile.REGTYPE
_HEADER_TEMPLATE[257:265] = tarfile.POSIX_MAGIC


def _member_header(name: str, size: int) -> bytes:
    raw = name.encode("ascii", "surrogateescape") if name.isascii() else None
    if raw is None or len(raw) >= 100 or size >= 8**11:
        info = tarfile.TarInfo(name)  # rare cases (long or non-ASCII names, huge files): tarfile's own way
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, TAR_MTIME, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    header = bytearray(_HEADER_TEMPLATE)
    header[0 : len(raw)] = raw
    header[124:136] = b"%011o\x00" % size
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


class TarStream:
    """A POSIX tar written straight to a file: one header, the payload and its padding per member.

    The output is what `tarfile` writes (PAX format, end-of-archive blocks, padded to a 10 KiB record)
    without its 16 KiB copy loop, and it hashes what it writes on the way.
    """

    def __init__(self, raw):
        self._raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def _write(self, data: bytes) -> None:
        self._raw.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def add(self, name: str, data: bytes) -> None:
        self._write(_member_header(name, len(data)))
        self._write(data)
        remainder = len(data) % tarfile.BLOCKSIZE
        if remainder:
            self._write(tarfile.NUL * (tarfile.BLOCKSIZE - remainder))

    def close(self) -> None:
        self._write(tarfile.NUL * (tarfile.BLOCKSIZE * 2))
        remainder = self.size % tarfile.RECORDSIZE
        if remainder:
            self._write(tarfile.NUL * (tarfile.RECORDSIZE - remainder))


def _sample_members(job: ShardJob, sample: Sample, skipped: list[dict], counts: dict) -> list[tuple[str, bytes]] | None:
    """The tar members of one sample, or None when its image is missing or does not decode.

    Caption n (line n of KEY.txt) is spoken by member `KEY.<n>.wav`; KEY.json maps it to the caption id.
    """
    image_file = sample.meta.get("image_file") or str(sample.image)
    spoken = sum(1 for caption in sample.captions if caption.audio is not None) if job.audio_source else 0
    counts["planned_utterances"] += spoken
    reason = None
    try:
        image = sample.image.read_bytes() if sample.image is not None else None
        if image is None:
            reason = "no image"
    except OSError as error:
        image, reason = None, "image missing" if isinstance(error, FileNotFoundError) else f"cannot read: {error.strerror}"
    if reason is None:
        problem = image_problem(image)
        reason = f"corrupt image: {problem}" if problem else None
    if reason is not None:
        skipped.append({"key": sample.key, "file": image_file, "reason": reason})
        counts["bad_samples"] += 1
        counts["bad_utterances"] += spoken
        return None

    suffix = sample.image.suffix.lower().lstrip(".") or "jpg"
    members = [(f"{sample.key}.{'jpg' if suffix == 'jpeg' else suffix}", image)]
    caption_records, wavs = [], []
    for position, caption in enumerate(sample.captions):
        wav_member = None
        if job.audio_source is not None and caption.audio is not None:
            audio_path = Path(caption.audio)
            audio, why = _read_wav(audio_path, job.wav_format)
            if audio is None:
                skipped.append({"key": sample.key, "file": audio_path.name, "reason": why})
                counts["bad_utterances"] += 1
            else:
                # Named by what the check accepted, so that readers (which look for .wav and .flac) find it.
                wav_member = f"{position}.flac" if audio_path.suffix.lower() == ".flac" else f"{position}.wav"
                wavs.append((f"{sample.key}.{wav_member}", audio))
        caption_records.append({"id": caption.id, "text": caption.text if caption.raw is None else caption.raw,
                                "speaker": caption.speaker if wav_member else None, "audio": wav_member})
    text = "".join(caption.text + "\n" for caption in sample.captions).encode("utf-8")
    metadata = {"key": sample.key, "split": sample.split, "captions": caption_records,
                "source": {"dataset": job.dataset, "image": image_file, "audio": job.audio_source}}
    extra = {key: value for key, value in sample.meta.items() if key != "image_file"}
    if extra:
        metadata["meta"] = extra
    members += [(f"{sample.key}.txt", text),
                (f"{sample.key}.json", json.dumps(metadata, ensure_ascii=False).encode("utf-8"))]
    members += wavs
    counts["samples"] += 1
    counts["captions"] += len(sample.captions)
    counts["utterances"] += len(wavs)
    return members


def _read_wav(path: Path, wav_format: WavFormat | None) -> tuple[bytes | None, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "wav missing"
    except OSError as error:
        return None, f"cannot read: {error.strerror}"
    problem = flac_problem(data) if path.suffix.lower() == ".flac" else wav_problem(data, len(data), wav_format)
    if problem:
        return None, f"{problem[0].replace('_', ' ')}: {problem[1]}"
    return data, ""


def _build_index(scan: Scan, jobs: list[ShardJob], records: dict, options: ShardOptions) -> dict:
    splits: dict[str, dict] = {}
    skipped: list[dict] = []
    totals = {"planned_samples": 0, "bad_samples": 0, "planned_utterances": 0, "bad_utterances": 0}
    for job in jobs:
        record = records[job.name]
        split = splits.setdefault(job.split, {"samples": 0, "captions": 0, "utterances": 0, "shards": []})
        for key in ("samples", "captions", "utterances"):
            split[key] += record["entry"][key]
        split["shards"].append(record["entry"])
        skipped += [{"split": job.split, **entry} for entry in record["skipped"]]
        for key in totals:
            totals[key] += record[key]
    # What the source itself kept out (an image without captions, an utterance matching no caption)
    # counts like a file that does not decode.
    split_of = {sample.key: sample.split for sample in scan.samples}
    for problem in scan.problems:
        if problem.drops in ("sample", "utterance"):
            totals[f"planned_{problem.drops}s"] += 1
            totals[f"bad_{problem.drops}s"] += 1
            skipped.append({"split": problem.split or split_of.get(problem.key), "key": problem.key, "file": problem.file,
                            "reason": f"{problem.kind.replace('_', ' ')}: {problem.detail}"})
    return {
        "format": FORMAT,
        "dataset": scan.name,
        "created_with": f"trimodal {__version__}",
        "args": options.args(),
        "source": {"root": str(scan.root.resolve()), "dataset_dir": str(scan.dataset_dir.resolve()),
                   "audio": scan.audio_source, "audio_dir": str(scan.audio_dir.resolve()) if scan.audio_dir else None},
        "modalities": scan.modalities,
        "splits": splits,
        "totals": totals,
        "skipped": sorted(skipped, key=lambda s: (s["key"] or "", s["file"])),
        # Errors and warnings that did not stop sharding and dropped no sample or utterance (a missing
        # caption, an annotation whose image is unknown, a second recording of a caption): nothing unmentioned.
        "annotation_problems": [_problem_line(p) for p in scan.problems if p.severity != "info" and not p.drops],
    }


def _problem_line(problem: Problem) -> str:
    return f"{problem.file}{':' + str(problem.line) if problem.line else ''}: {problem.kind}: {problem.detail}"
