"""Several processes over one prompt file, through accelerate (`accelerate launch`, or torchrun underneath).

Each process is one of `num_processes`; accelerate's `PartialState` knows which (on several machines too)
and gives the barrier and the gather the run needs. Work is split by whole batches, planned the same way in
every process as a one-process run plans them, so an image is bit for bit the one a single process makes.
Outside a launcher this is one process and accelerate is not imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Processes:
    index: int = 0
    count: int = 1
    state: object = None  # accelerate.PartialState when launched

    @property
    def main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated in process order (each process gets the whole list)."""
        if self.state is None:
            return items
        from accelerate.utils import gather_object  # lazy: optional (pip install 'fewstep[train]')
        return gather_object(items)


def launched() -> bool:
    """Whether a launcher started this process as one of several (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def processes(device: str) -> Processes:
    """This process's place among those launched; on the CPU, torch's threads shared out between them
    (oversubscribed OpenMP threads spin and run several times slower)."""
    if not launched():
        return Processes()
    from accelerate import PartialState  # lazy: optional (pip install 'fewstep[train]')
    state = PartialState(cpu=not str(device).startswith("cuda"))
    if not str(device).startswith("cuda"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // state.num_processes))
    return Processes(state.process_index, state.num_processes, state)


def device_for(device: str, procs: Processes) -> str:
    """`--device cuda` under several processes means each process's own GPU (accelerate's local index)."""
    if procs.state is not None and device == "cuda":
        return str(procs.state.device)
    return device
