"""The [train] settings of a run, with their defaults (`trimodal.training.config` loads and checks them).

Kept apart from the config loader so that model families, which read these settings, do not import the
loader (which imports the model registry)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    epochs: int = 10
    # The global batch: rows per step over all ranks together (each of N ranks takes batch_size / N), so
    # that N ranks train the model one process with this batch would (contrastive losses see all of it).
    batch_size: int = 64
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # the cosine schedule ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    grad_accum: int = 1
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    seed: int = 0
    num_workers: int = 2
    shuffle_buffer: int = 1000
    max_audio_seconds: float = 10.0  # longer utterances are cropped (randomly in training)
    modalities: list[str] = field(default_factory=lambda: ["image", "text", "audio"])
    loss_weights: dict[str, float] = field(default_factory=lambda: {"image-text": 1.0, "image-audio": 1.0, "text-audio": 1.0})
    val_split: str = "val"
    eval_batch_size: int = 256
    log_every: int = 10
    device: str = "auto"
    # Stop after this many optimizer steps in all (0: no limit); the epoch it falls in ends there, with its
    # validation and checkpoints, and the schedule is laid out over these steps.
    max_steps: int = 0
    # How many sample streams make one global batch (0: the number of ranks the run starts with). The
    # sample order is a function of (seed, epoch, data_streams, num_workers): a run continued on any number
    # of ranks that divides data_streams reads the same global batches (see trimodal.training.sample_order).
    data_streams: int = 0
    # Checkpoints between epoch ends (0: none): every this many optimizer steps and/or minutes, each holding
    # the exact data position, so that --resume continues mid-epoch as if never stopped. The
    # `keep_checkpoints` newest stay in checkpoints/ (step-<N>.*), besides last.* and best.*.
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 0.0
    keep_checkpoints: int = 1
    # A wall-clock budget for this invocation (0: none; `mm train --time-limit` sets it): the run stops with
    # a checkpoint before it runs out, leaving time for the checkpoint (see trimodal.training.stopping).
    max_minutes: float = 0.0
    # Under torchrun: how long a rank waits for the others in one collective before the job ends with an
    # error (a rank that died or stalls); and the backend (auto: nccl on CUDA, gloo on the CPU).
    dist_timeout_s: float = 600.0
    dist_backend: str = "auto"
    # [[train.stages]]: consecutive phases, each {name, epochs, losses = [names the family knows],
    # weights = {loss = w} (optional)}; `epochs` is then their sum, or, when set too, where the run stops
    # (the stages in order, cut there). Empty: one phase of `epochs`.
    stages: list[dict] = field(default_factory=list)
    # Where records go besides metrics.jsonl: "tensorboard" (events in RUN/tensorboard) and/or "wandb" (a
    # Weights & Biases run in `wandb_project`, `wandb_entity` or wandb's default; see
    # trimodal.training.wandb_log). Missing wandb or a missing login stops the run before it trains, unless
    # `wandb_optional`, which trains on without wandb and says so.
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Every this many optimizer steps (0: never), each attention head's focus on a fixed batch of validation
    # rows goes to metrics.jsonl, plots/attention-heads.png and cross-modal maps (trimodal.training.attention_heads).
    # On by default: a probe costs about 1% of a step at every 10 steps on the tiny configs (docs/benchmarks.md).
    attention_every: int = 50
    wandb_project: str = "trimodal"
    wandb_entity: str = ""
    wandb_optional: bool = False

    def stage_at(self, epoch: int) -> dict | None:
        """The stage epoch `epoch` (0-based) belongs to; None without stages."""
        end = 0
        for stage in self.stages:
            end += stage["epochs"]
            if epoch < end:
                return stage
        return self.stages[-1] if self.stages else None

    def last_stage_start(self) -> int:
        """The first epoch of the last stage (0 without stages): the model's final form starts there."""
        return sum(stage["epochs"] for stage in self.stages[:-1])
