"""Tests for clsvit.ranges: ascending integers written with their runs as ranges, as an error names
processes, TensorBoard shows the blocks a recipe specializes, and `sbatch --array` takes indices."""

import random

from clsvit.ranges import index_ranges


def expand(text: str, separator: str = ",") -> list[int]:
    """The indices `sbatch --array` reads from `text` ("0,2-4,7" -> [0, 2, 3, 4, 7]), by its
    definition: each comma-separated item is one index or an inclusive range first-last."""
    indices = []
    for item in text.split(separator) if text else []:
        first, _, last = item.partition("-")
        indices.extend(range(int(first), int(last or first) + 1))
    return indices


def test_runs_of_consecutive_integers_become_first_last():
    assert index_ranges([0, 2, 3, 4, 7]) == "0,2-4,7"
    assert index_ranges([5]) == "5"
    assert index_ranges([0, 1]) == "0-1"
    assert index_ranges([0, 1, 2, 3, 7, 9, 10, 11]) == "0-3,7,9-11"
    assert index_ranges([]) == ""
    assert index_ranges(iter([3, 4, 6])) == "3-4,6"  # any iterable, read once


def test_the_separator_is_the_callers():
    assert index_ranges([0, 2, 3, 4, 7], ", ") == "0, 2-4, 7"
    assert expand(index_ranges([1, 2, 5], ", "), ", ") == [1, 2, 5]


def test_every_ascending_set_reads_back_whole_and_each_item_is_a_maximal_run():
    draw = random.Random(0)
    for _ in range(500):
        indices = sorted(draw.sample(range(40), draw.randint(0, 40)))
        text = index_ranges(indices)
        assert expand(text) == indices
        items = text.split(",") if text else []
        assert len(items) == 1 + sum(b != a + 1 for a, b in zip(indices, indices[1:])) if indices else not items
