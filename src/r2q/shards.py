"""Inputs split across the processes of `torchrun` / `accelerate launch`, results merged back in input order.

`credit` and `generate` score or decode independent batches, so under N processes each takes every N-th batch
and the results are gathered to every process: the merged output is the one-process output, batch for batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Processes:
    """This process's place among those started together (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False  # whether processes() started the process group (then finish() closes it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> range:
        """Which of n batches this process runs: every world-th, from its rank."""
        return range(self.rank, n, self.world)

    def merge(self, mine: dict[int, Any]) -> dict[int, Any]:
        """Every process's {batch index: result}, gathered to every process."""
        if self.world == 1:
            return dict(mine)
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def finish(self) -> None:
        """Leave together: wait until every process is done (the main one writes the outputs after the merge), then
        close the process group if this run opened it. A process that exits while another still holds the gloo
        group can abort in the group's teardown, and the launcher then stops the run that was writing."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            if self.owns_group:
                dist.destroy_process_group()


def processes() -> Processes:
    """The processes of this run: from WORLD_SIZE / RANK as torchrun and accelerate set them, joining (or starting)
    the default process group (NCCL with GPUs, else gloo). One process when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    import torch
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Processes(dist.get_rank(), dist.get_world_size(), owns)
