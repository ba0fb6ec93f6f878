"""SpokenCOCO (Hsu et al. 2021): the COCO 2014 captions read aloud, joined to coco2014 caption by caption.

Not a source of its own (its manifest `joins` coco2014): the COCO reader calls `join` when
`ROOT/spokencoco/SpokenCOCO/` (or `SpokenCOCO/` inside the dataset folder) holds the two JSON files.
An utterance's `uttid` (`<speaker>-<hit>_<cocoid>_<captionid>`) ends with the COCO caption id; when that
id is not one of its image's captions, the normalised transcript (case, punctuation, spaces) is looked
up among them. What still does not match is an error that drops the utterance, never a guess.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path, PurePosixPath

from trimodal.pipeline.base.jsonstream import MalformedJson, json_items
from trimodal.pipeline.download.manifest import load_manifest
from trimodal.pipeline.base.samples import Problem, sample_key

FILES = ("SpokenCOCO_train.json", "SpokenCOCO_val.json")
_CAPTION_ID = re.compile(r"_(\d+)$")
_NOT_WORD = re.compile(r"[^a-z0-9]+")


def find(root: Path, dataset_dir: Path, dataset: str) -> Path | None:
    """The `SpokenCOCO/` folder that goes with a COCO dataset folder: inside it (mini-coco), or the
    `spokencoco` download beside it when its manifest says it joins `dataset` (coco2014, not coco2017,
    whose file names differ)."""
    candidates = [dataset_dir / "SpokenCOCO"]
    if load_manifest("spokencoco").joins == dataset:
        candidates.append(root / "spokencoco" / "SpokenCOCO")
    return next((c for c in candidates if any((c / name).is_file() for name in FILES)), None)


def normalise(text: str) -> str:
    """A transcript as compared: lower case, letters and digits only, single spaces."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def join(spoken_dir: Path, images: dict, absent: set[str], shown, problems: list[Problem],
         counts: dict) -> dict[int, dict[int, tuple[str, str | None]]]:
    """{cocoid: {caption id: (wav path, speaker)}} for every matched utterance.

    `images` maps cocoid to the COCO reader's records (`key`, `folder`, `captions`); utterances of images
    in an `absent` (not downloaded) folder are left out with their images.
    """
    cocoid_of = {image.key: cocoid for cocoid, image in images.items()}
    audio: dict[int, dict[int, tuple[str, str | None]]] = defaultdict(dict)
    tally = dict.fromkeys(("utterances", "joined_by_id", "joined_by_transcript", "unmatched_utterances",
                           "bad_utterances", "duplicate_utterances", "utterances_left_out"), 0)
    for name in FILES:
        path = spoken_dir / name
        if not path.is_file():
            problems.append(Problem("missing_file", "error", shown(path), detail=f"{name} not found in {shown(spoken_dir)}"))
            continue
        entries = 0
        try:
            for number, entry in enumerate(json_items(path, "data.item")):
                _join_entry(number, entry, shown(path), spoken_dir, images, cocoid_of, absent, audio, tally,
                            shown, problems)
                entries += 1
        except MalformedJson as error:
            problems.append(Problem("malformed_json", "error", shown(path), error.line, f"does not parse: {error}"))
            continue
        if not entries:
            problems.append(Problem("malformed_json", "error", shown(path), detail="no 'data' list with entries"))
    counts.update(tally)
    return audio


def _join_entry(number, entry, file, spoken_dir, images, cocoid_of, absent, audio, tally, shown, problems) -> None:
    image_path = entry.get("image") if isinstance(entry, dict) else None
    utterances = entry.get("captions") if isinstance(entry, dict) else None
    if not isinstance(image_path, str) or not isinstance(utterances, list):
        problems.append(Problem("malformed_json", "error", file, detail=(
            f"data[{number}] needs an 'image' path and a 'captions' list: {str(entry)[:80]}")))
        return
    key = sample_key(PurePosixPath(image_path).stem)
    cocoid = cocoid_of.get(key)
    tally["utterances"] += len(utterances)
    if cocoid is not None and images[cocoid].folder in absent:
        tally["utterances_left_out"] += len(utterances)
        return
    by_text = None
    captions = images[cocoid].captions if cocoid is not None else []
    caption_ids = {annotation_id for annotation_id, _ in captions}
    # Paths are made relative only for problems: 600k relpaths would cost seconds.
    for utterance in utterances:
        wav = utterance.get("wav") if isinstance(utterance, dict) else None
        uttid = utterance.get("uttid", "") if isinstance(utterance, dict) else ""
        if not isinstance(wav, str) or not wav or not isinstance(uttid, str):
            tally["bad_utterances"] += 1
            problems.append(Problem("bad_utterance", "error", file, detail=(
                f"data[{number}] ({image_path}): an utterance without a 'wav' path: {str(utterance)[:80]}"),
                drops="utterance", key=key))
            continue
        text, speaker = str(utterance.get("text", "")), utterance.get("speaker")
        if cocoid is None:
            tally["unmatched_utterances"] += 1
            problems.append(Problem("unmatched_utterance", "error", shown(spoken_dir / wav), detail=(
                f"{uttid}: its image {image_path} is in no COCO annotation file"), drops="utterance", key=key))
            continue
        match = _CAPTION_ID.search(uttid)
        caption_id = int(match.group(1)) if match else None
        if caption_id not in caption_ids:
            if by_text is None:
                by_text = defaultdict(list)
                for annotation_id, raw in captions:
                    by_text[normalise(raw)].append(annotation_id)
            candidates = by_text.get(normalise(text), [])
            if len(candidates) != 1:
                tally["unmatched_utterances"] += 1
                why = "several captions have its text" if candidates else "nor its text"
                problems.append(Problem("unmatched_utterance", "error", shown(spoken_dir / wav), detail=(
                    f"{uttid}: {text!r} matches no caption of {key} (no caption id {caption_id}, {why})"),
                    drops="utterance", key=key))
                continue
            caption_id = candidates[0]
            tally["joined_by_transcript"] += 1
            problems.append(Problem("joined_by_transcript", "info", shown(spoken_dir / wav), key=key, detail=(
                f"{uttid}: joined to caption {caption_id} of {key} by its transcript")))
        else:
            tally["joined_by_id"] += 1
        if caption_id in audio[cocoid]:
            tally["duplicate_utterances"] += 1
            problems.append(Problem("duplicate_utterance", "warning", shown(spoken_dir / wav), key=key, detail=(
                f"{uttid}: caption {caption_id} of {key} already has {audio[cocoid][caption_id][0]}; this one is not used")))
            continue
        audio[cocoid][caption_id] = (f"{spoken_dir}/{wav}", speaker if isinstance(speaker, str) else None)
