"""Captioning evaluation: generate a caption for every image of a split and score them against the
split's reference captions (the raw `KEY.txt` lines of the shards).

Metrics come from `pycocoevalcap` (the COCO caption evaluation code, as packaged on PyPI), as its
`COCOEvalCap` computes them: captions tokenised by its PTB tokenizer (Stanford CoreNLP's, Java), then
BLEU-1..4 (`Bleu(4)`, corpus-level, the closest reference length), METEOR 1.5 (`Meteor`, Java), ROUGE-L
(`Rouge`) and CIDEr-D (`Cider`); equal to COCOEvalCap's to the last digit (tested). SPICE is left out: it
downloads Stanford CoreNLP models at its first run. Without a Java runtime (Debian: default-jre-headless)
METEOR is not reported, the result says so, and captions are tokenised here as the PTB tokenizer leaves
them for the other scorers (lower case, words and numbers, punctuation dropped).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from trimodal.errors import ConfigError
from trimodal.features.text import OpenClipTokenizer
from trimodal.pipeline.read.index import read_index
from trimodal.storage import location
from trimodal.pipeline.read.shards import read_shard
from trimodal.training.captions import generate_captions
from trimodal.training.models.family import EvaluationContext, EvaluationExtras

METRICS_SOURCE = "pycocoevalcap, as COCOEvalCap: PTB tokenizer (Java), Bleu(4), Meteor (Java), Rouge, Cider"
METRICS_SOURCE_WITHOUT_JAVA = ("pycocoevalcap (Bleu, Rouge, Cider); lower-cased word tokens, punctuation dropped; "
                               "METEOR not reported: no Java runtime (install default-jre-headless)")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def caption_words(text: str) -> str:
    """A caption as the scorers read it: lower-case words separated by single spaces, no punctuation."""
    return " ".join(_WORD.findall(text.lower()))


def split_references(shards: Path, split: str) -> dict[str, list[str]]:
    """Every image key of `split` and its reference captions, in shard order."""
    index = read_index(shards)
    references: dict[str, list[str]] = {}
    for shard in index["splits"][split]["shards"]:
        contents = read_shard(location(shards) / shard["name"], images=False, audio=False)
        start = 0
        for key, count in zip(contents.keys, contents.caption_counts):
            references[key] = contents.captions[start : start + count]
            start += count
    return references


def java_runtime() -> str | None:
    """The `java` that runs, or None (what METEOR and the PTB tokenizer need)."""
    import shutil
    import subprocess

    java = shutil.which("java")
    if java is None:
        return None
    try:
        done = subprocess.run([java, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return java if done.returncode == 0 else None


def caption_scores(references: dict[str, list[str]], generated: dict[str, str]) -> tuple[dict[str, float], str]:
    """(BLEU-1..4, METEOR (with Java), ROUGE-L and CIDEr of `generated`, one caption per key, against
    `references`; how they were computed)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = [key for key in generated if references.get(key)]
    if not keys:
        raise ConfigError("no generated caption has a reference caption to be scored against")
    java = java_runtime() is not None
    if java:
        gts, res = _ptb_tokenized({key: references[key] for key in keys}), _ptb_tokenized({key: [generated[key]] for key in keys})
    else:
        gts = {key: [caption_words(text) for text in references[key]] for key in keys}
        res = {key: [caption_words(generated[key])] for key in keys}
    res = {key: [caption or "<empty>"] for key, (caption,) in res.items()}  # the scorers need a word
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}
    if java:
        scores["METEOR"] = _meteor(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**scores, "ROUGE-L": float(rouge), "CIDEr": float(cider)}, (METRICS_SOURCE if java else METRICS_SOURCE_WITHOUT_JAVA)


def _ptb_tokenized(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTBTokenizer over {key: [caption, …]}, its Java process's progress line kept off stderr."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with _quiet_stderr():
        return PTBTokenizer().tokenize({key: [{"caption": text} for text in texts] for key, texts in captions.items()})


_METEOR = {}


def _meteor(gts: dict, res: dict) -> float:
    """METEOR 1.5 of `res` against `gts` (tokenised); one Java process per Python process, as loading its
    paraphrase tables takes seconds, stopped at exit."""
    import atexit

    from pycocoevalcap.meteor.meteor import Meteor

    if "scorer" not in _METEOR:
        with _quiet_stderr():
            _METEOR["scorer"] = Meteor()
        atexit.register(_METEOR.clear)
    score, _ = _METEOR["scorer"].compute_score(gts, res)
    return float(score)


@contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for a Java child that reports progress there (library code prints nothing)."""
    import os
    import sys

    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def slot_access(weights: np.ndarray) -> dict:
    """How the memory's slots were addressed: mean |w| per slot, and how evenly (entropy / log K)."""
    access = np.abs(weights).mean(axis=0) if len(weights) else np.zeros(0)
    total = float(access.sum())
    if total <= 0:
        return {"slots": int(access.size), "mean_abs_weight": access.tolist(), "normalised_entropy": 0.0,
                "slots_for_half_the_mass": 0}
    share = access / total
    entropy = float(-(share[share > 0] * np.log(share[share > 0])).sum() / np.log(len(share)))
    half = int(np.searchsorted(np.cumsum(np.sort(share)[::-1]), 0.5) + 1)
    return {"slots": int(access.size), "mean_abs_weight": access.tolist(), "normalised_entropy": entropy,
            "slots_for_half_the_mass": half}


def caption_evaluation(model, context: EvaluationContext) -> EvaluationExtras:
    """Captions for every image of the split, scored: the result's "captioning" and "memory", the lines of
    `captions-<split>.jsonl` (key, generated, references), and the slot-access plot."""
    from trimodal.training.models.bitmar.plots import plot_slot_access

    data, split, run = context.data, context.split, context.run
    beams, episode_size = context.options.get("beams", 3), int(context.train["batch_size"])
    references = split_references(context.shards, split)
    captions, weights = generate_captions(model, data.images, OpenClipTokenizer(context.store_config["text"]["tokenizer"]),
                                          context.device, beams=beams, episode_size=episode_size)
    generated = dict(zip(data.keys, captions))
    access = slot_access(weights)
    if bool(model.memory_trained):
        (run / "plots").mkdir(exist_ok=True)
        plot_slot_access(access["mean_abs_weight"], run / "plots" / f"memory-slots-{split}.png",
                         f"memory slot access, {split} ({len(data.keys)} reads)")
    lines = [{"key": key, "generated": generated[key], "references": references.get(key, [])} for key in data.keys]
    captions_file = f"captions-{split}.jsonl"
    scores, source = caption_scores(references, generated)
    return EvaluationExtras(
        result={"captioning": {**scores, "images": len(captions), "beams": beams, "captions_file": captions_file,
                               "metrics_from": source},
                "memory": {"used": bool(model.memory_trained), "episode_size": episode_size, **access}},
        files={captions_file: lines})
