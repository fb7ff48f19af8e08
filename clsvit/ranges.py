"""Ascending integers written with their runs as ranges: the processes an error names, the blocks a
recipe specializes, a SLURM job array's indices (the syntax of ``sbatch --array``)."""

from __future__ import annotations

from typing import Iterable


def index_ranges(indices: Iterable[int], separator: str = ",") -> str:
    """[0, 2, 3, 4, 7] -> '0,2-4,7': each run of consecutive integers as 'first-last'; [] -> ''."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return separator.join(str(first) if first == last else f"{first}-{last}" for first, last in runs)
