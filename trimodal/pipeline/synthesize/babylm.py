"""BabyLM-format files made locally: templated captions and DINOv2-shaped vectors that depend on them.

Used by tests, benchmarks and demos where the real 9.8 GB cannot be fetched. Each row draws a shape,
colour, background, size and position (the mini dataset's vocabulary), says them in a caption, and gets
a float32 vector that sums one fixed random vector per attribute value plus noise, so that retrieval
between a caption and its vector is learnable. Written in blocks: a million rows never sit in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trimodal.pipeline.synthesize.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, TEMPLATES

WIDTH = 768
_BLOCK = 50_000
_ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS),
               "size": tuple(SIZES), "position": tuple(POSITIONS)}


def _directions(seed: int) -> dict[str, np.ndarray]:
    generator = np.random.default_rng([seed, 7])
    return {name: generator.standard_normal((len(values), WIDTH)).astype(np.float32)
            for name, values in _ATTRIBUTES.items()}


def _block(generator: np.random.Generator, count: int, directions: dict, noise: float) -> tuple[list[str], np.ndarray]:
    picks = {name: generator.integers(0, len(values), count) for name, values in _ATTRIBUTES.items()}
    templates = generator.integers(0, len(TEMPLATES), count)
    captions = [TEMPLATES[templates[i]].format(**{name: _ATTRIBUTES[name][picks[name][i]] for name in _ATTRIBUTES})
                for i in range(count)]
    vectors = sum(directions[name][picks[name]] for name in _ATTRIBUTES)
    vectors = vectors + noise * generator.standard_normal((count, WIDTH)).astype(np.float32)
    return captions, vectors.astype(np.float32)


def write_part(target: Path, captions_file: str, feature_files: list[str], rows: int, *, seed: int = 0,
               noise: float = 1.0) -> None:
    """`captions_file` (a JSON list of strings) and `feature_files` ((n, 768) float32 each, the rows split
    evenly between them, in order) under `target`."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng([seed, len(captions_file)])
    directions = _directions(seed)
    bounds = np.linspace(0, rows, len(feature_files) + 1).astype(int)
    matrices = [np.lib.format.open_memmap(target / name, mode="w+", dtype=np.float32, shape=(int(b - a), WIDTH))
                for name, a, b in zip(feature_files, bounds, bounds[1:])]
    with open(target / captions_file, "w", encoding="utf-8") as writer:
        writer.write("[")
        for start in range(0, rows, _BLOCK):
            count = min(_BLOCK, rows - start)
            captions, vectors = _block(generator, count, directions, noise)
            writer.write(("," if start else "") + ",".join(json.dumps(caption) for caption in captions))
            # A block may straddle two files.
            for matrix, a, b in zip(matrices, bounds, bounds[1:]):
                low, high = max(a, start), min(b, start + count)
                if low < high:
                    matrix[low - a : high - a] = vectors[low - start : high - start]
        writer.write("]")
    for matrix in matrices:
        matrix.flush()
    del matrices


def write_babylm(target: Path, *, cc3m: int = 0, localized_narratives: int = 0, seed: int = 0,
                 noise: float = 1.0) -> None:
    """A `babylm-mm/` folder in the real file names and formats, with the rows asked for per part."""
    if cc3m:
        write_part(target, "cc_3M_captions.json", ["cc_3M_dino_v2_states_1of2.npy", "cc_3M_dino_v2_states_2of2.npy"],
                   cc3m, seed=seed, noise=noise)
    if localized_narratives:
        write_part(target, "local_narr_captions.json", ["local_narr_dino_v2_states.npy"], localized_narratives,
                   seed=seed + 1, noise=noise)
