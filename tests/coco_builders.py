"""Builds small COCO (2014/2017) + Karpathy + SpokenCOCO trees and their archives in the real layouts."""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.builders import make_jpeg, make_wav, zip_with
from trimodal.pipeline.sources.spokencoco import normalise

SEVEN_CAPTIONS = 0  # the index (in build order) of the image that has seven captions


@dataclass
class CocoImage:
    cocoid: int
    folder: str
    file_name: str
    karpathy: str  # train, restval, val, test
    captions: list[tuple[int, str]] = field(default_factory=list)  # (annotation id, raw), in id order

    @property
    def key(self) -> str:
        return self.file_name.rsplit(".", 1)[0]

    @property
    def split(self) -> str:
        return "train" if self.karpathy == "restval" else self.karpathy


@dataclass
class CocoTree:
    root: Path
    name: str
    year: str
    images: list[CocoImage]  # in Karpathy file order
    spoken: dict[str, list[dict]] = field(default_factory=dict)  # SpokenCOCO json file name -> data entries

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.name

    @property
    def spoken_dir(self) -> Path:
        return self.root / "spokencoco" / "SpokenCOCO"

    def image_path(self, image: CocoImage) -> Path:
        return self.dataset_dir / image.folder / image.file_name

    def annotation_file(self, folder: str) -> Path:
        return self.dataset_dir / "annotations" / f"captions_{folder}.json"

    def by_split(self, split: str) -> list[CocoImage]:
        return [image for image in self.images if image.split == split]

    def utterances(self) -> list[dict]:
        return [u for entries in self.spoken.values() for entry in entries for u in entry["captions"]]

    def rewrite_annotations(self, folder: str, edit) -> None:
        """Load one captions file, let `edit(data)` change it, write it back."""
        path = self.annotation_file(folder)
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    def rewrite_spoken(self, file_name: str, edit) -> None:
        path = self.spoken_dir / file_name
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))


def build_coco_tree(root: Path, *, name: str = "coco2014", train: int = 6, restval: int = 2, val: int = 3,
                    test: int = 4, spoken: bool = True, seed: int = 0, wav_rate: int = 16_000,
                    image_size: tuple[int, int] = (64, 48), jpeg_quality: int = 85, wav_seconds: float = 0.1) -> CocoTree:
    """coco2014 (or coco2017) as its archives unpack, with Karpathy's file and SpokenCOCO under ROOT/spokencoco/.

    Quirks of the real files: captions with stray spaces, a newline and a trailing space; image 0 has
    seven captions; annotations are in no order; the Karpathy file is in neither id nor name order.
    Every caption is spoken; the transcript of image 0's first caption has a typo (its id still joins it).
    """
    rng = random.Random(seed)
    year = "2017" if name.endswith("2017") else "2014"
    plan = ["train"] * train + ["restval"] * restval + ["val"] * val + ["test"] * test
    images, annotation_id = [], 5000
    for number, karpathy in enumerate(plan):
        cocoid = 300_000 + number * 911
        folder = f"{'train' if karpathy == 'train' else 'val'}{year}"
        file_name = f"COCO_{folder}_{cocoid:012d}.jpg" if year == "2014" else f"{cocoid:012d}.jpg"
        image = CocoImage(cocoid, folder, file_name, karpathy)
        for n in range(7 if number == SEVEN_CAPTIONS else 5):
            annotation_id += rng.randint(1, 30)
            raw = f"A photo number {number} showing thing {n}"
            if n == 1:
                raw = f"A  photo number {number}\nwith thing {n} "
            elif n == 2:
                raw += ". "
            image.captions.append((annotation_id, raw))
        images.append(image)
    rng.shuffle(images)
    tree = CocoTree(root, name, year, images)

    for number, image in enumerate(images):
        path = tree.image_path(image)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_jpeg(seed * 1000 + number, image_size, jpeg_quality))
    for folder in (f"train{year}", f"val{year}"):
        _write_annotations(tree, folder, rng)
    if year == "2014":
        (tree.dataset_dir / "dataset_coco.json").write_text(json.dumps(karpathy_json(tree)))
    if spoken:
        _write_spoken(tree, rng, wav_rate, wav_seconds)
    return tree


def _write_annotations(tree: CocoTree, folder: str, rng: random.Random) -> None:
    mine = [image for image in tree.images if image.folder == folder]
    annotations = [{"image_id": image.cocoid, "id": annotation_id, "caption": raw}
                   for image in mine for annotation_id, raw in image.captions]
    rng.shuffle(annotations)
    data = {"info": {"description": "test fixture", "year": int(tree.year)},
            "images": [{"license": 1, "file_name": image.file_name, "height": 48, "width": 64, "id": image.cocoid}
                       for image in mine],
            "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "by-nc-sa"}],
            "annotations": annotations}
    tree.annotation_file(folder).parent.mkdir(parents=True, exist_ok=True)
    tree.annotation_file(folder).write_text(json.dumps(data))


def karpathy_json(tree: CocoTree) -> dict:
    entries = []
    for row, image in enumerate(tree.images):
        sentences = [{"tokens": normalise(raw).split(), "raw": raw, "imgid": row, "sentid": annotation_id}
                     for annotation_id, raw in image.captions]
        entries.append({"filepath": image.folder, "sentids": [s["sentid"] for s in sentences],
                        "filename": image.file_name, "imgid": row, "split": image.karpathy,
                        "sentences": sentences, "cocoid": image.cocoid})
    return {"images": entries, "dataset": "coco"}


def _write_spoken(tree: CocoTree, rng: random.Random, wav_rate: int, wav_seconds: float) -> None:
    files = {"train": "SpokenCOCO_train.json", "val": "SpokenCOCO_val.json"}
    tree.spoken = {file_name: [] for file_name in files.values()}
    for number, image in enumerate(tree.images):
        part = image.folder[: -len(tree.year)]
        entry = {"image": f"{image.folder}/{image.file_name}", "captions": []}
        for annotation_id, raw in image.captions:
            speaker = f"m{rng.getrandbits(32):08x}"
            uttid = f"{speaker}-{rng.getrandbits(48):012X}_{image.cocoid}_{annotation_id}"
            wav = f"wavs/{part}/{annotation_id % 3}/{uttid}.wav"
            text = normalise(raw).upper()
            if number == 0 and not entry["captions"]:
                text = text.replace("PHOTO", "PHOTTO")  # a typo: joined by its id all the same
            entry["captions"].append({"text": text, "speaker": speaker, "uttid": uttid, "wav": wav})
            path = tree.spoken_dir / wav
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(make_wav(wav_seconds, rate=wav_rate, seed=annotation_id))
        tree.spoken[files[part]].append(entry)
    for file_name, entries in tree.spoken.items():
        (tree.spoken_dir / file_name).write_text(json.dumps({"data": entries}))
    (tree.root / "spokencoco" / ".trimodal-download.json").write_text('{"complete": true, "dataset": "spokencoco"}')


def build_coco_archives(tree: CocoTree) -> dict[str, bytes]:
    """The published archives rebuilt from a tree, in their real layouts."""
    archives = {}
    for folder in (f"train{tree.year}", f"val{tree.year}"):
        archives[f"{folder}.zip"] = _zip_folder(tree.dataset_dir, [folder])
    archives[f"annotations_trainval{tree.year}.zip"] = _zip_folder(tree.dataset_dir, ["annotations"], extra={
        f"annotations/instances_val{tree.year}.json": b'{"images": [], "annotations": [], "categories": []}'})
    if tree.year == "2014":
        archives["caption_datasets.zip"] = zip_with({
            "dataset_coco.json": (tree.dataset_dir / "dataset_coco.json").read_bytes(),
            "dataset_flickr8k.json": b'{"images": [], "dataset": "flickr8k"}',
            "dataset_flickr30k.json": b'{"images": [], "dataset": "flickr30k"}'})
    if tree.spoken:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
            bundle.add(tree.spoken_dir, arcname="SpokenCOCO")
        archives["SpokenCOCO.tar.gz"] = buffer.getvalue()
    return archives


def _zip_folder(base: Path, folders: list[str], extra: dict[str, bytes] | None = None) -> bytes:
    members = {}
    for folder in folders:
        for path in sorted((base / folder).rglob("*")):
            if path.is_file():
                members[path.relative_to(base).as_posix()] = path.read_bytes()
    return zip_with({**members, **(extra or {})})
