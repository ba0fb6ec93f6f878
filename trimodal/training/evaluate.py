"""Multi-positive retrieval metrics in all six directions, and embedding a whole split for them."""

from __future__ import annotations

import numpy as np
import torch

from trimodal.training.data import SplitData

DIRECTIONS = (("image", "text"), ("text", "image"), ("image", "audio"),
              ("audio", "image"), ("text", "audio"), ("audio", "text"))


def direction_name(query: str, candidate: str) -> str:
    return f"{query}->{candidate}"


def first_positive_ranks(similarity: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-scored positive of each query row (ties are resolved in its favour)."""
    best = torch.where(positive, similarity, torch.full_like(similarity, -torch.inf)).max(dim=1).values
    return 1 + (similarity > best.unsqueeze(1)).sum(dim=1)


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
def embed_split(model, data: SplitData, device: torch.device, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Latents of every image, caption and utterance of the split, each modality encoded on its own."""
    from trimodal.training.data import Item, collate

    model.eval()
    latents = {}
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    sources = {"image": (data.images, lambda x: Item("", image=x)),
               "text": (data.tokens, lambda x: Item("", tokens=x)),
               "audio": (data.mels, lambda x: Item("", mel=x))}
    for modality, (values, make) in sources.items():
        if values is None or len(values) == 0:
            continue
        # Utterances are batched by length so little time goes into padding.
        order = sorted(range(len(values)), key=lambda i: len(values[i])) if modality == "audio" else list(range(len(values)))
        rows_out: list[torch.Tensor | None] = [None] * len(values)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate([make(values[i]) for i in rows], [modality])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with amp:
                encoded = model.encode(modality, batch).float()
            for row, vector in zip(rows, encoded):
                rows_out[row] = vector
        latents[modality] = torch.stack(rows_out)
    return latents


def evaluate_split(model, data: SplitData, device: torch.device, batch_size: int = 256) -> dict:
    """{"query->candidate": metrics} for every direction whose modalities the split has."""
    latents = embed_split(model, data, device, batch_size)
    groups = {"image": np.arange(len(data.keys))}
    if data.caption_image is not None:
        groups["text"] = data.caption_image
    if data.utterance_image is not None:
        groups["audio"] = data.utterance_image
    results = {}
    for query, candidate in DIRECTIONS:
        if query in latents and candidate in latents:
            results[direction_name(query, candidate)] = retrieval_metrics(
                latents[query], groups[query], latents[candidate], groups[candidate])
    return results


def mean_recall(directions: dict) -> float:
    values = [metrics[k] for metrics in directions.values() for k in ("R@1", "R@5", "R@10")]
    return float(np.mean(values)) if values else 0.0


def adapted_evaluation(model, data: SplitData, device: torch.device, batch_size: int = 256, *,
                       k: int | None = None, step: float | None = None) -> dict:
    """Test-time training: one pass over the split's inputs writes the memory (top-k slots per query),
    then the split is evaluated with the adapted memory; the trained memory is restored after."""
    model.start_test_time_training(k, step)
    try:
        embed_split(model, data, device, batch_size)  # the adaptation pass
        model.test_time_training = False
        return evaluate_split(model, data, device, batch_size)
    finally:
        model.reset_memory()
