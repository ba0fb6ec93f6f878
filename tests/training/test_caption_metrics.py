"""Captioning metrics as papers report them: our BLEU, METEOR, ROUGE-L and CIDEr equal pycocoevalcap's own
COCOEvalCap on the same captions file (to the last digit; SPICE, which downloads models, left out), METEOR
whenever Java runs, and a result that says so when it does not."""

from __future__ import annotations

import pytest

from trimodal.training.models.bitmar import captioning

REFERENCES = {
    "a": ["A dog runs on the beach.", "A brown dog running along the shore!", "The dog is at the sea side"],
    "b": ["Two cats sleep on a red sofa.", "A pair of cats, asleep on a couch", "cats on a sofa"],
    "c": ["A man rides a bicycle down a hill", "Someone cycling downhill.", "A cyclist on a steep road"],
    "d": ["A plate of food with broccoli", "Broccoli and rice on a white plate", "a meal of rice and greens"],
}
GENERATED = {"a": "a dog running on the beach", "b": "two cats on a couch.", "c": "a man riding a bike",
             "d": "a plate of rice"}


class _Captions:
    """pycocotools' COCO as COCOEvalCap reads it: image ids and each image's annotations."""

    def __init__(self, captions: dict[str, list[str]]):
        self.imgToAnns = {key: [{"image_id": key, "caption": text} for text in texts] for key, texts in captions.items()}

    def getImgIds(self):
        return list(self.imgToAnns)


@pytest.mark.skipif(captioning.java_runtime() is None, reason="no Java runtime: METEOR and the PTB tokenizer need one "
                                                              "(.ci/run installs default-jre-headless)")
def test_our_scores_equal_coco_eval_caps_to_the_last_digit(monkeypatch):
    import pycocoevalcap.eval as coco_eval

    class NoSpice:  # SPICE downloads Stanford CoreNLP models at its first run: not here
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    theirs = coco_eval.COCOEvalCap(_Captions(REFERENCES), _Captions({k: [v] for k, v in GENERATED.items()}))
    theirs.evaluate()
    ours, source = captioning.caption_scores(REFERENCES, GENERATED)
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4", "METEOR": "METEOR",
             "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}
    assert set(ours) == set(names)
    for name, coco_name in names.items():
        assert ours[name] == theirs.eval[coco_name], name
    assert 0 < ours["METEOR"] < 1 and "Meteor" in source


def test_without_java_meteor_is_left_out_and_the_result_says_why(monkeypatch):
    monkeypatch.setattr(captioning, "java_runtime", lambda: None)
    scores, source = captioning.caption_scores(REFERENCES, GENERATED)
    assert "METEOR" not in scores and set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    assert "METEOR not reported: no Java runtime" in source
