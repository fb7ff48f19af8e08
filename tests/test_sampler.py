"""clsvit.data.sampler iterated in-process on hand-built layouts: the random order against the
definitions it follows (torch.randperm of seed + epoch, DeiT's RASampler), the grouped order's dealing,
window and cycles against hand-counted rows, and the evaluation pass against
DistributedSampler's contract (every row once over the processes). tests/test_order.py reads the
same orders through real DataLoader workers."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from clsvit.config import load_config
from clsvit.data import sampler as S
from clsvit.data.sampler import EvalBatches, TrainSampler
from clsvit.errors import InputError


def indices(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return [index for index, _ in sampler]


def ra_sampler_definition(n, replicas, rank, repeats, epoch_seed, shuffle=True):
    """DeiT's RASampler (facebookresearch/deit samplers.py) as timm's RepeatAugSampler generalizes it,
    written out: a permutation seeded by the epoch, each index ``repeats`` times in a row, padded to a
    multiple of the ranks, ``[rank::replicas]``, cut to DeiT's ``floor(n // 256 * 256 / replicas)``
    per rank (timm's ``ceil(n / replicas)`` below 256 rows, where DeiT's would select none)."""
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)).tolist() if shuffle
             else list(range(n)))
    repeated = [index for index in order for _ in range(repeats)]
    total = math.ceil(n * repeats / replicas) * replicas
    repeated += repeated[:total - len(repeated)]
    selected = n // 256 * 256 // replicas if n >= 256 else math.ceil(n / replicas)
    return repeated[rank:total:replicas][:selected]


# ---------------------------------------------------------------- the random order

@pytest.mark.parametrize("repeats, shuffle", [(2, True), (4, True), (2, False), (3, False)])
def test_repeated_augmentation_follows_deits_ra_sampler_for_any_repeat_count(repeats, shuffle):
    n, seed, epoch = 90, 7, 2
    for rank in (0, 1):
        sampler = TrainSampler(n, num_replicas=2, rank=rank, seed=seed, repeats=repeats, shuffle=shuffle)
        assert indices(sampler, epoch) == ra_sampler_definition(n, 2, rank, repeats, seed + epoch, shuffle)


@pytest.mark.parametrize("make", [
    lambda: TrainSampler(40, num_replicas=1, rank=0, seed=3),
    lambda: TrainSampler(40, num_replicas=3, rank=2, seed=3, repeats=1),
    lambda: TrainSampler(40, num_replicas=2, rank=1, seed=3, repeats=3),
    lambda: TrainSampler(120, num_replicas=2, rank=1, seed=3, repeats=3, row_groups=[10] * 12, workers=2,
                         batch_size=4, window=20),
], ids=["random, one process", "random, strided", "random, repeated augmentation", "grouped"])
def test_every_order_yields_python_int_pairs(make):
    """A dataset is indexed with what the sampler yields: a float index (``3.0``) is refused by a list
    or an Arrow table, so every index and seed is a Python int."""
    pairs = list(make())
    assert pairs and all(type(index) is int and type(seed) is int for index, seed in pairs)
    rows = list(range(120))
    assert [rows[index] for index, _ in pairs] == [index for index, _ in pairs]


def test_an_inactive_repeat_count_of_two_gets_the_note():
    """Repeated augmentation is inactive on one process for every aug.repeated_aug > 1 (DeiT's main.py
    builds its RASampler only when distributed), and the note says so for 2 as for 3."""
    sampler = TrainSampler(50, num_replicas=1, rank=0, seed=0, repeats=2)
    assert sampler.note() == ("note: aug.repeated_aug=2 is inactive on a single process (as in the DeiT "
                              "reference): each image is seen once per epoch")
    assert sorted(indices(sampler)) == list(range(50))


def test_steps_per_epoch_is_an_int_count_of_whole_steps():
    """20 samples per process in micro-batches of 3: 6 whole micro-batches, 3 steps of 2; the count
    is an int (train.py multiplies it into sample counts and timm's scheduler takes it as a count)."""
    sampler = TrainSampler(40, num_replicas=2, rank=1, seed=0, repeats=1)
    steps = sampler.steps_per_epoch(3, 2)
    assert type(steps) is int and steps == 3 and len(range(steps)) == 3


def test_the_random_layout_a_checkpoint_records_and_a_resume_one_sample_in():
    """The random order's checkpoint layout is its order and process count; a resume even one sample
    into an epoch with another layout is refused, and one with the same layout is taken."""
    random_order = TrainSampler(40, num_replicas=2, rank=0, seed=3, repeats=1)
    assert random_order.state_dict() == {"layout": {"order": "random", "processes": 2}}
    same = TrainSampler(40, num_replicas=2, rank=0, seed=3, repeats=1)
    same.load_state_dict(random_order.state_dict())
    same.set_start(1)
    assert indices(same) == indices(random_order)[1:]
    grouped_checkpoint = TrainSampler(40, num_replicas=2, rank=0, seed=3, repeats=1, row_groups=[10] * 4,
                                      workers=1, batch_size=2, window=10).state_dict()
    random_order.load_state_dict(grouped_checkpoint)
    with pytest.raises(InputError, match=r"^the checkpoint stopped 1 samples into an epoch of the grouped order of "
                                         r"2 process\(es\) x 1 loader worker\(s\), micro-batch 2, window 10 rows, "
                                         r"and this launch has the random order of 2 process\(es\): the rest"):
        random_order.set_start(1)


def test_bad_arguments_are_refused_with_their_values_and_a_one_row_split_is_taken():
    with pytest.raises(InputError) as error:
        TrainSampler(0, num_replicas=1, rank=0, seed=0)
    assert str(error.value) == "the training split is empty"
    assert indices(TrainSampler(1, num_replicas=1, rank=0, seed=0)) == [0]
    assert indices(TrainSampler(1, num_replicas=1, rank=0, seed=0, row_groups=[1])) == [0]
    for seed, repeats in ((-1, 3), (0, 0)):
        with pytest.raises(ValueError) as error:
            TrainSampler(40, num_replicas=1, rank=0, seed=seed, repeats=repeats)
        assert str(error.value) == f"TrainSampler needs seed >= 0 and repeats >= 1, got seed={seed}, repeats={repeats}"
    with pytest.raises(ValueError) as error:
        TrainSampler(41, num_replicas=1, rank=0, seed=0, row_groups=[10] * 4)
    assert str(error.value) == "row groups of 40 rows for a 41-row split"
    for window, batch_size in ((0, 4), (20, 0)):
        with pytest.raises(ValueError) as error:
            TrainSampler(40, num_replicas=1, rank=0, seed=0, row_groups=[10] * 4, batch_size=batch_size, window=window)
        assert str(error.value) == f"GroupedOrder needs window >= 1 and batch_size >= 1, got {window}, {batch_size}"


# ---------------------------------------------------------------- the grouped order

def test_row_groups_alone_are_read_by_the_process_one_sample_at_a_time_through_the_recipe_window():
    """The grouped order's defaults: no loader workers (one stream, read by the process itself),
    micro-batches of one sample (so an epoch is every row: no remainder to drop), and the window of
    data.window's default in recipes/default.yaml."""
    sampler = TrainSampler(17, num_replicas=1, rank=0, seed=0, row_groups=[10, 7])
    window = load_config("recipes/default.yaml", [])["data"]["window"]
    assert sampler.layout() == {"order": "grouped", "processes": 1, "workers": 0, "micro_batch": 1, "window": window}
    assert sorted(indices(sampler)) == list(range(17))


def test_a_window_and_micro_batch_of_one_read_the_row_groups_one_after_another():
    """window=1, batch_size=1 (the smallest accepted): one stream reads its row groups one at a time,
    so the epoch is one group's rows, shuffled, then the other's."""
    epoch = indices(TrainSampler(5, num_replicas=1, rank=0, seed=0, row_groups=[3, 2], window=1, batch_size=1))
    first = {0, 1, 2} if epoch[0] < 3 else {3, 4}
    assert set(epoch[:len(first)]) == first and set(epoch[len(first):]) == {0, 1, 2, 3, 4} - first


def test_repeats_are_inactive_in_the_grouped_order_on_one_process():
    """One process with aug.repeated_aug=3 (DeiT: RASampler only when distributed): every epoch reads
    each row once; on two processes with 2 repeats each row comes twice in a row."""
    single = TrainSampler(120, num_replicas=1, rank=0, seed=3, repeats=3, row_groups=[10] * 12, workers=2,
                          batch_size=4, window=20)
    for epoch in (0, 1):
        assert sorted(indices(single, epoch)) == list(range(120))
    two = indices(TrainSampler(120, num_replicas=2, rank=0, seed=3, repeats=2, row_groups=[10] * 12, workers=1,
                               batch_size=4, window=20))
    assert two[0::2] == two[1::2] and len(set(two)) == len(two) // 2


@pytest.mark.parametrize("row_groups, streams, starts, rows", [
    ([30], 4, [0, 8, 15, 22], [8, 7, 7, 8]),  # 30 / 4 = 7.5 rows: numpy rounds 7.5 to 8 and 22.5 to 22
    ([1, 40], 3, [0, 1, 21], [1, 20, 20]),  # cut in 2: the 1-row group's empty half is no unit
    ([10, 7], 2, [0, 10], [10, 7]),  # as many groups as streams: no cut
    ([0], 2, [], []),  # a group of no rows is no unit
])
def test_fewer_row_groups_than_streams_are_cut_into_equal_row_ranges(row_groups, streams, starts, rows):
    """(first row, rows) of each unit, hand-cut; both are integer arrays that index the rows."""
    unit_starts, unit_rows = S.split_units(np.array(row_groups), streams)
    assert unit_starts.tolist() == starts and unit_rows.tolist() == rows
    assert unit_starts.dtype == unit_rows.dtype == np.int64


def test_the_epochs_of_a_cycle_deal_and_window_the_row_groups_once(monkeypatch):
    """A cycle of aug.repeated_aug=3 epochs is dealt and windowed once (its epochs are thirds of it),
    the next cycle once more: at ImageNet scale the window pass over every row runs once per cycle."""
    calls = []
    deal = S.deal_units
    monkeypatch.setattr(S, "deal_units", lambda *args: calls.append(args) or deal(*args))
    sampler = TrainSampler(120, num_replicas=2, rank=0, seed=3, repeats=3, row_groups=[10] * 12, workers=2,
                           batch_size=4, window=20)
    cycle = [indices(sampler, epoch) for epoch in (0, 1, 2)]
    assert len(calls) == 1
    assert Counter(sum(cycle, [])) == Counter(np.repeat(sorted(set(sum(cycle, []))), 3).tolist())
    indices(sampler, 3)
    assert len(calls) == 2


def lpt_definition(unit_rows, streams, order):
    """Graham's LPT rule, written out: the units by decreasing rows, equal ones in ``order`` (Python's
    sort is stable), each to the stream with the fewest rows so far (the lowest such stream)."""
    loads, dealt = [0] * streams, [set() for _ in range(streams)]
    for unit in sorted(order, key=lambda unit: -unit_rows[unit]):
        stream = loads.index(min(loads))
        dealt[stream].add(unit)
        loads[stream] += int(unit_rows[unit])
    return dealt, loads


@pytest.mark.parametrize("unit_rows, streams", [
    ([10, 7, 4] * 20, 4),  # many units of equal rows: they keep the seeded order
    ([5, 3, 3, 2, 2, 1], 2),
    ([5, 3, 3, 2, 2, 1], 3),
    ([10] * 7 + [3], 3),
    ([4, 4, 2], 5),  # more streams than units: two get none
], ids=["three sizes x 20", "LPT over 2", "LPT over 3", "short last group", "empty streams"])
def test_units_are_dealt_by_lpt_in_the_seeded_order(unit_rows, streams):
    """deal_units against the definition: the units permuted by the generator, then Graham's LPT rule;
    dealt_rows gives the rows per stream without dealing (hand-counted: [5, 3, 3, 2, 2, 1] gives
    8 + 8 rows over 2 streams, 6 + 5 + 5 over 3)."""
    unit_rows = np.array(unit_rows)
    dealt = S.deal_units(unit_rows, streams, np.random.default_rng(11))
    expected, loads = lpt_definition(unit_rows, streams, np.random.default_rng(11).permutation(len(unit_rows)).tolist())
    assert [set(units.tolist()) for units in dealt] == expected
    assert [int(unit_rows[units].sum()) for units in dealt] == loads  # each stream's units index the unit arrays
    assert S.dealt_rows(unit_rows, streams).tolist() == loads
    hand_counted = {(6, 2): [8, 8], (6, 3): [6, 5, 5]}
    assert loads == hand_counted.get((len(unit_rows), streams), loads)


@pytest.mark.parametrize("window, units_open", [(1, 1), (10, 1), (11, 2), (20, 2), (21, 3), (1000, 4)])
def test_the_first_row_is_drawn_uniformly_from_the_units_the_window_opens(window, units_open):
    """Units of 10 rows read in the order 2, 0, 3, 1: units open while the open ones hold fewer than
    ``window`` rows, so the first row is drawn from the first ceil(window / 10) of them. Over 400
    generator seeds every one of their rows comes first, and no other row."""
    unit_starts, unit_rows, units = np.arange(0, 40, 10), np.full(4, 10), np.array([2, 0, 3, 1])
    firsts = {int(S.window_order(units, unit_starts, unit_rows, window, 1, np.random.default_rng(seed))[0])
              for seed in range(400)}
    assert firsts == {row for unit in units[:units_open].tolist() for row in range(10 * unit, 10 * unit + 10)}


def test_a_window_of_one_row_reads_the_units_one_after_another():
    """window=1: a unit opens only once the previous one is drawn empty, so the stream is its units'
    rows unit by unit, each unit's rows shuffled; ``take`` cuts it. An empty take is an empty index array."""
    unit_starts, unit_rows, units = np.array([0, 6, 10]), np.array([6, 4, 5]), np.array([1, 2, 0])
    out = S.window_order(units, unit_starts, unit_rows, 1, 13, np.random.default_rng(0)).tolist()
    assert sorted(out[:4]) == [6, 7, 8, 9] and sorted(out[4:9]) == [10, 11, 12, 13, 14]
    assert set(out[9:]) < {0, 1, 2, 3, 4, 5} and len(set(out[9:])) == 4
    assert out[4:9] != sorted(out[4:9])
    empty = S.window_order(units, unit_starts, unit_rows, 1, 0, np.random.default_rng(0))
    assert empty.dtype == np.int64 and empty.size == 0


# ---------------------------------------------------------------- the evaluation pass

def spans(*lengths_and_starts):
    """Batches of consecutive rows: ``(start, length)`` pairs."""
    return [list(range(start, start + length)) for start, length in lengths_and_starts]


@pytest.mark.parametrize("sizes, processes, workers, batch, expected", [
    # 73 rows, 4 streams: the group boundaries nearest to 18.25, 36.5, 54.75 are 20, 40, 50, so the
    # streams hold 20, 20, 10, 23 rows; the longest needs ceil(23 / 4) = 6 batches, and numpy's
    # array_split cuts each stream into 6 (the first ones one row longer). Process 0 alternates its
    # streams 0 and 1, process 1 its streams 2 and 3.
    ([10] * 7 + [3], 2, 2, 4, [
        spans((0, 4), (20, 4), (4, 4), (24, 4), (8, 3), (28, 3), (11, 3), (31, 3), (14, 3), (34, 3), (17, 3), (37, 3)),
        spans((40, 2), (50, 4), (42, 2), (54, 4), (44, 2), (58, 4), (46, 2), (62, 4), (48, 1), (66, 4), (49, 1),
              (70, 3))]),
    # one stream per process without loader workers: 12 rows cut at 6
    ([3, 3, 3, 3], 2, 0, 2, [spans((0, 2), (2, 2), (4, 2)), spans((6, 2), (8, 2), (10, 2))]),
    # every stream fits one batch: one batch each
    ([3, 3], 2, 0, 4, [[[0, 1, 2]], [[3, 4, 5]]]),
    # one 5-row group for 4 streams: stream 0 holds it all; the empty streams pad with row 0
    ([5], 2, 2, 4, [[[0, 1, 2], [0], [3, 4], [0]], [[0], [0], [0], [0]]]),
    # 6 rows, 4 streams: the boundaries nearest to 1.5, 3, 4.5 are 1, 1, 6, so the streams hold 1, 0, 5, 0
    # rows, in ceil(5 / 2) = 3 batches; every empty batch pads with row 0, the split's first row
    ([1, 5], 2, 2, 2, [[[0]] * 6, [[1, 2], [0], [3, 4], [0], [5], [0]]]),
], ids=["short last group", "no workers", "one batch", "one group", "a one-row stream"])
def test_an_evaluation_pass_on_hand_cut_streams(sizes, processes, workers, batch, expected):
    """EvalBatches against hand-cut layouts, and DistributedSampler's contract (every row once over the
    processes, every process as many batches): ``valid`` counts the real rows of each batch."""
    counted = Counter()
    for rank in range(processes):
        batches = EvalBatches(sizes, batch, num_replicas=processes, rank=rank, workers=workers)
        assert list(batches) == expected[rank] and len(batches) == len(expected[rank])
        assert all(1 <= len(rows) <= batch for rows in batches) and len(batches.valid) == len(batches)
        counted.update(row for valid, rows in zip(batches.valid, batches) for row in rows[:valid])
    assert counted == Counter(range(sum(sizes)))


@pytest.mark.parametrize("sizes", [[], [0], [0, 0, 0]], ids=["no row group", "one empty group", "empty groups"])
def test_an_evaluation_pass_over_no_rows_is_refused(sizes):
    """An evaluation split of 0 rows is refused in one line, not served as a padding batch whose row
    does not exist."""
    with pytest.raises(InputError, match=r"^the evaluation split has no rows: nothing to evaluate$"):
        EvalBatches(sizes, 4, num_replicas=2, rank=0, workers=1)
