"""Captions for image vectors from any family that generates them (`Family.caption_images`), as text."""

from __future__ import annotations

import numpy as np
import torch

from trimodal.features.text import OpenClipTokenizer


def generate_captions(model, images: np.ndarray, tokenizer: OpenClipTokenizer, device, *, beams: int = 1,
                      episode_size: int = 32) -> tuple[list[str], np.ndarray]:
    """A caption for each (N, image_dim) image vector (`Family.caption_images`, decoded by `tokenizer`), and
    the memory slot weights of each read (N, K)."""
    start, end = tokenizer.special_ids()
    vectors = torch.from_numpy(np.asarray(images, np.float32)).to(device)
    ids, weights = model.caption_images(vectors, start=start, end=end, beams=beams, episode_size=episode_size)
    return [tokenizer.decode(row) for row in ids], weights.float().cpu().numpy()
