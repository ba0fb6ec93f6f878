"""Autoregressive decoding: beam search (greedy is one beam) over a model's next-token log-probabilities.

`next_log_probs(rows, ids)` gets, for hypotheses of the conditioning rows `rows` (B',), their tokens so
far (B', t) and returns (B', V) log-probabilities of the next token. A hypothesis ends at `end`. Finished
hypotheses are ranked by their summed log-probability over length^`length_penalty`; an input row is done
at `max_tokens`, or once it has `beams` finished ones that its best live beam, scored as if it ended
now, does not beat (HF transformers' `early_stopping=False` rule).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def beam_search(next_log_probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows: int, *, start: int,
                end: int, beams: int = 1, max_tokens: int = 32, length_penalty: float = 1.0,
                device: torch.device | str = "cpu") -> list[list[int]]:
    """The best token sequence (without `start` and `end`) for each of `rows` inputs."""
    if beams < 1:
        raise ValueError("beams must be at least 1")
    alive = list(range(rows))  # inputs still searching
    hypotheses = {r: [([start], 0.0)] for r in alive}  # per input: its live beams (tokens, score)
    finished: dict[int, list[tuple[float, list[int]]]] = {r: [] for r in alive}
    for _ in range(max_tokens):
        if not alive:
            break
        owners = [r for r in alive for _ in hypotheses[r]]
        ids = torch.tensor([tokens for r in alive for tokens, _ in hypotheses[r]], device=device)
        scores = torch.tensor([score for r in alive for _, score in hypotheses[r]], device=device)
        log_probs = next_log_probs(torch.tensor(owners, device=device), ids).float()
        totals = (scores[:, None] + log_probs).cpu()
        still = []
        position = 0
        for r in alive:
            count = len(hypotheses[r])
            block = totals[position : position + count].flatten()
            position += count
            best_scores, best = block.topk(min(2 * beams, block.numel()))
            vocabulary = totals.shape[1]
            kept = []
            for rank, (score, flat) in enumerate(zip(best_scores.tolist(), best.tolist())):
                tokens = hypotheses[r][flat // vocabulary][0] + [flat % vocabulary]
                if flat % vocabulary == end:
                    if rank < beams:  # an end ranked below the live beams is not a contender
                        finished[r].append((score / (len(tokens) - 1) ** length_penalty, tokens))
                else:
                    kept.append((tokens, score))
                    if len(kept) == beams:
                        break
            if kept and not _done(finished[r], kept, beams, length_penalty):
                hypotheses[r] = kept
                still.append(r)
        alive = still
    results, searching = [], set(alive)  # inputs that reached max_tokens still searching
    for r in range(rows):
        candidates = finished[r] + ([(score / max(1, len(tokens) - 1) ** length_penalty, tokens)
                                     for tokens, score in hypotheses[r]] if r in searching else [])
        tokens = max(candidates, key=lambda c: c[0])[1]
        results.append([t for t in tokens[1:] if t != end])
    return results


def _done(finished: list[tuple[float, list[int]]], live: list[tuple[list[int], float]], beams: int,
          length_penalty: float) -> bool:
    if len(finished) < beams:
        return False
    worst_kept = sorted((score for score, _ in finished), reverse=True)[beams - 1]
    tokens, score = live[0]  # the best live beam
    return worst_kept >= score / len(tokens) ** length_penalty
