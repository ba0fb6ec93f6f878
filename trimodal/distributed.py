"""Several processes under torchrun or srun: the process group from the launcher's environment, each rank's
device, and the few collectives `mm train`, `mm featurize` and `mm eval` use.

    torchrun --nproc-per-node 8 -m trimodal train …         # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    srun python -m trimodal train …                         # SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the
                                                            # batch script exports MASTER_ADDR and MASTER_PORT

One process (no launcher, or a world of one) creates no process group, and every collective here is then
the identity, so library code calls them unconditionally. NCCL carries the collectives on CUDA, gloo on
the CPU. Every collective waits at most the group's timeout (`train.dist_timeout_s`): a rank that died
or stalls ends the others with a `DistributedError` instead of a wait forever.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from trimodal.errors import ConfigError, TrimodalError

# torch is imported inside the functions that need it: the CLI reads the launch environment (which rank
# prints) before every command, and commands that never touch torch should not pay for its import.

BACKENDS = ("auto", "nccl", "gloo")
DEFAULT_TIMEOUT_S = 600.0
_timeout = {"seconds": DEFAULT_TIMEOUT_S}  # of the group this process joined
_joined = {"group": False}  # whether this process ever joined a process group


class DistributedError(TrimodalError):
    """The process group could not form, or a collective failed: a rank died, stalled or left."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits, as the launcher's environment says."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


@dataclass
class Dist:
    """This process's rank, its device and the group's backend; `world_size` 1 means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: object = None  # torch.device; the CPU when not given
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.device is None:
            import torch

            self.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes run files and prints."""
        return self.rank == 0


def _integer(name: str, value: str | None, default: int | None = None) -> int:
    if value is None:
        if default is None:
            raise DistributedError(f"the launcher's environment lacks {name}")
        return default
    try:
        number = int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not a whole number") from None
    if number < 0:
        raise DistributedError(f"{name}={value} is negative")
    return number


def launch_environment(environ=None) -> Launch:
    """The rank layout torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or srun (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
    SLURM_LOCALID) set; a single process when neither did. torchrun's variables win over SLURM's. Only a job
    step that srun started counts: the batch script itself also sees SLURM_PROCID=0 and the allocation's
    SLURM_NTASKS, and is one process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env or "RANK" in env:
        world = _integer("WORLD_SIZE", env.get("WORLD_SIZE"))
        rank = _integer("RANK", env.get("RANK"))
        local = _integer("LOCAL_RANK", env.get("LOCAL_RANK"), 0)
        local_world = _integer("LOCAL_WORLD_SIZE", env.get("LOCAL_WORLD_SIZE"), max(1, local + 1))
    elif "SLURM_PROCID" in env and _integer("SLURM_STEP_NUM_TASKS", env.get("SLURM_STEP_NUM_TASKS"), 1) > 1:
        world = _integer("SLURM_STEP_NUM_TASKS", env.get("SLURM_STEP_NUM_TASKS"))
        rank = _integer("SLURM_PROCID", env.get("SLURM_PROCID"))
        local = _integer("SLURM_LOCALID", env.get("SLURM_LOCALID"), 0)
        per_node = (env.get("SLURM_STEP_TASKS_PER_NODE") or "").split("(")[0].split(",")[0] or None
        local_world = _integer("SLURM_STEP_TASKS_PER_NODE", per_node, max(1, local + 1))
    else:
        return Launch()
    if world < 1 or rank >= world:
        raise DistributedError(f"rank {rank} does not fit a world of {world} processes (RANK/WORLD_SIZE or "
                               "SLURM_PROCID/SLURM_STEP_NUM_TASKS)")
    if local >= local_world:
        raise DistributedError(f"LOCAL_RANK {local} does not fit the {local_world} processes of this node")
    return Launch(rank, world, local, local_world)


def resolve_device(device: str):
    """The torch.device of a --device / train.device setting: auto (CUDA when present), cpu or cuda[:N]."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda (got {device!r})")
    return torch.device(device)


def _device_for(launch: Launch, device: str):
    """`resolve_device`, and with several ranks on CUDA the GPU of this rank's LOCAL_RANK."""
    import torch

    chosen = resolve_device(device)
    if chosen.type != "cuda" or launch.world_size == 1:
        return chosen
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise DistributedError(f"LOCAL_RANK {launch.local_rank} has no GPU: this node has {count} "
                               f"(start at most {count} processes per node, e.g. torchrun --nproc-per-node {count})")
    return torch.device("cuda", launch.local_rank)


def _backend_for(backend: str, device: torch.device) -> str:
    import torch

    if backend not in BACKENDS:
        raise ConfigError(f"the distributed backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    available = {"nccl": torch.distributed.is_nccl_available, "gloo": torch.distributed.is_gloo_available}[chosen]()
    if not available:
        raise DistributedError(f"the {chosen} backend is not available in this torch build")
    if chosen == "nccl" and device.type != "cuda":
        raise DistributedError("the nccl backend needs CUDA devices; this rank runs on the CPU (use gloo)")
    return chosen


def start(device: str = "auto", *, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
          environ=None) -> Dist:
    """This process's place and device; with a world of several, the process group (joined here, at most
    `timeout_s` waiting for the others). An existing group (an outer caller's) is used as it is."""
    import torch

    launch = launch_environment(environ)
    chosen_device = _device_for(launch, device)
    if launch.world_size == 1:
        return Dist(device=chosen_device)
    if not torch.distributed.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    name = _backend_for(backend, chosen_device)
    if chosen_device.type == "cuda":
        torch.cuda.set_device(chosen_device)
    if not torch.distributed.is_initialized():
        env = os.environ if environ is None else environ
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise DistributedError(f"{' and '.join(missing)} not set: torchrun sets them; under srun export the "
                                   "first node's address and a free port in the batch script")
        _timeout["seconds"] = timeout_s
        try:
            torch.distributed.init_process_group(
                name, rank=launch.rank, world_size=launch.world_size, timeout=timedelta(seconds=timeout_s),
                init_method=f"tcp://{_host(env['MASTER_ADDR'])}:{env['MASTER_PORT']}",
                device_id=chosen_device if chosen_device.type == "cuda" else None)
            _joined["group"] = True
        except (RuntimeError, ValueError, OSError) as error:
            raise DistributedError(
                f"rank {launch.rank} could not join the process group at {env['MASTER_ADDR']}:{env['MASTER_PORT']} "
                f"within {timeout_s:.0f} s ({_first_line(error)}); check the rendezvous address and port and "
                "that every rank was started") from error
    return Dist(launch.rank, launch.world_size, launch.local_rank, chosen_device, name)


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched as one of several)."""
    try:
        return launch_environment().rank
    except DistributedError:
        return 0


def joined() -> bool:
    """Whether this process joined a process group (what failed after that may be this rank's alone)."""
    return _joined["group"]


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def finish(dist: Dist) -> None:
    """Leave the process group (after the last collective)."""
    import torch

    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def session(device: str = "auto", *, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
    """`start`, then `finish` when the block ends, also on an error (the group does not outlive the work)."""
    import torch

    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist = start(device, backend=backend, timeout_s=timeout_s)
    try:
        yield dist
    finally:
        if owned:
            finish(dist)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# -- collectives (the identity for one process) ------------------------------------------------------

def position() -> tuple[int, int]:
    """(rank, world size) of the process group this process is in; (0, 1) without one."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _active() -> bool:
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


@contextmanager
def collective(what: str):
    """Turns a failed collective (a peer gone: connection closed, or no answer within the timeout) into
    one `DistributedError` that says which rank saw it and what it was doing."""
    import torch

    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as error:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise
        raise DistributedError(f"rank {torch.distributed.get_rank()}: {what} failed ({_first_line(error)}): another "
                               f"rank died, stalled or stopped (a rank waits at most {_timeout['seconds']:.0f} s, "
                               "train.dist_timeout_s)") from error


def on_main(work, what: str = "rank 0's work"):
    """`work()` on rank 0 only; its result on every rank, or its failure: a `TrimodalError` is raised on every
    rank as it is, anything else as a `DistributedError` naming `what` on the others (so that a full disk
    on rank 0 stops every rank with its message instead of leaving them waiting)."""
    import torch

    if not _active():
        return work()
    outcome, failure = None, None
    if torch.distributed.get_rank() == 0:
        try:
            outcome = ("done", work())
        except Exception as error:  # every rank must hear of it; rank 0 raises it below
            failure = error
            outcome = ("failed", type(error) if isinstance(error, TrimodalError) else None, _first_line(error))
    outcome = broadcast_object(outcome)
    if failure is not None:
        raise failure
    if outcome[0] == "failed":
        try:
            error = outcome[1](outcome[2]) if outcome[1] else DistributedError(f"rank 0 failed while {what}: {outcome[2]}")
        except TypeError:  # an error class whose constructor takes other arguments
            error = TrimodalError(outcome[2])
        raise error
    return outcome[1]


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on all), concatenated along dim 0 in rank order, with gradients:
    the backward pass sums each rank's gradient of its copy back into the rank that owns the rows (as
    open_clip's `gather_with_grad`), so a loss computed identically on every rank from the gathered rows,
    with DDP's gradient mean, gives the gradients of one process holding the whole batch."""
    import torch

    if not _active():
        return tensor
    import torch.distributed.nn.functional as distributed_nn

    with collective("gathering a batch's rows"), warnings.catch_warnings():
        # Deprecated in favour of a private module (torch.distributed._functional_collectives); still the
        # public differentiable all-gather.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(distributed_nn.all_gather(tensor.contiguous()), dim=0)


def gather_rows_detached(tensor: torch.Tensor) -> torch.Tensor:
    """As `gather_rows`, without gradients (masks, keys' lengths, evaluation latents)."""
    import torch

    if not _active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    with collective("gathering a batch's rows"):
        torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_max(values: list[int], device=None) -> list[int]:
    """The element-wise maximum of every rank's small integer `values` (flags agreed on by all ranks)."""
    import torch

    if not _active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    with collective("agreeing on a step's flags"):
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def all_gather_object(value) -> list:
    """Every rank's picklable `value`, in rank order."""
    import torch

    if not _active():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    with collective("exchanging state between ranks"):
        torch.distributed.all_gather_object(values, value)
    return values


def broadcast_object(value, source: int = 0):
    """Rank `source`'s picklable `value`, on every rank."""
    import torch

    if not _active():
        return value
    box = [value]
    with collective("receiving rank 0's decision"):
        torch.distributed.broadcast_object_list(box, src=source)
    return box[0]


def broadcast_tensors(tensors, source: int = 0) -> None:
    """Overwrite each tensor with rank `source`'s values, in place."""
    import torch

    if not _active():
        return
    with collective("receiving rank 0's values"):
        for tensor in tensors:
            torch.distributed.broadcast(tensor.data, src=source)


def barrier(what: str = "waiting for the other ranks") -> None:
    import torch

    if not _active():
        return
    with collective(what):
        if torch.distributed.get_backend() == "gloo":
            # Names the ranks that did not arrive, where a plain barrier only times out.
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=_timeout["seconds"]), wait_all_ranks=True)
        else:
            torch.distributed.barrier()
