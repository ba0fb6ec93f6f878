import math

import numpy as np
import pytest
import torch

from trimodal.training.evaluate import chance_at_k, first_positive_ranks, retrieval_metrics


def test_first_positive_ranks_on_a_hand_built_matrix():
    similarity = torch.tensor([[0.9, 0.8, 0.1, 0.0],
                               [0.9, 0.8, 0.7, 0.1],
                               [0.1, 0.2, 0.3, 0.4]])
    positive = torch.tensor([[1, 0, 0, 0],     # best positive first -> rank 1
                             [0, 0, 1, 1],     # positives at 0.7 and 0.1: best is 0.7, two above -> rank 3
                             [1, 1, 0, 0]], dtype=torch.bool)  # best positive 0.2, two above -> rank 3
    assert first_positive_ranks(similarity, positive).tolist() == [1, 3, 3]


def test_multi_positive_recall_median_rank_and_chance():
    # 3 images (groups 0, 1, 2) each with 2 captions; captions of image g are candidates with group g.
    captions = np.array([0, 0, 1, 1, 2, 2])
    images = torch.eye(3)
    # Image 0 scores its captions best; image 1's captions come 3rd and 5th; image 2's come last.
    caption_latents = torch.tensor([[1.0, 0, 0], [0.9, 0, 0], [0.5, 0.2, 0], [0, 0.3, 0.9], [0.4, 0.1, 0.2], [0, 0, 0.1]])
    metrics = retrieval_metrics(images, np.arange(3), caption_latents, captions)
    # Image 0 (column 0 of the captions): its captions score 1.0 and 0.9, the best overall -> rank 1.
    # Image 1 (column 1: 0, 0, 0.2, 0.3, 0.1, 0): its captions score 0.2 and 0.3, the best -> rank 1.
    # Image 2 (column 2: 0, 0, 0, 0.9, 0.2, 0.1): its best caption scores 0.2, one caption above -> rank 2.
    assert metrics["R@1"] == pytest.approx(2 / 3)
    assert metrics["R@5"] == metrics["R@10"] == 1.0
    assert metrics["median_rank"] == 1.0
    # 2 positives among 6 candidates: with k = 10 > N every query is a hit by chance.
    assert metrics["chance@10"] == 1.0


def test_chance_at_10_matches_the_binomial_formula():
    # One positive among 60 candidates: 10/60. Five among 300: 1 - C(295,10)/C(300,10).
    assert chance_at_k(np.array([1]), 60) == pytest.approx(10 / 60)
    expected = 1 - math.comb(295, 10) / math.comb(300, 10)
    assert chance_at_k(np.array([5, 5]), 300) == pytest.approx(expected)
    assert chance_at_k(np.array([1, 5]), 300) == pytest.approx((10 / 300 + expected) / 2)


def test_text_to_image_counts_only_its_own_image():
    images = torch.eye(4)
    queries = torch.tensor([[0, 1.0, 0, 0], [1.0, 0, 0, 0]])  # caption of image 0 looks like image 1
    metrics = retrieval_metrics(queries, np.array([0, 0]), images, np.arange(4))
    assert metrics["R@1"] == 0.5 and metrics["median_rank"] == 1.5
