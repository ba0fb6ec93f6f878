import json
import tomllib

import pytest
import torch
from safetensors.torch import load_file

from trimodal.errors import ConfigError, TrimodalError
from trimodal.training.config import load_config, shipped_config
from trimodal.training.eval_run import evaluate_run
from trimodal.training.optimization import lr_at
from trimodal.training.trainer import train

QUICK = ["train.epochs=2", "train.num_workers=0", "train.batch_size=50", "train.warmup_steps=2",
         "model.layers=1", "model.model_dim=64", "model.latent_dim=32", "model.memory_slots=8", "model.central_slots=8"]


@pytest.fixture(scope="module")
def quick_run(mini_shards, mini_features, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "quick"
    result = train(shipped_config("mmn-tiny"), mini_shards, mini_features, run, overrides=QUICK)
    return run, result


def test_a_run_writes_checkpoints_metrics_plots_and_the_resolved_config(quick_run, mini_shards, mini_features):
    run, result = quick_run
    for name in ("config.resolved.toml", "metrics.jsonl", "checkpoints/best.safetensors", "checkpoints/last.safetensors",
                 "checkpoints/last.state.pt", "plots/losses.png", "plots/recalls.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    resolved = tomllib.loads((run / "config.resolved.toml").read_text())
    assert resolved["data"] == {"shards": str(mini_shards.resolve()), "features": str(mini_features.resolve())}
    assert resolved["model"]["name"] == "mmn" and resolved["model"]["image_dim"] == 512
    assert resolved["run"]["torch"] and resolved["run"]["git_commit"] and resolved["run"]["parameters"] == result.parameters
    state = torch.load(run / "checkpoints" / "last.state.pt", weights_only=True)
    assert state["epoch"] == 1 and set(state) >= {"optimization", "step", "best", "data_streams", "world_size"}
    assert resolved["run"]["world_size"] == 1 and resolved["run"]["batch_per_rank"] == 50
    assert resolved["train"]["data_streams"] == 1 and resolved["run"]["steps_per_epoch"] == 4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["type"] == "train"]
    assert train_records and set(train_records[0]["losses"]) == {"image-text", "image-audio", "text-audio"}
    assert [r["epoch"] for r in records if r["type"] == "val"] == [0, 1]


def test_plots_redrawn_at_most_every_interval_still_end_with_every_epoch(mini_shards, mini_features, tmp_path,
                                                                         monkeypatch):
    from trimodal.training import plots, trainer

    drawn = []
    monkeypatch.setattr(trainer, "PLOT_EVERY_SECONDS", 3600.0)
    monkeypatch.setattr(trainer, "plot_run", lambda run, family: drawn.append(
        [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "val"])
        or plots.plot_run(run, family))
    train(shipped_config("mmn-tiny"), mini_shards, mini_features, tmp_path / "run",
          overrides=[*QUICK, "train.epochs=3"])
    assert drawn == [[0], [0, 1, 2]]  # the first epoch's end, then the run's end (epochs 1 and 2 skipped)
    assert (tmp_path / "run" / "plots" / "recalls.png").is_file()


def test_a_non_empty_run_folder_is_refused(quick_run, mini_shards, mini_features):
    run, _ = quick_run
    with pytest.raises(TrimodalError, match="not empty; pass --resume .* or --overwrite"):
        train(shipped_config("mmn-tiny"), mini_shards, mini_features, run, overrides=QUICK)


def test_eval_writes_all_six_directions_and_ttt_side_by_side(quick_run):
    run, _ = quick_run
    result = evaluate_run(run, split="test", checkpoint="last", ttt=True, device="cpu")
    written = json.loads((run / "eval-test.json").read_text())
    assert written["split"] == "test" and written["ttt"] is True
    names = ["image->text", "text->image", "image->audio", "audio->image", "text->audio", "audio->text"]
    assert list(written["directions"]) == names and list(written["directions_ttt"]) == names
    for metrics in written["directions"].values():
        assert 0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 1
        assert metrics["median_rank"] >= 1 and 0 < metrics["chance@10"] < 1
    assert result["images"] == 60 and result["captions"] == 300 and result["utterances"] == 300


def test_ttt_settings_can_be_chosen_at_eval_time(quick_run):
    run, _ = quick_run
    result = evaluate_run(run, split="val", ttt=True, ttt_k=1, ttt_step=0.5, device="cpu")
    assert result["ttt_settings"] == {"k": 1, "step": 0.5}
    with pytest.raises(ConfigError, match="--ttt-k"):
        evaluate_run(run, split="val", ttt=True, ttt_k=0, device="cpu")


def test_eval_without_ttt_has_only_the_plain_result(quick_run):
    run, _ = quick_run
    written = evaluate_run(run, split="val", device="cpu")
    assert written["ttt"] is False and "directions_ttt" not in written
    assert (run / "eval-val.json").is_file()


@pytest.mark.parametrize("workers", [1, 2])
def test_resuming_mid_epoch_with_loader_workers_is_bit_exact(mini_shards, mini_features, tmp_path, workers):
    """Periodic checkpoints every 3 steps, the 2 newest kept; stopped after step 5 (batch 1 of epoch 2, an
    odd batch for 2 workers) and resumed: the weights equal an uninterrupted run's."""
    config = shipped_config("mmn-tiny")
    overrides = QUICK + [f"train.num_workers={workers}", "train.checkpoint_every_steps=3", "train.keep_checkpoints=2"]
    straight = train(config, mini_shards, mini_features, tmp_path / "straight", overrides=overrides)
    assert straight.train_steps == 8  # 200 samples // 50, two epochs
    stopped = train(config, mini_shards, mini_features, tmp_path / "resumed", overrides=overrides, stop_at_step=5)
    assert (stopped.stopped.epoch, stopped.stopped.step, stopped.stopped.batch) == (1, 5, 1)
    folder = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*.safetensors")) == ["step-00000004.safetensors",
                                                                       "step-00000005.safetensors"]
    resumed = train(config, mini_shards, mini_features, tmp_path / "resumed", overrides=overrides, resume=True)
    assert resumed.train_steps == 3
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last.safetensors"))
    b = load_file(str(folder / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Steps 6 (periodic) and 8 (the epoch's end) are the two newest; last.* names the newest.
    assert sorted(p.name for p in folder.glob("step-*.state.pt")) == ["step-00000006.state.pt", "step-00000008.state.pt"]
    assert torch.load(folder / "last.state.pt", weights_only=True)["weights"] == "step-00000008.safetensors"


def test_a_checkpoint_whose_last_state_was_not_replaced_resumes_from_the_previous_one(mini_shards, mini_features,
                                                                                     tmp_path):
    """A stop between writing a checkpoint's files and its last.state.pt: the older state names its own
    weights, which are still there, and the resumed run is exact."""
    import shutil

    config = shipped_config("mmn-tiny")
    overrides = QUICK + ["train.checkpoint_every_steps=1", "train.keep_checkpoints=2"]
    train(config, mini_shards, mini_features, tmp_path / "straight", overrides=overrides)
    run = tmp_path / "resumed"
    train(config, mini_shards, mini_features, run, overrides=overrides, stop_at_step=2)
    folder = run / "checkpoints"
    shutil.copyfile(folder / "step-00000001.state.pt", folder / "last.state.pt")  # as if stopped before the commit
    train(config, mini_shards, mini_features, run, overrides=overrides, resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last.safetensors"))
    b = load_file(str(folder / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_mid_epoch_checkpoint_refuses_another_data_layout_in_one_line(mini_shards, mini_features, tmp_path):
    config = shipped_config("mmn-tiny")
    train(config, mini_shards, mini_features, tmp_path / "run", overrides=QUICK, stop_at_step=1)
    with pytest.raises(ConfigError, match=r"middle of epoch 1 \(step 1\), read with train.num_workers=0"):
        train(config, mini_shards, mini_features, tmp_path / "run", overrides=QUICK + ["train.num_workers=2"],
              resume=True)


def test_a_time_limit_stops_with_a_checkpoint_that_resumes(mini_shards, mini_features, tmp_path):
    config = shipped_config("mmn-tiny")
    result = train(config, mini_shards, mini_features, tmp_path / "run", overrides=QUICK, time_limit=1e-6)
    assert result.stopped.reason == "the time limit" and result.stopped.step == 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.state.pt", weights_only=True)
    assert (state["step"], state["epoch_done"], state["batches_done"]) == (1, False, 1)
    assert train(config, mini_shards, mini_features, tmp_path / "run", overrides=QUICK, resume=True).stopped is None


def test_resume_without_a_checkpoint_is_an_error(mini_shards, mini_features, tmp_path):
    with pytest.raises(TrimodalError, match="nothing to resume|no checkpoints"):
        train(shipped_config("mmn-tiny"), mini_shards, mini_features, tmp_path / "new", overrides=QUICK, resume=True)


def test_config_problems_are_reported_together(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname = "mmn"\ncolour = 3\nlayers = "two"\n[train]\nepochs = 0\nspeed = 1\n[extra]\n')
    with pytest.raises(ConfigError) as error:
        load_config(bad, ["train.lr=-1"])
    message = str(error.value)
    for fragment in ("unknown section [extra]", "colour", "layers", "epochs must be at least 1", "speed", "lr must be positive"):
        assert fragment in message


def test_overrides_take_toml_values(tmp_path):
    config = load_config(shipped_config("mmn-tiny"), ["train.epochs=3", "model.dropout=0.2", 'train.device="cpu"'])
    assert config.train.epochs == 3 and config.model["dropout"] == 0.2 and config.train.device == "cpu"
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(shipped_config("mmn-tiny"), ["epochs=3"])


def test_the_schedule_warms_up_then_decays_to_the_floor():
    config = load_config(shipped_config("mmn-tiny"), ["train.warmup_steps=10", "train.lr=0.001"]).train
    assert lr_at(0, config, 100) == pytest.approx(0.0001)
    assert lr_at(9, config, 100) == pytest.approx(0.001)
    assert lr_at(100, config, 100) == pytest.approx(0.001 * config.min_lr_ratio)


def test_the_full_size_config_has_the_specified_shape():
    config = load_config(shipped_config("mmn-flickr8k"))
    assert (config.model["latent_dim"], config.model["memory_slots"], config.model["heads"], config.model["layers"]) == (256, 64, 4, 3)
    assert config.train.batch_size == 64 and config.train.amp is True
    for name in ("mmn-tiny", "mmn-flickr8k", "mmn-coco2014"):
        assert shipped_config(name).read_text().startswith("# mm train configs/")
        load_config(shipped_config(name))


def test_too_few_samples_for_one_step_is_a_config_error(mini_shards, mini_features, tmp_path):
    with pytest.raises(ConfigError, match="too few for one step"):
        train(shipped_config("mmn-tiny"), mini_shards, mini_features, tmp_path / "r",
              overrides=["train.batch_size=150", "train.grad_accum=2"])


def test_loader_workers_without_shared_memory_stop_the_run_before_it_starts(mini_shards, mini_features, tmp_path,
                                                                            monkeypatch):
    def no_room(self):
        raise RuntimeError("unable to resize file </torch_1_2_3> to the right size: File too large (27)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", no_room)
    overrides = [o for o in QUICK if not o.startswith("train.num_workers")] + ["train.num_workers=2"]
    with pytest.raises(TrimodalError, match="cannot use shared memory.*train.num_workers=0"):
        train(shipped_config("mmn-tiny"), mini_shards, mini_features, tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run").exists()  # a rerun after the fix starts clean


def test_an_epoch_that_loses_its_batches_is_an_error_not_a_run_on_nothing(mini_shards, mini_features, tmp_path,
                                                                        monkeypatch):
    from trimodal.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_batches", lambda loader: iter(()))
    with pytest.raises(TrimodalError, match="saw 0 of its 200 training samples"):
        train(shipped_config("mmn-tiny"), mini_shards, mini_features, tmp_path / "run", overrides=QUICK)


def test_a_checkpoint_that_cannot_be_written_is_one_clear_error(mini_shards, mini_features, tmp_path, monkeypatch):
    import errno

    from trimodal.training import checkpoint

    def disk_full(state, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(TrimodalError, match=r"cannot write .*step-\d+.safetensors: No space left on device"):
        train(shipped_config("mmn-tiny"), mini_shards, mini_features, tmp_path / "run", overrides=QUICK)
