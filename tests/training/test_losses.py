"""The VSE++ max-margin loss on a hand-built similarity matrix: margin, both directions, the hardest
negative (or all of them), and every modality pair."""

import pytest
import torch

from trimodal.training.losses import max_margin_from_scores, max_margin_loss, multimodal_max_margin

# Rows: queries of the first modality; columns: the second; the diagonal holds the positives.
SCORES = [[0.90, 0.80, 0.10],
          [0.45, 0.50, 0.60],
          [0.20, 0.10, 0.70]]
# With margin 0.2, the positive hinges [0.2 − s(i,i) + s(i,j)]₊ are:
#   rows (first -> second):    (0,1) 0.1;  (1,0) 0.15, (1,2) 0.3;  row 2 none
#   columns (second -> first): (0,1) 0.5 (column 1);  (1,2) 0.1 (column 2);  column 0 none
HARDEST = 0.1 + 0.3 + 0.5 + 0.1
ALL = 0.1 + 0.15 + 0.3 + 0.5 + 0.1


def test_hardest_negatives_in_both_directions_with_the_margin():
    scores = torch.tensor(SCORES)
    assert float(max_margin_from_scores(scores, 0.2)) == pytest.approx(HARDEST)
    assert float(max_margin_from_scores(scores, 0.2, max_violation=False)) == pytest.approx(ALL)
    # A margin no positive violates costs nothing; a larger margin costs more.
    assert float(max_margin_from_scores(scores, -1.0)) == 0.0
    assert float(max_margin_from_scores(scores, 0.3)) > HARDEST


def test_only_the_hardest_negative_of_each_row_and_column_gets_a_gradient():
    scores = torch.tensor(SCORES, requires_grad=True)
    max_margin_from_scores(scores, 0.2).backward()
    # +1 on each hardest violating negative: (0,1) is row 0's and column 1's (so 2); (1,2) is row 1's
    # (0.3 beats (1,0)'s 0.15, which gets nothing) and column 2's (so 2). −1 on a positive per violated
    # hinge it sits in: (0,0) row 0; (1,1) row 1 and column 1; (2,2) column 2.
    expected = torch.tensor([[-1.0, 2.0, 0.0],
                             [0.0, -2.0, 2.0],
                             [0.0, 0.0, -1.0]])
    assert torch.equal(scores.grad, expected)


def test_cosine_scores_of_unit_rows_and_every_modality_pair():
    generator = torch.Generator().manual_seed(0)
    latents = {m: torch.nn.functional.normalize(torch.randn(5, 8, generator=generator), dim=-1)
               for m in ("image", "text", "audio")}
    present = {m: torch.ones(5, dtype=torch.bool) for m in latents}
    direct = max_margin_loss(latents["image"], latents["text"])
    assert torch.allclose(direct, max_margin_from_scores(latents["image"] @ latents["text"].T))
    total, pairs = multimodal_max_margin(latents, present)
    assert set(pairs) == {"image-text", "image-audio", "text-audio"}
    assert torch.allclose(pairs["image-text"], direct)
    assert torch.allclose(total, sum(pairs.values()) / 3)
    # Aligned pairs with a clear gap cost nothing.
    identical = {"image": latents["image"], "text": latents["image"]}
    assert float(multimodal_max_margin(identical, present, margin=0.0)[0]) == 0.0
