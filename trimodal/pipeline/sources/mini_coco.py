"""The mini dataset in the MS-COCO 2014 + SpokenCOCO layout, so that tests and demos run the COCO path.

The same planned shapes as `mini`, laid out as `coco2014` unpacks (`train2014/`, `val2014/`,
`annotations/captions_*2014.json`, Karpathy's `dataset_coco.json`) plus `SpokenCOCO/` (its two JSON
files and `wavs/`). The captions carry COCO's quirks: a capital letter, stray spaces and newlines, six or
seven captions for some images, annotations in no particular order; transcripts are upper case without
punctuation, and two utterance ids end with a wrong caption id, so their transcripts join them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from trimodal.pipeline.sources import coco, register_source
from trimodal.pipeline.sources.spokencoco import normalise
from trimodal.progress import SILENT, Reporter

TRAIN2014_IMAGES = 150  # the other 50 training images come from val2014, as Karpathy's restval
WRONG_ID_UTTERANCES = 2


def synthesize_mini_coco(target: Path, *, seed: int = 0, use_espeak: bool | None = None,
                         reporter: Reporter = SILENT) -> dict:
    """Write mini-coco into the empty folder `target`; returns what was made."""
    from trimodal.pipeline.synthesize.shapes import TEMPLATES, draw_image, plan_images, speak_all, speech_engine

    speak, speech = speech_engine(use_espeak)
    rng = random.Random(seed + 2)
    records, annotations, utterances = [], [], []
    annotation_id = 1000
    for number, image in enumerate(plan_images(seed)):
        if image.split == "train":
            folder, karpathy = ("train2014", "train") if number < TRAIN2014_IMAGES else ("val2014", "restval")
        else:
            folder, karpathy = "val2014", image.split
        cocoid = 100_000 + number * 37
        record = {"cocoid": cocoid, "folder": folder, "karpathy": karpathy, "image": image,
                  "file_name": f"COCO_{folder}_{cocoid:012d}.jpg", "captions": []}
        caption_count = rng.choice((5,) * 8 + (6, 7))
        for template in rng.sample(TEMPLATES, caption_count):
            annotation_id += rng.randint(1, 40)
            raw = _coco_quirks(image.caption(template), rng)
            record["captions"].append((annotation_id, raw))
            annotations.append({"image_id": cocoid, "id": annotation_id, "caption": raw})
        records.append(record)

    with reporter.task("draw images", total=len(records)) as task:
        for record in records:
            path = target / record["folder"] / record["file_name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            draw_image(record["image"], rng).save(path, "JPEG", quality=90)
            task.advance()

    spoken = {"train2014": [], "val2014": []}
    for record in records:
        entry = {"image": f"{record['folder']}/{record['file_name']}", "captions": []}
        for annotation_id, raw in record["captions"]:
            speaker = rng.randrange(10)
            speaker_id = f"m{speaker:02d}{rng.getrandbits(40):010x}"
            spoken_id = annotation_id + 900_000 if len(utterances) < WRONG_ID_UTTERANCES else annotation_id
            uttid = f"{speaker_id}-{rng.getrandbits(60):015X}_{record['cocoid']}_{spoken_id}"
            wav = f"wavs/{record['folder'][:-4]}/{len(utterances) % 3}/{uttid}.wav"
            text = normalise(raw).upper()
            entry["captions"].append({"text": text, "speaker": speaker_id, "uttid": uttid, "wav": wav})
            utterances.append((target / "SpokenCOCO" / wav, text.lower(), speaker))
        spoken[record["folder"]].append(entry)
    speak_all(utterances, speak, reporter)

    rng.shuffle(annotations)  # COCO's annotations are not grouped by image
    (target / "annotations").mkdir()
    for folder in ("train2014", "val2014"):
        mine = [r for r in records if r["folder"] == folder]
        ids = {r["cocoid"] for r in mine}
        _write_json(target / "annotations" / f"captions_{folder}.json", {
            "info": {"description": "trimodal mini-coco (synthetic)", "year": 2014, "version": "1.0"},
            "images": [{"license": 1, "file_name": r["file_name"], "height": 150, "width": 200, "id": r["cocoid"]}
                       for r in mine],
            "licenses": [{"url": "https://creativecommons.org/publicdomain/zero/1.0/", "id": 1, "name": "CC0 1.0"}],
            "annotations": [a for a in annotations if a["image_id"] in ids]})
    karpathy_order = list(records)
    rng.shuffle(karpathy_order)  # Karpathy's file is in neither id nor name order; test folds follow it
    _write_json(target / coco.KARPATHY_FILE, {"images": [_karpathy_entry(r, row) for row, r in enumerate(karpathy_order)],
                                              "dataset": "coco"})
    (target / "SpokenCOCO").mkdir(exist_ok=True)
    for folder, part in (("train2014", "train"), ("val2014", "val")):
        _write_json(target / "SpokenCOCO" / f"SpokenCOCO_{part}.json", {"data": spoken[folder]})
    return {"images": len(records), "captions": len(annotations), "utterances": len(utterances), "speech": speech,
            "seed": seed}


def _coco_quirks(caption: str, rng: random.Random) -> str:
    """A templated caption written the way COCO's crowd workers wrote theirs."""
    text = caption.rstrip(" .")
    text = text[0].upper() + text[1:]
    quirk = rng.random()
    if quirk < 0.15:
        text += ". "
    elif quirk < 0.25:
        text += "\n"
    elif quirk < 0.35:
        text = text.replace(" ", "  ", 1)
    elif quirk < 0.6:
        text += "."
    return text


def _karpathy_entry(record: dict, row: int) -> dict:
    sentences = [{"tokens": normalise(raw).split(), "raw": raw, "imgid": row, "sentid": annotation_id}
                 for annotation_id, raw in record["captions"]]
    return {"filepath": record["folder"], "sentids": [s["sentid"] for s in sentences], "filename": record["file_name"],
            "imgid": row, "split": record["karpathy"], "sentences": sentences, "cocoid": record["cocoid"]}


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


register_source("mini-coco", options=("splits",), synthesize=synthesize_mini_coco)(coco.scan)
