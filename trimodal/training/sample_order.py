"""Which samples each rank and loader worker reads in an epoch, and in what order, as a pure function of the
split's shard sizes (index.json), the seed, the epoch and the layout: every rank takes exactly the same
number of steps, and the global sample order does not depend on how many ranks share it.

    shards, permuted by (seed, epoch)  ->  one sequence of samples  ->  cut into contiguous ranges, one per
    stream (g, q): G groups (the loader workers, at least 1) × Q streams (`train.data_streams`)

Global batch b is drawn from the streams of group g = b mod G: B/Q rows from each of its Q streams, in
stream order. Rank r of N holds streams [r·Q/N, (r+1)·Q/N) of every group, so its rows of batch b are
one contiguous block of the global batch, and loader worker g of every rank makes exactly the batches of
group g (a DataLoader hands out its workers' batches in turn). Each stream reads its range through a
shuffle buffer seeded by (seed, epoch, stream). One process and N ranks with the same Q and G therefore
see the same global batches, row for row; N must divide Q.

Ranges cut shards at sample level, so any number of shards serves any number of ranks and workers (a
shard can be split between two streams, each reading its own rows). Training (`drop_last`) has
samples // B global batches, rounded down to a multiple of the gradient accumulation; the tail of the
sequence that fills no batch (fewer than B × accumulation samples) is dropped, a different tail every
epoch as the shard order changes, and reported as `EpochPlan.dropped`. Without `drop_last` (one process
reading a split once) nothing is dropped and the last batch is short.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trimodal.errors import ConfigError


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of shard `shard` (its position in the split's shard list)."""

    shard: int
    start: int
    stop: int


@dataclass
class EpochPlan:
    batches: int  # global batches in the epoch
    batch_size: int
    streams: int  # Q
    groups: int  # G
    pieces: dict[tuple[int, int], list[Piece]]  # (group, stream) -> its range of the epoch's sequence
    samples: int  # in the split
    dropped: int  # samples of the split in no batch this epoch

    def group_batches(self, group: int) -> list[int]:
        """The global batch numbers that group `group` makes, in order."""
        return list(range(group, self.batches, self.groups))

    def rows(self, batch: int, stream: int) -> int:
        """How many rows stream `stream` gives to global batch `batch`."""
        size = self.batch_rows(batch)
        return size // self.streams + (stream < size % self.streams)

    def batch_rows(self, batch: int) -> int:
        last = self.samples - self.dropped - (self.batches - 1) * self.batch_size
        return self.batch_size if batch < self.batches - 1 else last


def shard_permutation(count: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The same permutation of the split's shards on every rank: by (seed, epoch) before any split."""
    order = list(range(count))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def plan_epoch(shard_samples: Sequence[int], *, batch_size: int, streams: int, groups: int, seed: int, epoch: int,
               shuffle: bool, drop_last: bool, multiple: int = 1) -> EpochPlan:
    """The epoch's layout (see the module doc). Without `drop_last` the last batch may be short and no sample is
    dropped; with it, every batch holds `batch_size` rows and the batches are a multiple of `multiple`."""
    if streams < 1 or groups < 1 or batch_size < 1:
        raise ConfigError("streams, groups and the batch size must be at least 1")
    if batch_size % streams:
        raise ConfigError(f"the batch of {batch_size} rows cannot be drawn evenly from {streams} data streams "
                          "(train.data_streams must divide train.batch_size)")
    total = int(sum(shard_samples))
    batches = epoch_batches(total, batch_size, drop_last=drop_last, multiple=multiple)
    plan = EpochPlan(batches, batch_size, streams, groups, {}, total, total - batches * batch_size if drop_last else 0)
    # How many samples each (group, stream) gives over the epoch, then consecutive ranges in that order.
    needs = {(g, q): sum(plan.rows(b, q) for b in plan.group_batches(g)) for g in range(groups) for q in range(streams)}
    order = shard_permutation(len(shard_samples), seed=seed, epoch=epoch, shuffle=shuffle)
    cursor = [(shard, 0) for shard in order if shard_samples[shard] > 0]
    position = 0  # into `cursor`
    offset = 0  # rows of cursor[position] already handed out
    for key in sorted(needs):
        wanted, pieces = needs[key], []
        while wanted > 0:
            shard = cursor[position][0]
            take = min(wanted, shard_samples[shard] - offset)
            pieces.append(Piece(shard, offset, offset + take))
            wanted -= take
            offset += take
            if offset == shard_samples[shard]:
                position, offset = position + 1, 0
        plan.pieces[key] = pieces
    return plan


def epoch_batches(samples: int, batch_size: int, *, drop_last: bool, multiple: int = 1) -> int:
    """Global batches of an epoch of `samples`: whole ones, a multiple of `multiple` (`drop_last`), or every
    sample with the last batch short."""
    return samples // batch_size // multiple * multiple if drop_last else -(-samples // batch_size)


def stream_order(pieces: Sequence[Piece], *, buffer: int, rng: np.random.Generator | None) -> list[tuple[int, int]]:
    """(piece number, row of the shard) of every sample of a stream, in the order it yields them: through a
    shuffle buffer of `buffer` samples drawn by `rng` (None: in order). Indices only, so the order is known
    before (and without) reading any sample."""
    positions = [(number, row) for number, piece in enumerate(pieces) for row in range(piece.start, piece.stop)]
    if rng is None or buffer <= 1 or len(positions) <= 1:
        return positions
    size = min(buffer, len(positions))
    held = positions[:size]
    slots = rng.integers(0, size, len(positions) - size) if len(positions) > size else []
    out = []
    for incoming, slot in zip(positions[size:], slots):
        out.append(held[slot])
        held[slot] = incoming
    rng.shuffle(held)
    out += held
    return out


def rank_streams(streams: int, rank: int, world_size: int) -> range:
    """The streams (of every group) that rank `rank` of `world_size` reads."""
    if streams % world_size:
        raise ConfigError(f"{world_size} ranks cannot share {streams} data streams evenly (train.data_streams must "
                          "be a multiple of the number of ranks)")
    share = streams // world_size
    return range(rank * share, (rank + 1) * share)
