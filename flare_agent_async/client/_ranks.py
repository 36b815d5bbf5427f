"""The ranks of a trainer of many processes (torchrun, DDP, Lightning): which one talks to the site,
and how the others share what it hears.

Only rank 0 connects. When ``torch.distributed`` is initialised with more than one process, the
Client API's calls are collectives: every rank makes the same calls in the same order, and rank 0
shares what each call gave (a model, the end of the job, an error) through `Collective.share`.
Arrays travel as the process group's own tensors, in place, never pickled.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import numpy as np

from ..protocol import join_payload, split_payload

__all__ = ["Collective", "resolve_rank", "share"]


def resolve_rank(rank: str | int | None = None) -> str:
    """This process's global rank: ``rank`` if given, else the launcher's ``RANK``, else 0.

    :raises ValueError: ``rank`` is neither an int nor a str; or ``LOCAL_RANK`` is set without
        ``RANK`` while ``WORLD_SIZE`` is more than 1: a rank on one node is not the global rank,
        and taking it for one would let a process on every node talk to the site.
    """
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int | str):
            raise ValueError(f"rank must be a string or an integer but got {type(rank)}")
        return str(rank)
    found = os.environ.get("RANK")
    if found is not None:
        return found
    world_size = os.environ.get("WORLD_SIZE", "1")
    if "LOCAL_RANK" in os.environ and world_size.isdigit() and int(world_size) > 1:
        raise ValueError(
            f"LOCAL_RANK is set but RANK is not, with WORLD_SIZE={world_size}: LOCAL_RANK is the "
            "rank on this node only; set RANK to the global rank (torchrun does), or pass rank="
        )
    return "0"


def share(value: Any = None) -> Any:
    """Rank 0's ``value`` on every rank of the ``torch.distributed`` process group: a collective,
    which every rank must call at the same point (ranks other than 0 pass nothing). Arrays and
    tensors travel as the group's own broadcasts, not pickled. Without a group of more than one
    process, ``value`` itself.

    For `SyncFlareAgent` and `AsyncFlareAgent` trainers of many processes, where only rank 0
    has an agent::

        task = agent.get_task() if rank == 0 else None
        data = share(task.data if task is not None else None)
    """
    collective = Collective.current()
    return value if collective is None else collective.share(value)


class Collective:
    """Rank 0's answers, shared with every rank through ``torch.distributed``'s broadcasts."""

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self._dist = torch.distributed
        self.rank = self._dist.get_rank()
        backend = str(self._dist.get_backend())
        # NCCL moves only GPU tensors: buffers are staged on this rank's device there.
        self._device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else None

    @classmethod
    def current(cls) -> Collective | None:
        """The process group's collective, or None without a group of more than one process.
        Torch is never imported here: a trainer that has not imported it has no group."""
        torch = sys.modules.get("torch")
        if torch is None:
            return None
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return None
        return cls(torch)

    def share(self, value: Any = None) -> Any:
        """Rank 0's ``value`` on every rank (the others pass nothing): a payload of dicts, lists,
        numbers, strings, numpy arrays and torch tensors. Arrays arrive as arrays, tensors as
        tensors, each received straight into its own memory."""
        torch = self._torch
        if self.rank == 0:
            header, buffers = split_payload(value, "shared")
            self._broadcast(torch.tensor([len(header)], dtype=torch.int64))
            self._broadcast_bytes(memoryview(header))
            for buffer in buffers:
                self._broadcast_bytes(buffer)
            return value
        size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size)
        received = bytearray(int(size.item()))
        self._broadcast_bytes(memoryview(received))
        destinations, finish = join_payload(bytes(received))
        for destination in destinations:
            self._broadcast_bytes(destination)
        return finish()

    def share_flag(self, flag: bool = False) -> bool:
        """Rank 0's ``flag`` on every rank: one broadcast of one byte, for checks made at every
        step (whether the task was aborted)."""
        byte = self._torch.tensor([flag], dtype=self._torch.uint8)
        self._broadcast(byte)
        return bool(byte.item())

    def _broadcast_bytes(self, buffer: memoryview) -> None:
        if buffer.nbytes == 0:
            return
        with warnings.catch_warnings():
            # Rank 0's buffers may be read-only (bytes): the broadcast only reads them there.
            warnings.simplefilter("ignore", UserWarning)
            tensor = self._torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8))
        self._broadcast(tensor)

    def _broadcast(self, tensor: Any) -> None:
        if self._device is None:
            self._dist.broadcast(tensor, src=0)
            return
        staged = tensor.to(self._device)  # a copy the backend needs: NCCL reads GPU memory only
        self._dist.broadcast(staged, src=0)
        if self.rank != 0:
            tensor.copy_(staged.cpu())
