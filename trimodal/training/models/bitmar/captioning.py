"""Captioning evaluation: generate a caption for every image of a split and score them against the
split's reference captions (the raw `KEY.txt` lines of the shards).

Metrics come from `pycocoevalcap` (the COCO caption evaluation code, as packaged on PyPI): BLEU-1..4
(`Bleu(4)`, corpus-level, the closest reference length), ROUGE-L (`Rouge`) and CIDEr-D (`Cider`), all pure
Python. Its PTB tokenizer, METEOR and SPICE run Java, so: captions are tokenised here the way the PTB
tokenizer leaves them for these scorers (lower case, words and numbers, punctuation dropped), and METEOR
is not reported (nltk's needs WordNet data that is downloaded at run time; nothing else packages it).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from trimodal.errors import ConfigError
from trimodal.features.text import OpenClipTokenizer
from trimodal.pipeline.read.index import read_index
from trimodal.storage import location
from trimodal.pipeline.read.shards import read_shard
from trimodal.training.captions import generate_captions
from trimodal.training.models.family import EvaluationContext, EvaluationExtras

METRICS_SOURCE = ("pycocoevalcap (Bleu, Rouge, Cider); lower-cased word tokens, punctuation dropped; "
                  "METEOR not reported (its maintained implementations need Java or downloaded WordNet data)")
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


def caption_scores(references: dict[str, list[str]], generated: dict[str, str]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr of `generated` (one caption per key) against `references`."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = [key for key in generated if references.get(key)]
    if not keys:
        raise ConfigError("no generated caption has a reference caption to be scored against")
    gts = {key: [caption_words(text) for text in references[key]] for key in keys}
    res = {key: [caption_words(generated[key]) or "<empty>"] for key in keys}  # the scorers need a word
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}, "ROUGE-L": float(rouge), "CIDEr": float(cider)}


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
    return EvaluationExtras(
        result={"captioning": {**caption_scores(references, generated), "images": len(captions), "beams": beams,
                               "captions_file": captions_file, "metrics_from": METRICS_SOURCE},
                "memory": {"used": bool(model.memory_trained), "episode_size": episode_size, **access}},
        files={captions_file: lines})
