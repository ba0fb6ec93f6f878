import math

import numpy as np
import pytest
import torch

from trimodal.errors import ConfigError
from trimodal.training.evaluate import (chance_at_k, first_positive_ranks, fold_sizes, mean_over_folds, retrieval_metrics,
                                        score_folds, score_latents)


def test_first_positive_ranks_on_a_hand_built_matrix():
    similarity = torch.tensor([[0.9, 0.8, 0.1, 0.0],
                               [0.9, 0.8, 0.7, 0.1],
                               [0.1, 0.2, 0.3, 0.4]])
    positive = torch.tensor([[1, 0, 0, 0],     # best positive first -> rank 1
                             [0, 0, 1, 1],     # positives at 0.7 and 0.1: best is 0.7, two above -> rank 3
                             [1, 1, 0, 0]], dtype=torch.bool)  # best positive 0.2, two above -> rank 3
    assert first_positive_ranks(similarity, positive).tolist() == [1, 3, 3]


def test_a_candidate_within_rounding_of_the_positive_is_a_tie_and_one_clearly_above_is_not():
    # The same caption encoded in two batches: equal up to float rounding, which must not decide R@1.
    positive = torch.tensor([[1, 0, 0]], dtype=torch.bool)
    assert first_positive_ranks(torch.tensor([[0.5, 0.5 + 3e-7, 0.1]]), positive).tolist() == [1]
    assert first_positive_ranks(torch.tensor([[0.5, 0.5 + 1e-4, 0.1]]), positive).tolist() == [2]
    assert first_positive_ranks(torch.tensor([[-0.5, -0.5 + 1e-4, 0.1]]), positive).tolist() == [3]


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


def test_each_fold_is_scored_on_its_own_images_captions_and_utterances_and_the_mean_is_their_mean():
    torch.manual_seed(0)
    images = 11  # 3 folds of 4, 4 and 3 images
    caption_image = np.repeat(np.arange(images), [1, 3, 2, 2, 1, 3, 2, 1, 2, 3, 2])
    utterance_image = np.repeat(np.arange(images), 2)
    groups = {"image": np.arange(images), "text": caption_image, "audio": utterance_image}
    latents = {modality: torch.randn(len(rows), 8) for modality, rows in groups.items()}
    sizes = fold_sizes(images, 3)
    assert sizes == [4, 4, 3]

    per_fold = score_folds(latents, groups, sizes)

    for (start, stop), scored in zip([(0, 4), (4, 8), (8, 11)], per_fold):
        # By hand: the fold's rows of each modality, their image numbered from the fold's first image.
        rows = {m: [i for i, image in enumerate(g) if start <= image < stop] for m, g in groups.items()}
        fold_latents = {m: latents[m][rows[m]] for m in groups}
        fold_groups = {m: groups[m][rows[m]] - start for m in groups}
        assert len(scored) == 6
        for name, metrics in scored.items():
            query, candidate = name.split("->")
            expected = retrieval_metrics(fold_latents[query], fold_groups[query], fold_latents[candidate],
                                         fold_groups[candidate])
            assert metrics == pytest.approx(expected)
    # A fold is not the whole split: fewer candidates give a different chance@10 (and ranks).
    assert per_fold[0]["image->text"]["chance@10"] != score_latents(latents, groups)["image->text"]["chance@10"]
    mean = mean_over_folds(per_fold)
    for name, metrics in mean.items():
        for metric, value in metrics.items():
            assert value == pytest.approx(np.mean([fold[name][metric] for fold in per_fold]))
    assert set(mean["text->audio"]) == {"R@1", "R@5", "R@10", "median_rank", "chance@10"}


@pytest.mark.parametrize("folds", [1, 0, 12])
def test_fewer_than_two_folds_or_more_folds_than_images_is_refused(folds):
    with pytest.raises(ConfigError, match="--folds must be between 2 and the split's 11 images"):
        fold_sizes(11, folds)


def test_folds_divide_the_images_as_equally_as_possible_first_ones_larger():
    assert fold_sizes(5000, 5) == [1000] * 5
    assert fold_sizes(7, 7) == [1] * 7
    assert fold_sizes(13, 5) == [3, 3, 3, 2, 2]


def test_a_fold_without_utterances_leaves_out_only_its_audio_directions():
    torch.manual_seed(1)
    groups = {"image": np.arange(4), "text": np.arange(4), "audio": np.array([0, 1])}  # audio for images 0-1 only
    latents = {modality: torch.randn(len(rows), 8) for modality, rows in groups.items()}
    per_fold = score_folds(latents, groups, fold_sizes(4, 2))
    assert len(per_fold[0]) == 6 and sorted(per_fold[1]) == ["image->text", "text->image"]
    mean = mean_over_folds(per_fold)
    assert mean["image->audio"] == per_fold[0]["image->audio"]
    assert mean["image->text"]["R@1"] == pytest.approx((per_fold[0]["image->text"]["R@1"] + per_fold[1]["image->text"]["R@1"]) / 2)
