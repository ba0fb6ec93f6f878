"""`mm train` and `mm eval` under torchrun: 2 ranks with gloo on the CPU, for real (each launch is a few
seconds of process start-up, so the families share one launch)."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import gone, mm_torchrun, one_process, ranks_of, succeeded, torchrun, wait_for

from trimodal.training.config import featurize_line, load_config, shipped_config
from trimodal.training.models import available_models, family_class, model_defaults

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
FAMILIES = available_models()
# Stated tolerances. The first step: the loss to 1e-5 of its value; the whole gradient (every parameter's,
# concatenated) to 1e-3 of its norm; each parameter's to 2e-2 of its own norm plus 1e-5 of the whole
# gradient's. The two sum the same numbers in other orders: the float families agree to ~1e-7 of the
# whole gradient (measured), bitmar to ~5e-4 here and 1.1e-3 on CI's machine, because its 8-bit activations
# then round a few values to the neighbouring level, and how many depends on the CPU's kernels: its whole
# gradient is held to QUANTISED_GRADIENT_TOLERANCE. After a 6-step run (past nlmm's 4-step level and dualloop's first 5-step
# controller window): every weight tensor to 2e-2 of its norm, or each of its values to one learning rate
# (Adam turns tiny differences of near-zero gradients into differences of a step's size).
LOSS_TOLERANCE, GRADIENT_TOLERANCE, TENSOR_TOLERANCE, WEIGHT_TOLERANCE = 1e-5, 1e-3, 2e-2, 2e-2
QUANTISED, QUANTISED_GRADIENT_TOLERANCE = {"bitmar"}, 5e-3


@pytest.fixture(scope="module")
def family_runs(featurized_mini, mini_shards, tmp_path_factory):
    """Every family's first step and a 6-step run, once as 1 process × 32 rows, once as 2 ranks × 16."""
    base = tmp_path_factory.mktemp("distributed-families")
    specs = {}
    for family in FAMILIES:
        config = shipped_config(f"{family}-tiny")
        overrides = ["train.epochs=1", "train.max_steps=6", "train.batch_size=32", "train.num_workers=0",
                     "train.data_streams=2", "train.log_every=1"]
        if "dropout" in model_defaults(family):  # dropout masks depend on how rows fall on ranks
            overrides.append("model.dropout=0.0")
        if family_class(family).loss_names:  # a family that trains in stages: every loss at once
            losses = json.dumps(list(family_class(family).default_losses))
            overrides.append(f'train.stages=[{{ name = "all", epochs = 1, losses = {losses} }}]')
        specs[family] = {"config": str(config), "shards": str(mini_shards), "overrides": overrides,
                         "store": str(featurized_mini(featurize_line(config)))}
    (base / "spec.json").write_text(json.dumps(specs))
    succeeded(one_process(WORKER, "families", base / "spec.json", base / "one"))
    succeeded(torchrun(WORKER, "families", base / "spec.json", base / "two"))
    return base / "one", base / "two"


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_with_half_batches_give_the_first_step_of_one_process(family, family_runs):
    one, two = (torch.load(folder / family / "step.pt", weights_only=True) for folder in family_runs)
    assert one["loss"] == pytest.approx(float(two["loss"]), rel=LOSS_TOLERANCE)
    assert one["parts"].keys() == two["parts"].keys()
    assert one["grads"].keys() == two["grads"].keys() and one["grads"]
    whole = torch.cat([g.flatten() for g in one["grads"].values()])
    other = torch.cat([two["grads"][name].flatten() for name in one["grads"]])
    tolerance = QUANTISED_GRADIENT_TOLERANCE if family in QUANTISED else GRADIENT_TOLERANCE
    assert float((whole - other).norm()) <= tolerance * float(whole.norm()), family
    for name, gradient in one["grads"].items():
        difference = float((gradient - two["grads"][name]).norm())
        assert difference <= TENSOR_TOLERANCE * float(gradient.norm()) + 1e-5 * float(whole.norm()), (family, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_short_run_on_two_ranks_ends_close_to_one_process(family, family_runs):
    one, two = (load_file(str(folder / family / "run" / "checkpoints" / "last.safetensors")) for folder in family_runs)
    lr = load_config(shipped_config(f"{family}-tiny")).train.lr
    assert one.keys() == two.keys()
    for name, weights in one.items():
        if weights.is_floating_point():
            difference = weights.float() - two[name].float()
            assert (float(difference.norm()) <= WEIGHT_TOLERANCE * float(weights.float().norm())
                    or float(difference.abs().max()) <= lr), (family, name)
    resolved = (family_runs[1] / family / "run" / "config.resolved.toml").read_text()
    assert "world_size = 2" in resolved and "batch_per_rank = 16" in resolved and "batch_size = 32" in resolved


def _shard_set(mini_root, folder: Path, max_samples: int) -> tuple[Path, Path]:
    """The mini dataset cut into shards of `max_samples`, featurized with a small image tower and no audio."""
    from trimodal.features.featurize import FeaturizeOptions, featurize
    from trimodal.pipeline.shard.writer import ShardOptions
    from trimodal.pipeline.datasets import shard_dataset

    shard_dataset("mini", mini_root, folder / "shards", ShardOptions(max_samples=max_samples, workers=2))
    featurize(folder / "shards", folder / "f.zarr", FeaturizeOptions(device="cpu", image="open_clip:ViT-S-32", audio=None))
    return folder / "shards", folder / "f.zarr"


@pytest.fixture(scope="module")
def three_shards(mini_root, tmp_path_factory):
    """Training split in 3 shards (70, 70, 60 samples)."""
    return _shard_set(mini_root, tmp_path_factory.mktemp("three-shards"), 70)


@pytest.fixture(scope="module")
def five_shards(mini_root, tmp_path_factory):
    """Training split in 5 shards of 40."""
    return _shard_set(mini_root, tmp_path_factory.mktemp("five-shards"), 40)


QUICK = ["train.modalities=[\"image\", \"text\"]", "train.batch_size=24", "train.warmup_steps=2", "model.layers=1",
         "model.model_dim=64", "model.latent_dim=32", "model.dropout=0.0", "train.log_every=1"]


def _run_spec(folder: Path, shards: Path, store: Path, out: Path, overrides: list[str], **more) -> Path:
    spec = folder / f"{out.name}-{len(list(folder.glob('*.json')))}.json"
    spec.write_text(json.dumps({"config": str(shipped_config("mmn-tiny")), "shards": str(shards), "store": str(store),
                                "out": str(out), "overrides": overrides, **more}))
    return spec


def test_five_shards_on_two_ranks_with_two_workers_take_equal_steps_and_eval_matches_one_process(five_shards, tmp_path):
    from trimodal.training.eval_run import evaluate_run

    shards, store = five_shards
    run = tmp_path / "run"
    result = mm_torchrun("train", shipped_config("mmn-tiny"), "--shards", shards, "--features", store, "--out", run,
                         *QUICK, "train.epochs=2", "train.num_workers=2", "train.dist_timeout_s=120")
    succeeded(result)
    assert "24 samples a step (2 ranks × 12); 8 steps an epoch, 8 training samples in no batch" in result.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "val"] == [8, 16]
    two = mm_torchrun("eval", run, "--split", "test", "--device", "cpu")
    succeeded(two)
    assert two.stdout.count("image->text") == 1  # rank 0 alone prints
    distributed = json.loads((run / "eval-test.json").read_text())
    alone = evaluate_run(run, split="test", device="cpu")
    assert distributed["directions"] == alone["directions"]


def test_a_two_rank_run_stopped_mid_epoch_resumes_bit_exactly_on_two_ranks(three_shards, tmp_path):
    """With dropout: every rank's random state is in the checkpoint."""
    shards, store = three_shards
    overrides = [o for o in QUICK if "dropout" not in o] + ["train.epochs=2", "train.num_workers=1", "model.dropout=0.2"]
    straight, run = tmp_path / "straight", tmp_path / "stopped"
    succeeded(torchrun(WORKER, "train", _run_spec(tmp_path, shards, store, straight, overrides)))
    succeeded(torchrun(WORKER, "train", _run_spec(tmp_path, shards, store, run, overrides, stop_at_step=11)))
    state = torch.load(run / "checkpoints" / "last.state.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["batches_done"], len(state["random"])) == (1, 11, 3, 2)
    succeeded(torchrun(WORKER, "train", _run_spec(tmp_path, shards, store, run, overrides, resume=True)))
    a = load_file(str(straight / "checkpoints" / "last.safetensors"))
    b = load_file(str(run / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_two_rank_run_stopped_mid_epoch_resumes_on_one_process_with_the_same_global_order(three_shards, tmp_path):
    from trimodal.training.trainer import train

    shards, store = three_shards
    overrides = QUICK + ["train.epochs=2", "train.num_workers=0", "train.data_streams=2"]
    run = tmp_path / "two-then-one"
    succeeded(torchrun(WORKER, "train", _run_spec(tmp_path, shards, store, run, overrides, stop_at_step=3)))
    notes = []
    resumed = train(shipped_config("mmn-tiny"), shards, store, run, overrides=overrides, resume=True,
                    on_start=lambda start: notes.extend(start.notes))
    assert resumed.world_size == 1 and resumed.train_steps == 16 - 3
    assert any("the global sample order is the same" in note for note in notes)
    straight = tmp_path / "one"
    train(shipped_config("mmn-tiny"), shards, store, straight, overrides=overrides)
    a = load_file(str(straight / "checkpoints" / "last.safetensors"))
    b = load_file(str(run / "checkpoints" / "last.safetensors"))
    for name, weights in a.items():
        difference = weights.float() - b[name].float()
        assert (float(difference.norm()) <= WEIGHT_TOLERANCE * float(weights.float().norm())
                or float(difference.abs().max()) <= 5e-4), name


def test_a_one_process_run_resumes_on_two_ranks(three_shards, tmp_path):
    from trimodal.training.trainer import train

    shards, store = three_shards
    overrides = QUICK + ["train.epochs=2", "train.num_workers=0"]
    run = tmp_path / "one-then-two"
    train(shipped_config("mmn-tiny"), shards, store, run, overrides=overrides, stop_after_epoch=0)
    result = mm_torchrun("train", shipped_config("mmn-tiny"), "--shards", shards, "--features", store, "--out", run,
                         "--resume", *overrides)
    succeeded(result)
    assert "ranks cannot share" in result.stderr and "reads 2" in result.stderr  # the data streams change, said once
    state = torch.load(run / "checkpoints" / "last.state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["world_size"] == 2 and state["data_streams"] == 2


def _training_on_two_ranks(shards, features, run: Path, *overrides):
    """A long `mm train` on 2 ranks, once it is training: (torchrun's process, the ranks' pids)."""
    launcher = mm_torchrun("train", shipped_config("mmn-tiny"), "--shards", shards, "--features", features,
                           "--out", run, "train.epochs=50", *overrides, wait=False)
    ranks = ranks_of(launcher)
    wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0, 180,
             "the first training records")
    return launcher, ranks


def test_sigterm_to_the_job_stops_both_ranks_at_one_step_with_a_checkpoint_that_resumes(mini_shards, mini_features,
                                                                                        tmp_path):
    """As SLURM stops a job: SIGTERM to every process (torchrun, the ranks, their loader workers)."""
    run = tmp_path / "run"
    launcher, ranks = _training_on_two_ranks(mini_shards, mini_features, run, "train.num_workers=1")
    os.killpg(launcher.pid, signal.SIGTERM)
    signalled = time.monotonic()
    output, _ = launcher.communicate(timeout=120)
    state = torch.load(run / "checkpoints" / "last.state.pt", weights_only=True)
    assert time.monotonic() - signalled < 30  # torchrun's own grace period before it kills its ranks
    assert output.count("stopped by SIGTERM at step") == 1, output[-3000:]  # rank 0's line
    assert f"at step {state['step']}, batch {state['batches_done']}/" in output
    assert "--resume" in output and "DataLoader worker" not in output
    assert not state["epoch_done"] and len(state["random"]) == 2 and state["world_size"] == 2
    result = mm_torchrun("train", shipped_config("mmn-tiny"), "--shards", mini_shards, "--features", mini_features,
                         "--out", run, "train.epochs=50", "train.num_workers=1", f"train.max_steps={state['step'] + 2}",
                         "--resume")
    succeeded(result)
    assert torch.load(run / "checkpoints" / "last.state.pt", weights_only=True)["step"] == state["step"] + 2


def test_a_killed_rank_ends_the_job_with_an_error_in_bounded_time(mini_shards, mini_features, tmp_path):
    launcher, ranks = _training_on_two_ranks(mini_shards, mini_features, tmp_path / "run", "train.num_workers=1",
                                             "train.dist_timeout_s=60")
    killed = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert time.monotonic() - killed < 60, "the job outlived its timeout"
    assert "Signal 9" in output or "SIGKILL" in output


def test_a_stalled_rank_ends_the_job_after_the_timeout_with_one_clear_line(mini_shards, mini_features, tmp_path):
    launcher, ranks = _training_on_two_ranks(mini_shards, mini_features, tmp_path / "run", "train.num_workers=0",
                                             "train.dist_timeout_s=10")
    stalled = time.monotonic()
    os.kill(ranks[1], signal.SIGSTOP)
    try:
        wait_for(lambda: gone(ranks[0]), 60, "rank 0 to give up on the stalled rank")
        gave_up = time.monotonic() - stalled
    finally:
        os.kill(ranks[1], signal.SIGCONT)  # so that torchrun's SIGTERM reaches it
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert 10 <= gave_up < 40  # train.dist_timeout_s=10, plus the step it was in
    assert "rank 0: error: rank 0: " not in output
    assert "another rank died, stalled or stopped" in output


def _launched(monkeypatch, **variables) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, str(value))


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("variables, overrides, message", [
    ({"RANK": 0, "WORLD_SIZE": 2, "LOCAL_RANK": 3, "LOCAL_WORLD_SIZE": 2}, [],
     "error: LOCAL_RANK 3 does not fit the 2 processes of this node"),
    ({"RANK": 0, "WORLD_SIZE": 2}, [], "error: MASTER_ADDR and MASTER_PORT not set: torchrun sets them"),
    ({"RANK": 0, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1}, ['train.dist_backend="nccl"'],
     "error: the nccl backend needs CUDA devices; this rank runs on the CPU (use gloo)"),
    ({"RANK": 1, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "closed"}, ["train.dist_timeout_s=3"],
     "rank 1: error: rank 1 could not join the process group at 127.0.0.1:"),
], ids=["local-rank", "no-rendezvous", "backend", "unreachable-rendezvous"])
def test_a_bad_launch_is_one_clear_line(variables, overrides, message, mm, monkeypatch, mini_shards, mini_features,
                                        tmp_path):
    if variables.get("MASTER_PORT") == "closed":
        variables = {**variables, "MASTER_PORT": _closed_port()}
    _launched(monkeypatch, **variables)
    started = time.monotonic()
    result = mm("train", shipped_config("mmn-tiny"), "--shards", mini_shards, "--features", mini_features,
                "--out", tmp_path / "run", "train.device=\"cpu\"", *overrides)
    assert result.exit_code == 1 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert time.monotonic() - started < 60 and not (tmp_path / "run").exists()


def test_two_processes_started_as_srun_starts_them_train_together(three_shards, tmp_path):
    """srun starts every task itself and sets SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID; the batch
    script exports MASTER_ADDR and MASTER_PORT. No torchrun involved."""
    import subprocess
    import sys

    from tests.launch import REPOSITORY

    shards, store = three_shards
    port = _closed_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    tasks = [subprocess.Popen([sys.executable, "-m", "trimodal", "train", str(shipped_config("mmn-tiny")), "--shards",
                               str(shards), "--features", str(store), "--out", str(tmp_path / "run"), *QUICK,
                               "train.epochs=1", "train.num_workers=0", "train.dist_timeout_s=60"],
                              cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**base, "PYTHONPATH": str(REPOSITORY), "SLURM_PROCID": str(task), "SLURM_NTASKS": "2",
                                   "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": str(task),
                                   "SLURM_STEP_TASKS_PER_NODE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for task in range(2)]
    outputs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    assert "(2 ranks × 12)" in outputs[0] and outputs[1].strip() == ""  # task 1 prints nothing
    assert "world_size = 2" in (tmp_path / "run" / "config.resolved.toml").read_text()


def test_a_batch_script_outside_srun_is_one_process():
    """sbatch's own step sees SLURM_PROCID=0 and the allocation's SLURM_NTASKS; only srun's steps are ranks."""
    from trimodal.distributed import launch_environment

    assert launch_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "32"}).world_size == 1
    launch = launch_environment({"SLURM_PROCID": "9", "SLURM_NTASKS": "32", "SLURM_STEP_NUM_TASKS": "16",
                                 "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (9, 16, 1, 8)
