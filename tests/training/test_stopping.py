"""Stopping `mm train` early: signals, the time limit, and the line that says how to resume."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.launch import REPOSITORY, _environment, wait_for

from trimodal.errors import ConfigError
from trimodal.signals import RESUMABLE_EXIT, StopRequests, Stopped
from trimodal.training.config import shipped_config
from trimodal.training.stopping import parse_time_limit


@pytest.mark.parametrize("text, minutes", [("90", 90), ("90m", 90), ("1.5h", 90), ("45s", 0.75), ("1:30:00", 90),
                                           ("10:30", 10.5), ("2-00:00:00", 2880), ("1-12", 2160), ("1-00:30", 1470)])
def test_time_limits_read_as_slurm_writes_them(text, minutes):
    assert parse_time_limit(text) == pytest.approx(minutes)


@pytest.mark.parametrize("text", ["soon", "0", "1:2:3:4", "-5"])
def test_a_bad_time_limit_is_a_config_error(text):
    with pytest.raises(ConfigError, match="time limit"):
        parse_time_limit(text)


def test_the_first_stop_signal_sets_the_flag_and_a_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as requests:
        os.kill(os.getpid(), signal.SIGTERM)
        assert requests.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C: still a request
        assert requests.signal_name == "SIGINT"
        with pytest.raises(Stopped, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_to_mm_train_and_its_loader_worker_writes_a_checkpoint_and_says_how_to_resume(mini_shards,
                                                                                            mini_features, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "trimodal", "train", str(shipped_config("mmn-tiny")), "--shards", str(mini_shards),
               "--features", str(mini_features), "--out", str(run), "train.epochs=50", "train.num_workers=1",
               "train.batch_size=16"]
    job = subprocess.Popen(command, cwd=REPOSITORY, env=_environment(None), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0, 120,
             "the first training records")
    os.killpg(job.pid, signal.SIGTERM)  # the process and its loader worker, as SLURM signals a job
    signalled = time.monotonic()
    out, err = job.communicate(timeout=60)
    assert job.returncode == RESUMABLE_EXIT, err[-3000:]
    assert time.monotonic() - signalled < 20
    assert "Traceback" not in err and "DataLoader worker" not in err
    lines = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(lines) == 1 and "Resume with: mm train" in lines[0], err[-3000:]
    state = torch.load(run / "checkpoints" / "last.state.pt", weights_only=True)
    assert f"at step {state['step']}, batch {state['batches_done']}/12 of epoch {state['epoch'] + 1}" in lines[0]
    resume = shlex.split(lines[0].split("Resume with: ")[1])
    assert resume[0] == "mm" and resume[-1] == "--resume" and "train.num_workers=1" in resume
    again = subprocess.run([sys.executable, "-m", "trimodal", *resume[1:], f"train.max_steps={state['step'] + 1}"],
                           cwd=REPOSITORY, env=_environment(None), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.state.pt", weights_only=True)["step"] == state["step"] + 1
