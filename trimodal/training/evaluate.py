"""Multi-positive retrieval metrics in all six directions, over a whole split or within folds of it,
and embedding a whole split for them."""

from __future__ import annotations

import numpy as np
import torch

from trimodal import distributed
from trimodal.errors import ConfigError
from trimodal.training.data import SplitData

DIRECTIONS = (("image", "text"), ("text", "image"), ("image", "audio"),
              ("audio", "image"), ("text", "audio"), ("audio", "text"))


def direction_name(query: str, candidate: str) -> str:
    return f"{query}->{candidate}"


# Scores closer than this (relative to the positive's, at least 1) are ties. The same caption twice in a split
# (COCO has many) gives two latents equal up to float rounding, which depends on the batch a row was encoded
# in, the thread count and the CPU's kernels: ~1e-7 for unit latents (measured: 2 ranks against 1 process),
# so without it R@1 changed with the machine.
TIE = 1e-5


def first_positive_ranks(similarity: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-scored positive of each query row: 1 + the candidates scored above it by more
    than `TIE` (ties, exact or within rounding, are resolved in its favour)."""
    best = torch.where(positive, similarity, torch.full_like(similarity, -torch.inf)).max(dim=1).values
    margin = torch.where(best.isfinite(), TIE * best.abs().clamp_min(1.0), torch.zeros_like(best))
    return 1 + (similarity > (best + margin).unsqueeze(1)).sum(dim=1)


def chance_at_k(positives: np.ndarray, candidates: int, k: int = 10) -> float:
    """Mean over queries of 1 − C(N−p, k)/C(N, k): the chance a random ranking puts a positive in the top k."""
    p = np.asarray(positives, dtype=np.float64)
    miss = np.ones_like(p)
    for i in range(min(k, candidates)):
        miss *= np.clip((candidates - p - i) / (candidates - i), 0, None)
    return float(np.mean(1 - miss))


def retrieval_metrics(queries: torch.Tensor, query_groups: np.ndarray, candidates: torch.Tensor,
                      candidate_groups: np.ndarray, chunk: int = 1024) -> dict:
    """R@1/5/10, median rank and chance@10; a candidate is a positive when its group equals the query's."""
    candidate_groups_t = torch.as_tensor(candidate_groups, device=candidates.device)
    ranks = []
    for start in range(0, len(queries), chunk):
        groups = torch.as_tensor(query_groups[start : start + chunk], device=candidates.device)
        similarity = queries[start : start + chunk] @ candidates.T
        ranks.append(first_positive_ranks(similarity, groups.unsqueeze(1) == candidate_groups_t.unsqueeze(0)).cpu())
    ranks = torch.cat(ranks).numpy()
    counts = np.bincount(candidate_groups, minlength=int(max(query_groups.max(), candidate_groups.max())) + 1)
    return {"R@1": float(np.mean(ranks <= 1)), "R@5": float(np.mean(ranks <= 5)), "R@10": float(np.mean(ranks <= 10)),
            "median_rank": float(np.median(ranks)), "chance@10": chance_at_k(counts[query_groups], len(candidates))}


@torch.no_grad()
def embed_split(model, data: SplitData, device: torch.device, batch_size: int = 256, encode=None, *,
                every_batch: bool = False) -> dict[str, torch.Tensor]:
    """Latents of every image, caption and utterance of the split, each modality encoded on its own (by
    `encode(modality, batch)`, default `model.encode`), in batches of `batch_size`. Under torchrun each rank
    encodes every N-th batch and the ranks exchange the results, so every rank ends with the latents one
    process would compute (the batches are the same); `every_batch` encodes all of them here instead."""
    from trimodal.training.data import collate

    model.eval()
    encode = encode or model.encode
    rank, world = distributed.position() if not every_batch else (0, 1)
    latents = {}
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for modality, values in (("image", data.images), ("text", data.tokens), ("audio", data.mels)):
        if values is None or len(values) == 0:
            continue
        # Utterances are batched by length so little time goes into padding.
        order = sorted(range(len(values)), key=lambda i: len(values[i])) if modality == "audio" else list(range(len(values)))
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        encoded = []
        for rows in batches[rank::world]:
            batch = collate([data.item(modality, i) for i in rows], [modality])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with amp:
                encoded.append(encode(modality, batch).float())
        mine = torch.cat(encoded) if encoded else None
        parts = distributed.all_gather_object(None if mine is None else mine.cpu()) if world > 1 else [mine]
        rows = [row for r in range(world) for rows in batches[r::world] for row in rows]
        vectors = torch.cat([part.to(device) for part in parts if part is not None])
        placed = torch.empty_like(vectors)
        placed[torch.as_tensor(rows, device=device)] = vectors
        latents[modality] = placed
    return latents


def split_groups(data: SplitData) -> dict[str, np.ndarray]:
    """The image row each image, caption and utterance belongs to: the positives of retrieval."""
    groups = {"image": np.arange(len(data.keys))}
    if data.caption_image is not None:
        groups["text"] = data.caption_image
    if data.utterance_image is not None:
        groups["audio"] = data.utterance_image
    return groups


def score_latents(latents: dict[str, torch.Tensor], groups: dict[str, np.ndarray]) -> dict:
    """{"query->candidate": metrics} for every direction whose modalities both have latents."""
    results = {}
    for query, candidate in DIRECTIONS:
        if query in latents and candidate in latents:
            results[direction_name(query, candidate)] = retrieval_metrics(
                latents[query], groups[query], latents[candidate], groups[candidate])
    return results


def evaluate_split(model, data: SplitData, device: torch.device, batch_size: int = 256) -> dict:
    """{"query->candidate": metrics} for every direction whose modalities the split has."""
    return score_latents(embed_split(model, data, device, batch_size), split_groups(data))


def fold_sizes(images: int, folds: int) -> list[int]:
    """Images per fold, as equal as possible with the first folds one larger (11 in 3 -> 4, 4, 3)."""
    if not 2 <= folds <= images:
        raise ConfigError(f"--folds must be between 2 and the split's {images} images (got {folds})")
    return [images // folds + (fold < images % folds) for fold in range(folds)]


def score_folds(latents: dict[str, torch.Tensor], groups: dict[str, np.ndarray], sizes: list[int]) -> list[dict]:
    """score_latents within each fold of consecutive images: a fold's captions and utterances are those
    of its images, and only its own items are candidates (the COCO "1k" protocol with 5 x 1,000)."""
    per_fold, start = [], 0
    for size in sizes:
        fold_latents, fold_groups = {}, {}
        for modality, modality_latents in latents.items():
            rows = np.flatnonzero((groups[modality] >= start) & (groups[modality] < start + size))
            if len(rows) == 0:  # e.g. no utterance in this fold: its directions are left out of this fold
                continue
            fold_latents[modality] = modality_latents[torch.as_tensor(rows, device=modality_latents.device)]
            fold_groups[modality] = groups[modality][rows] - start
        per_fold.append(score_latents(fold_latents, fold_groups))
        start += size
    return per_fold


def mean_over_folds(per_fold: list[dict]) -> dict:
    """Every metric of every direction averaged over the folds that have it (median rank included)."""
    names = list(dict.fromkeys(name for fold in per_fold for name in fold))
    return {name: {metric: float(np.mean([fold[name][metric] for fold in per_fold if name in fold]))
                   for metric in next(fold[name] for fold in per_fold if name in fold)}
            for name in names}


def mean_recall(directions: dict) -> float:
    values = [metrics[k] for metrics in directions.values() for k in ("R@1", "R@5", "R@10")]
    return float(np.mean(values)) if values else 0.0


def adapted_latents(model, data: SplitData, device: torch.device, batch_size: int = 256, **options) -> dict:
    """The split's latents with the family's test-time training (`Family.adapted_latents`); the trained
    model is unchanged afterwards."""
    def embed(encode, every_batch: bool = False):
        return embed_split(model, data, device, batch_size, encode, every_batch=every_batch)

    return model.adapted_latents(embed, options)
