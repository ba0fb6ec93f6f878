"""Run by the distributed tests, under torchrun (or as one plain process for the reference):

    python -m torch.distributed.run --nproc-per-node 2 tests/training/distributed_worker.py families SPEC.json OUT
    python tests/training/distributed_worker.py families SPEC.json OUT

`families`: for every family in SPEC ({family: {"config", "shards", "store", "overrides"}}), the first step's
loss and gradients on the first global batch (rank 0 writes OUT/<family>/step.pt), then a short training
run into OUT/<family>/run through the real trainer, all in one process group.

    ... train SPEC.json     # one `train()` call: {"config", "shards", "store", "out", "overrides", "resume",
                            #                      "stop_after_epoch", "stop_at_step"}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from trimodal import distributed  # noqa: E402
from trimodal.training.config import load_config  # noqa: E402
from trimodal.training.data import TrimodalDataset, open_sources  # noqa: E402
from trimodal.training.trainer import (StepLoss, _seed_epoch, _seed_everything, _wrap, build_from_config,  # noqa: E402
                                       enter_stage, stage_weights, train)


def first_step(spec: dict, dist: distributed.Dist) -> dict:
    """The loss, its parts and every parameter's gradient after one step on the first global batch."""
    config = load_config(Path(spec["config"]), spec["overrides"])
    settings = config.train
    sources = open_sources(Path(spec["shards"]), Path(spec["store"]), ["train"])
    _seed_everything(settings.seed)
    model, _ = build_from_config(config, sources.store.config)
    dataset = TrimodalDataset(sources, split="train", modalities=settings.modalities, batch_size=settings.batch_size,
                              seed=settings.seed, drop_last=True, rank=dist.rank, world_size=dist.world_size,
                              streams=settings.data_streams, inputs=model.store_inputs())
    batch = next(iter(dataset))
    _seed_epoch(settings.seed, 0, dist.rank)
    stage = enter_stage(model, settings, 0)
    model.train()
    step = _wrap(StepLoss(model, settings.modalities, amp=False), dist)
    loss, parts = step(batch, stage_weights(settings, stage))
    loss.backward()
    return {"loss": loss.detach(), "parts": {k: v.detach() for k, v in parts.items()},
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}


def families(spec_file: str, out: str) -> None:
    specs = json.loads(Path(spec_file).read_text())
    with distributed.session("cpu", timeout_s=120) as dist:
        for family, spec in specs.items():
            folder = Path(out) / family
            result = first_step(spec, dist)
            if dist.main:
                folder.mkdir(parents=True, exist_ok=True)
                torch.save(result, folder / "step.pt")
            train(Path(spec["config"]), Path(spec["shards"]), Path(spec["store"]), folder / "run",
                  overrides=spec["overrides"], overwrite=True)


def one_run(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    train(Path(spec["config"]), Path(spec["shards"]), Path(spec["store"]), Path(spec["out"]),
          overrides=spec["overrides"], resume=spec.get("resume", False), stop_after_epoch=spec.get("stop_after_epoch"),
          stop_at_step=spec.get("stop_at_step"))


if __name__ == "__main__":
    if sys.argv[1] == "families":
        families(sys.argv[2], sys.argv[3])
    else:
        one_run(sys.argv[2])
