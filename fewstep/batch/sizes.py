"""`--batch-size auto`: the batch size measured fastest on the run's own first rows.

Doubling from 1 while the time per image falls by more than 5%, up to 64, stopping early where memory
runs out (fewstep's own working-memory check, or the GPU's out-of-memory error). The measured batches
are real rows of the run, kept like any other; the first call, which pays for allocation and kernel
selection, is not timed.
"""

from __future__ import annotations

import time

import torch

from ..errors import FewstepError

LARGEST = 64
GAIN = 0.05  # a larger batch must be this much faster per image to be worth its memory


def choose_batch_size(run, group: list, bar) -> tuple[int, list[dict]]:
    """(the chosen size, the records of the rows made while measuring) for `run(rows) -> records` over
    `group`, rows of one settings."""
    records, used = [], 0

    def timed(n: int) -> float:
        nonlocal used
        rows = group[used:used + n]
        used += len(rows)
        t0 = time.perf_counter()
        records.extend(run(rows))
        bar.update(len(rows))
        return (time.perf_counter() - t0) / len(rows)

    if len(group) < 2:
        return 1, records
    timed(1)
    best, best_s, size = 1, timed(1), 2
    while size <= LARGEST and used + size <= len(group):
        try:
            s = timed(size)
        except (FewstepError, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        if s > best_s * (1 - GAIN):
            break
        best, best_s, size = size, s, size * 2
    return best, records
