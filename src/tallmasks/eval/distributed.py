"""torchrun support: rank/world size, process-group set-up, batch sharding and count reduction."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size of this process (1 process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_batches(self, num_batches: int) -> range:
        """Global batch indices this rank evaluates (strided, so batches are the same as in one process)."""
        return range(self.rank, num_batches, self.world_size)

    def sum(self, values: list[int], device: torch.device | str = "cpu") -> list[int]:
        """Element-wise sum of integer counts over all ranks."""
        if not self.enabled:
            return [int(v) for v in values]
        import torch.distributed as dist

        backend = dist.get_backend()
        where = device if backend == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.int64, device=where)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [int(v) for v in tensor.cpu()]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, then (after a barrier) on the other ranks: rank 0 builds or converts files
        that the others then only read."""
        result = fn() if self.is_main else None
        self.barrier()
        return result if self.is_main else fn()

    def broadcast_object(self, obj):
        """rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (DistInfo, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local if world > 1 else None)
    if world <= 1:
        return DistInfo(), dev
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    log.info("rank %d of %d on %s", rank, world, dev)
    return DistInfo(rank, world, local), dev


def resolve_device(device: str = "auto", local_rank: int | None = None) -> torch.device:
    """ "auto" = cuda if available else cpu; under torchrun a bare "cuda" means cuda:<LOCAL_RANK>."""
    name = str(device or "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank or 0)
    return dev


def free_port() -> int:
    """A TCP port that is free on this machine now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fn(*args)


def check_device(name: Any, where: str = "device") -> str:
    """``name`` if it is auto, cpu, cuda or cuda:N (mps where built) and available here; a one-line ConfigError otherwise."""
    from tallmasks.core.errors import ConfigError

    text = str(name).strip() if name is not None else "auto"
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{where}: unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}={text}: no CUDA GPU is available on this machine; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{where}={text}: only {torch.cuda.device_count()} CUDA GPUs are visible")
        return text
    if dev.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return text
    raise ConfigError(f"{where}: device {text!r} is not available here; use auto, cpu, cuda or cuda:N")


def local_slots(device: str = "auto") -> int:
    """How many local ranks ``device`` can hold: visible GPUs for cuda, usable CPU cores for gloo on cpu."""
    if resolve_device(device).type == "cuda":
        return torch.cuda.device_count()
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_world_size(world_size: int, device: str = "auto", force: bool = False) -> None:
    """A one-line ConfigError unless ``world_size`` local ranks fit on ``device`` (more ranks than GPUs
    never run; more than CPU cores only with ``force``)."""
    from tallmasks.core.errors import ConfigError

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be an integer >= 1, got {world_size!r}")
    if world_size == 1:
        return
    slots = local_slots(device)
    if resolve_device(device).type == "cuda":
        if slots < world_size:
            raise ConfigError(f"world_size={world_size} but only {slots} GPUs are visible")
    elif slots < world_size and not force:
        raise ConfigError(
            f"world_size={world_size} is more than the {slots} CPU cores here (each rank holds a model); "
            "lower it, or force it (main.py: force_world_size=true, finetune.py: --force-world-size)"
        )


def check_port(port: int | None) -> None:
    """A one-line ConfigError when the rendezvous ``port`` is taken on this machine."""
    from tallmasks.core.errors import ConfigError

    if port is None:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", int(port)))
        except OSError as exc:
            raise ConfigError(f"port={port} cannot be used ({exc.strerror or exc}); choose another, or port=null for a free one") from None


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, port: int | None = None) -> None:
    """Run ``fn(*args)`` in ``world_size`` local processes that see the environment torchrun would give them
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); ``fn`` and ``args`` must pickle."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_entry, args=(world_size, port or free_port(), fn, args), nprocs=world_size, join=True)


def under_launcher() -> bool:
    """Whether this process is one rank of several started by torchrun (or by :func:`spawn_ranks`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
