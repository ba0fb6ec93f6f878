"""Peak memory and time of `mm validate` and `mm shard` on coco2014 + SpokenCOCO at their real counts.

    python benchmarks/coco_scale.py [--images 123287] [--workdir /tmp/trimodal-bench-coco-scale] [--skip-shard]

Generates the real layout at the real counts: 82,783 train2014 + 40,504 val2014 images, 616,767
captions (332 images with a sixth), Karpathy's dataset_coco.json (113,287 / 5,000 / 5,000), and
SpokenCOCO's two JSON files with 605,000 utterances; fewer `--images` scale every count down alike (a
smoke test). Annotation JSON has every field the real files have, so it is about as large (the sizes are
printed). Image and wav files are hard links to one small jpg and one short wav, so the disk holds the
tree cheaply: what is measured is the parsing, joining, planning, checking and writing at scale, not
decoding large files (benchmarks/shard.py does that).
Each command runs in its own process under GNU time, which reports its peak RSS. Baseline: the same
process importing trimodal and doing nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.builders import make_jpeg, make_wav  # noqa: E402

TRAIN2014, VAL2014 = 82_783, 40_504
KARPATHY_VAL, KARPATHY_TEST = 5_000, 5_000  # the rest of val2014 (30,504) is Karpathy's restval
SIXTH_CAPTIONS = 332  # 123,287 x 5 + 332 = 616,767
UTTERANCES = 605_000
WORDS = ("a man woman dog cat sitting standing on in the of with near table street red blue white large small "
         "two people riding bike train bus plate food pizza kitchen room next to holding").split()


@dataclass(frozen=True)
class Counts:
    train2014: int
    val2014: int
    karpathy_val: int
    karpathy_test: int
    sixth_captions: int
    utterances: int


def scaled_counts(images: int) -> Counts:
    """The real counts when `images` is the real number (123,287), else each one scaled down alike."""
    def scaled(count: int) -> int:
        return count * images // (TRAIN2014 + VAL2014)

    train = scaled(TRAIN2014)
    return Counts(train, images - train, scaled(KARPATHY_VAL), scaled(KARPATHY_TEST), scaled(SIXTH_CAPTIONS),
                  scaled(UTTERANCES))


class Linker:
    """Hard links to one file's bytes; a fresh copy every 60,000 links (ext4 allows 65,000 per inode)."""

    def __init__(self, folder: Path, name: str, data: bytes):
        self.folder, self.name, self.data, self.count = folder, name, data, 0
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, target: Path) -> None:
        source = self.folder / f"{self.count // 60_000}-{self.name}"
        if self.count % 60_000 == 0:
            source.write_bytes(self.data)
        os.link(source, target)
        self.count += 1


def generate(root: Path, counts: Counts) -> dict:
    rng = random.Random(0)
    dataset, spoken = root / "coco2014", root / "spokencoco" / "SpokenCOCO"
    image_link, wav_link = Linker(root / "blobs", "image.jpg", make_jpeg(0, (32, 24))), \
        Linker(root / "blobs", "speech.wav", make_wav(0.05))

    images, annotation_id = [], 0
    for folder, count in (("train2014", counts.train2014), ("val2014", counts.val2014)):
        (dataset / folder).mkdir(parents=True)
        for _ in range(count):
            cocoid = len(images) * 3 + 1
            captions = []
            for _ in range(6 if len(images) < counts.sixth_captions else 5):
                annotation_id += rng.randint(1, 9)
                words = rng.choices(WORDS, k=rng.randint(8, 14))
                captions.append((annotation_id, " ".join(words).capitalize() + rng.choice((".", " .", "", ". "))))
            images.append((cocoid, folder, f"COCO_{folder}_{cocoid:012d}.jpg", captions))
    for cocoid, folder, file_name, _ in images:
        image_link(dataset / folder / file_name)

    (dataset / "annotations").mkdir()
    sizes = {}
    for folder in ("train2014", "val2014"):
        mine = [image for image in images if image[1] == folder]
        data = {"info": {"description": "COCO 2014 Dataset (generated)", "year": 2014},
                "images": [{"license": 3, "file_name": f, "coco_url": f"http://images.cocodataset.org/{folder}/{f}",
                            "height": 480, "width": 640, "date_captured": "2013-11-14 11:18:45",
                            "flickr_url": "http://farm9.staticflickr.com/8186/8119368305_4e622c8349_z.jpg", "id": c}
                           for c, _, f, _ in mine],
                "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "x"}],
                "annotations": [{"image_id": c, "id": a, "caption": raw} for c, _, _, caps in mine for a, raw in caps]}
        rng.shuffle(data["annotations"])
        path = dataset / "annotations" / f"captions_{folder}.json"
        path.write_text(json.dumps(data))
        sizes[path.name] = path.stat().st_size

    val_rows = [i for i, image in enumerate(images) if image[1] == "val2014"]
    split_of = {i: "train" for i, image in enumerate(images) if image[1] == "train2014"}
    held_out = counts.karpathy_test + counts.karpathy_val
    split_of.update({i: "test" for i in val_rows[: counts.karpathy_test]})
    split_of.update({i: "val" for i in val_rows[counts.karpathy_test : held_out]})
    split_of.update({i: "restval" for i in val_rows[held_out:]})
    order = list(range(len(images)))
    rng.shuffle(order)
    karpathy = {"images": [{"filepath": images[i][1], "sentids": [a for a, _ in images[i][3]], "filename": images[i][2],
                            "imgid": row, "split": split_of[i], "cocoid": images[i][0],
                            "sentences": [{"tokens": raw.lower().strip(" .").split(), "raw": raw, "imgid": row, "sentid": a}
                                          for a, raw in images[i][3]]} for row, i in enumerate(order)],
                "dataset": "coco"}
    (dataset / "dataset_coco.json").write_text(json.dumps(karpathy))
    sizes["dataset_coco.json"] = (dataset / "dataset_coco.json").stat().st_size
    del karpathy

    total_captions = sum(len(image[3]) for image in images)
    skip = set(rng.sample(range(total_captions), total_captions - counts.utterances))
    entries = {"train": [], "val": []}
    number = 0
    for cocoid, folder, file_name, captions in images:
        part = folder[:-4]
        entry = {"image": f"{folder}/{file_name}", "captions": []}
        for a, raw in captions:
            number += 1
            if number - 1 in skip:
                continue
            speaker = f"m{rng.getrandbits(52):013x}"
            uttid = f"{speaker}-{rng.getrandbits(120):030X}_{cocoid}_{a}"
            wav = f"wavs/{part}/{number // 2000}/{uttid}.wav"
            entry["captions"].append({"text": raw.upper().strip(" ."), "speaker": speaker, "uttid": uttid, "wav": wav})
        entries[part].append(entry)
    for part, data in entries.items():
        path = spoken / f"SpokenCOCO_{part}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"data": data}))
        sizes[path.name] = path.stat().st_size
        for entry in data:
            for utterance in entry["captions"]:
                target = spoken / utterance["wav"]
                if not target.parent.is_dir():
                    target.parent.mkdir(parents=True)
                wav_link(target)
    return {"images": len(images), "captions": total_captions, "utterances": total_captions - len(skip),
            "json_bytes": sizes}


def measured(command: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit status) of one command in its own process.

    GNU time runs it, so the peak is the command's own: a child forked from this (large, after
    generating the tree) process would inherit its high-water mark.
    """
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "peak-kb %M", *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    peak_kb = next(int(line.split()[1]) for line in reversed(result.stderr.splitlines()) if line.startswith("peak-kb"))
    return seconds, peak_kb / 1024, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=TRAIN2014 + VAL2014, help="default: the real count")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trimodal-bench-coco-scale"))
    parser.add_argument("--skip-shard", action="store_true")
    args = parser.parse_args()
    root = args.workdir / "data"
    # Written once the tree is complete: a generation cut short, or one at another size, is made again.
    generated = args.workdir / "images"
    if not generated.is_file() or generated.read_text() != str(args.images):
        shutil.rmtree(args.workdir, ignore_errors=True)
        started = time.perf_counter()
        made = generate(root, scaled_counts(args.images))
        generated.write_text(str(args.images))
        print(f"generated {made['images']:,} images, {made['captions']:,} captions, {made['utterances']:,} "
              f"utterances in {time.perf_counter() - started:.0f} s; JSON sizes (MB): "
              + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in made["json_bytes"].items()))

    python = sys.executable
    baseline = [python, "-c", "import trimodal.pipeline.sources, trimodal.pipeline.shard.writer, trimodal.pipeline.validate"]
    scan = [python, "-c", "import sys; from pathlib import Path; from trimodal.pipeline.sources import scan_source; "
                          f"s = scan_source('coco2014', Path({str(root)!r})); "
                          "print(len(s.samples), sum(len(x.captions) for x in s.samples))"]
    commands = {"import only (baseline)": baseline, "parse + join (scan)": scan,
                "mm validate coco2014": [python, "-m", "trimodal", "validate", "coco2014", "--root", str(root),
                                         "--workers", "2", "--report", str(args.workdir / "validate.json")]}
    if not args.skip_shard:
        shutil.rmtree(args.workdir / "shards", ignore_errors=True)
        commands["mm shard coco2014"] = [python, "-m", "trimodal", "shard", "coco2014", "--root", str(root),
                                         "--out", str(args.workdir / "shards"), "--workers", "2"]
    print("| step | seconds | peak RSS (MB) | exit |")
    print("|---|---|---|---|")
    for name, command in commands.items():
        seconds, peak, status = measured(command)
        print(f"| {name} | {seconds:.1f} | {peak:.0f} | {status} |", flush=True)


if __name__ == "__main__":
    main()
