"""Data parallelism for the sharded stages: under `accelerate launch`, rank r takes shards r, r+W, ...

Outside a launcher everything runs in one process. Shards are the unit of work, so the output
does not depend on the number of processes.
"""

from __future__ import annotations

import os


def _state():
    import torch
    from accelerate import PartialState

    # Without `cpu=True` accelerate ignores a multi-process CPU launch (each rank thinks it is alone).
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not launched by accelerate/torchrun."""
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return 0, 1
    s = _state()
    return s.process_index, s.num_processes


def my_shards(n_shards: int) -> list[int]:
    rank, world = rank_world()
    return list(range(rank, n_shards, world))


def barrier() -> None:
    if rank_world()[1] > 1:
        _state().wait_for_everyone()


def is_main() -> bool:
    return rank_world()[0] == 0


def device() -> str:
    """The device this process should use."""
    if rank_world()[1] > 1:
        return str(_state().device)
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"
