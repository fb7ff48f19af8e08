"""The orders in which rows are read: :class:`TrainSampler` yields the training order of one process as
``(index, sample_seed)`` pairs; :class:`EvalBatches` cuts an evaluation pass into batches.

Two training orders (``data.order``):

- ``random``: a permutation of all rows per epoch (timm's ``RepeatAugSampler`` for repeated
  augmentation), for sources whose reads are one file per image (``imagefolder``).
- ``grouped``: for parquet shards (``parquet``, ``hub``, ``shapes``), whose unit of reading is the row
  group. Each loader worker reads its own row groups, each once per pass, and shuffles the rows of
  a bounded window of them in memory. How, and why it keeps a resume sample-exact:

  * torch's DataLoader hands batch ``k`` of an iterator to worker ``k % num_workers``
    (``torch/utils/data/dataloader.py``, ``_MultiProcessingDataLoaderIter._try_put_index``: a
    ``itertools.cycle`` over the workers, reset to worker 0 by every new iterator in ``_reset``).
    So the order of one process interleaves ``num_workers`` *streams* batch by batch (batch ``k``
    from stream ``k % num_workers``), and every stream is read by one worker. A resume at batch
    ``b`` starts a new iterator: stream ``(b + j) % num_workers`` goes to worker ``j``, still one
    worker per stream.
  * A *cycle* of ``r`` epochs (``r`` = ``aug.repeated_aug`` where repeated augmentation is active,
    else 1) reads every row group once: the groups are permuted (seeded by the cycle) and dealt
    to the ``processes x workers`` streams, each next group to the stream with the fewest rows
    (MosaicML streaming deals shards to nodes similarly, ``streaming/base/shuffle/py1br.py``:
    shard order fixed, then per-node blocks).
  * A stream draws its rows from a sliding window, as FFCV's ``QUASI_RANDOM`` order draws from a
    buffer of pages (``ffcv/traversal_order/quasi_random.py``, ``generate_order_inner``): row groups
    are opened in the stream's order while the open ones hold fewer than ``window`` rows, and each
    next row is drawn uniformly from the undrawn rows of the open groups; a group closes when all
    its rows are drawn. A worker holds at most ``window`` + one group's rows. Each drawn row comes
    ``r`` times in a row: its repeats land in the same micro-batch of one process (DeiT's
    ``RASampler``, ``samplers.py``, puts them on ``r`` different processes at the same step; both
    keep them in one optimizer step, so a global batch holds ``global_batch / r`` distinct images).
  * Every stream yields the same number of whole micro-batches per epoch, ``T'`` samples with
    ``T'`` the fewest rows a stream got, rounded down to the micro-batch: an epoch is about
    ``N / processes`` samples per process (DeiT's epoch, as ``RASampler``'s), each of its rows
    ``r`` times, and a cycle uses ``T'`` rows of every stream. The few rows beyond ``T'`` are not
    used in that cycle (a different few in the next).

  The grouped order is a pure function of the seed, the epoch and the layout (processes, loader
  workers, micro-batch, window); unlike the random order it depends on ``data.num_workers``.

Both orders are sample-exact under :meth:`TrainSampler.set_start`; a checkpoint records the layout
(:meth:`TrainSampler.state_dict`) and a resume in the middle of an epoch with another layout is refused.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Sampler

from clsvit.errors import InputError

ORDERS = ("random", "grouped")


class TrainSampler(Sampler):
    """The training order of one process: ``(index, sample_seed)`` pairs.

    Why it yields seeds: the seed makes each sample's augmentation reproducible (see
    :class:`~clsvit.data.images.ImageClassDataset`), so :meth:`set_start` can resume mid-epoch
    bit-identically by skipping positions without loading data. The seed depends on (seed, epoch,
    rank, position), so the copies of a repeated image get different augmentations.

    ``row_groups`` (rows per row group, in row order) selects the grouped order (module docstring)
    for ``workers`` loader workers (0: one stream, read by the process itself), micro-batches of
    ``batch_size`` and ``window`` rows; without it, the random order per epoch, from
    ``torch.Generator().manual_seed(seed + epoch)``:

    - repeats > 1 and several processes: timm's ``RepeatAugSampler`` (DeiT repeated augmentation:
      each image ``repeats`` times in a row, interleaved over ranks, and its epoch selection of
      ``floor(N // 256 * 256 / num_replicas)`` samples per rank, about N / num_replicas);
    - otherwise a strided split ``perm[rank::num_replicas]``, wrapped around to equal lengths.

    Repeated augmentation is inactive on one process in both orders, as in the DeiT reference
    (``main.py``: ``RASampler`` only when distributed).
    Being rank-aware, the train DataLoader must not go through ``accelerator.prepare``.
    Call :meth:`set_epoch` (and :meth:`set_start` when resuming) before creating the loader iterator.
    """

    def __init__(self, num_samples: int, *, num_replicas: int, rank: int, seed: int,
                 repeats: int = 3, shuffle: bool = True, row_groups=None, workers: int = 0,
                 batch_size: int = 1, window: int = 1000):
        if num_samples < 1:
            raise InputError("the training split is empty")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"TrainSampler needs 0 <= rank < num_replicas, got rank={rank}, "
                             f"num_replicas={num_replicas}")
        if seed < 0 or repeats < 1:
            raise ValueError(f"TrainSampler needs seed >= 0 and repeats >= 1, got seed={seed}, repeats={repeats}")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.repeats, self.shuffle = seed, repeats, shuffle
        self.repeated_aug = repeats > 1 and num_replicas > 1
        self.epoch, self.start = 0, 0
        self._resumed_layout = None
        self.grouped = None
        if row_groups is not None:
            self.grouped = GroupedOrder(row_groups, num_replicas=num_replicas, rank=rank, seed=seed,
                                        repeats=repeats if self.repeated_aug else 1, workers=workers,
                                        batch_size=batch_size, window=window)
            if self.grouped.num_rows != num_samples:
                raise ValueError(f"row groups of {self.grouped.num_rows} rows for a {num_samples}-row split")

    @property
    def order(self) -> str:
        return "random" if self.grouped is None else "grouped"

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def note(self) -> str | None:
        """What a user should know at start: repeated augmentation asked for but inactive here."""
        if self.repeats > 1 and not self.repeated_aug:
            return (f"note: aug.repeated_aug={self.repeats} is inactive on a single process (as in the DeiT "
                    f"reference): each image is seen once per epoch")
        return None

    def steps_per_epoch(self, batch_size: int, accum_steps: int) -> int:
        """Optimizer steps of ``accum_steps`` batches of ``batch_size`` in one epoch of this process.
        An epoch without one is a one-line error naming the sizes and the keys to change."""
        steps = len(self) // batch_size // accum_steps
        if steps == 0:
            per_process = batch_size * accum_steps
            needed = f"train.global_batch={per_process * self.num_replicas} needs {per_process} per process"
            if self.repeated_aug and self.grouped is None:
                raise InputError(
                    f"repeated augmentation (aug.repeated_aug={self.repeats}, timm's RepeatAugSampler) draws "
                    f"{len(self)} images per process per epoch from the {self.num_samples}-image training split "
                    f"over {self.num_replicas} processes; {needed}: set aug.repeated_aug=1 or lower "
                    f"train.global_batch")
            raise InputError(f"the {self.num_samples}-image training split gives {len(self)} images per process per "
                             f"epoch over {self.num_replicas} process(es); {needed}: lower train.global_batch")
        return steps

    def set_start(self, position: int):
        """Skip the first ``position`` samples of the next iteration (mid-epoch resume); one-shot.
        A resume in the middle of an epoch whose order had another layout is an InputError."""
        if not 0 <= position <= len(self):
            raise ValueError(f"start position {position} outside [0, {len(self)}]")
        resumed, self._resumed_layout = self._resumed_layout, None
        if position > 0 and resumed is not None and resumed != self.layout():
            raise InputError(
                f"the checkpoint stopped {position} samples into an epoch of the {describe_layout(resumed)}, and "
                f"this launch has the {describe_layout(self.layout())}: the rest of that epoch cannot be "
                f"re-derived; relaunch with the checkpoint's layout (processes, data.num_workers, "
                f"train.batch_per_device, data.window)")
        self.start = position

    def layout(self) -> dict:
        """What the order depends on besides seed and epoch (saved in checkpoints)."""
        if self.grouped is None:
            return {"order": "random", "processes": self.num_replicas}
        return {"order": "grouped", "processes": self.num_replicas, **self.grouped.layout()}

    def state_dict(self) -> dict:
        return {"layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        self._resumed_layout = dict(state["layout"])

    def __len__(self) -> int:
        if self.grouped is not None:
            return self.grouped.epoch_length
        if self.repeated_aug:
            return len(self._repeat_aug_sampler())
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self):
        indices = self.grouped.epoch(self.epoch) if self.grouped is not None else self._indices()
        seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(len(indices))
        start, self.start = self.start, 0
        return iter(list(zip(indices[start:].tolist(), seeds[start:].tolist())))

    def _indices(self) -> np.ndarray:
        if self.repeated_aug:
            return np.fromiter(self._repeat_aug_sampler(), dtype=np.int64)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).numpy()
        else:
            order = np.arange(self.num_samples)
        total = len(self) * self.num_replicas
        return order[np.arange(self.rank, total, self.num_replicas) % self.num_samples]

    def _repeat_aug_sampler(self):
        sampler = RepeatAugSampler(range(self.num_samples), num_replicas=self.num_replicas, rank=self.rank,
                                   shuffle=self.shuffle, num_repeats=self.repeats)
        sampler.set_epoch(self.seed + self.epoch)  # timm seeds its permutation with the epoch alone
        return sampler


def describe_layout(layout: dict) -> str:
    text = f"{layout['order']} order of {layout['processes']} process(es)"
    if layout["order"] == "grouped":
        text += (f" x {layout['workers']} loader worker(s), micro-batch {layout['micro_batch']}, "
                 f"window {layout['window']} rows")
    return text


class GroupedOrder:
    """The grouped training order of process ``rank`` (the module docstring describes it).

    ``row_groups``: rows per row group, in row order. With fewer row groups than streams
    (``processes x workers``), each group is cut into equal row ranges so that every stream gets
    one (a cut group is then read by several workers)."""

    def __init__(self, row_groups, *, num_replicas: int, rank: int, seed: int, repeats: int, workers: int,
                 batch_size: int, window: int):
        if window < 1 or batch_size < 1:
            raise ValueError(f"GroupedOrder needs window >= 1 and batch_size >= 1, got {window}, {batch_size}")
        self.num_replicas, self.rank, self.seed, self.repeats = num_replicas, rank, seed, repeats
        self.workers, self.batch_size, self.window = workers, batch_size, window
        self.streams_per_rank = max(1, workers)
        streams = num_replicas * self.streams_per_rank
        self.unit_starts, self.unit_rows = split_units(np.asarray(row_groups, dtype=np.int64), streams)
        self.num_rows = int(self.unit_rows.sum())
        fewest = int(dealt_rows(self.unit_rows, streams).min())  # the same in every cycle
        self.stream_epoch = fewest // batch_size * batch_size  # T': samples per stream per epoch
        if self.stream_epoch == 0:
            raise InputError(
                f"the grouped order deals the {len(row_groups)} row groups ({self.num_rows} rows) of the training "
                f"split to {num_replicas} process(es) x {self.streams_per_rank} loader stream(s), {fewest} rows to "
                f"the smallest, fewer than a micro-batch of {batch_size}: lower data.num_workers or "
                f"train.batch_per_device, or set data.order=random")
        self.epoch_length = self.stream_epoch * self.streams_per_rank
        self._cycle = (None, None)

    def layout(self) -> dict:
        return {"workers": self.workers, "micro_batch": self.batch_size, "window": self.window}

    def epoch(self, epoch: int) -> np.ndarray:
        """This process's rows of ``epoch``: batch k from stream ``k % workers``."""
        cycle, part = divmod(epoch, self.repeats)
        streams = self._streams(cycle)
        per_epoch = self.stream_epoch
        batches = [s[part * per_epoch:(part + 1) * per_epoch].reshape(-1, self.batch_size) for s in streams]
        return np.stack(batches, axis=1).reshape(-1)

    def _streams(self, cycle: int) -> list[np.ndarray]:
        """This process's streams of ``cycle``: ``repeats x T'`` samples each (cached per cycle)."""
        if self._cycle[0] != cycle:
            rng = np.random.default_rng([self.seed, cycle])
            dealt = deal_units(self.unit_rows, self.num_replicas * self.streams_per_rank, rng)
            streams = []
            for local in range(self.streams_per_rank):
                stream = self.rank * self.streams_per_rank + local
                rows = window_order(dealt[stream], self.unit_starts, self.unit_rows, self.window,
                                    self.stream_epoch, np.random.default_rng([self.seed, cycle, stream]))
                streams.append(np.repeat(rows, self.repeats))
            self._cycle = (cycle, streams)
        return self._cycle[1]


def split_units(row_groups: np.ndarray, streams: int) -> tuple[np.ndarray, np.ndarray]:
    """(first row, rows) of the units the grouped order deals: the row groups, each cut into
    ``ceil(streams / groups)`` equal row ranges when there are fewer groups than streams."""
    starts = np.concatenate([[0], np.cumsum(row_groups)[:-1]]).astype(np.int64)
    pieces = max(1, math.ceil(streams / len(row_groups)))
    if pieces == 1:
        return starts, row_groups.copy()
    unit_starts, unit_rows = [], []
    for start, rows in zip(starts.tolist(), row_groups.tolist()):
        bounds = np.linspace(0, rows, pieces + 1).round().astype(np.int64)
        for low, high in zip(bounds[:-1], bounds[1:]):
            if high > low:
                unit_starts.append(start + low)
                unit_rows.append(high - low)
    return np.array(unit_starts, dtype=np.int64), np.array(unit_rows, dtype=np.int64)


def deal_units(unit_rows: np.ndarray, streams: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per stream its units, in a random order. Largest units first, each to the stream with the
    fewest rows so far (Graham's LPT rule), units of equal size in a random order: the rows per
    stream depend on the sizes alone, so every cycle gives each stream as many rows as
    :func:`dealt_rows` says."""
    shuffled = rng.permutation(len(unit_rows))
    by_size = shuffled[np.argsort(-unit_rows[shuffled], kind="stable")]
    dealt = [[] for _ in range(streams)]
    heap = [(0, s) for s in range(streams)]
    for unit in by_size.tolist():
        rows, slot = heapq.heappop(heap)
        dealt[slot].append(unit)
        heapq.heappush(heap, (rows + int(unit_rows[unit]), slot))
    return [rng.permutation(np.asarray(units, dtype=np.int64)) for units in dealt]


def dealt_rows(unit_rows: np.ndarray, streams: int) -> np.ndarray:
    """The rows :func:`deal_units` gives each stream."""
    loads = [0] * streams
    heap = [(0, s) for s in range(streams)]
    for rows in np.sort(unit_rows)[::-1].tolist():
        load, slot = heapq.heappop(heap)
        loads[slot] = load + rows
        heapq.heappush(heap, (loads[slot], slot))
    return np.array(loads, dtype=np.int64)


def window_order(units, unit_starts: np.ndarray, unit_rows: np.ndarray, window: int, take: int,
                 rng: np.random.Generator) -> np.ndarray:
    """The first ``take`` rows of a stream reading ``units`` in this order through a sliding window:
    units are opened while the open ones hold fewer than ``window`` rows, and each next row is drawn
    uniformly from the undrawn rows of the open units."""
    starts, sizes = unit_starts[units].tolist(), unit_rows[units].tolist()
    out = [0] * take
    pool, owner = [], []  # the undrawn rows of the open units, and the position of each one's unit
    remaining = list(sizes)
    open_rows, opened = 0, 0
    for i, draw in enumerate(rng.random(take).tolist()):
        while open_rows < window and opened < len(sizes):
            pool.extend(range(starts[opened], starts[opened] + sizes[opened]))
            owner.extend([opened] * sizes[opened])
            open_rows += sizes[opened]
            opened += 1
        j = int(draw * len(pool))
        out[i], unit = pool[j], owner[j]
        pool[j], owner[j] = pool[-1], owner[-1]
        pool.pop()
        owner.pop()
        remaining[unit] -= 1
        if remaining[unit] == 0:
            open_rows -= sizes[unit]
    return np.array(out, dtype=np.int64)


class EvalBatches(Sampler):
    """The batches of one process in an evaluation pass (a DataLoader ``batch_sampler``): every row
    once over all processes, each row group read by one loader worker of one process.

    The rows are cut into ``processes x workers`` contiguous streams at row-group boundaries (as
    near to equal rows as the groups allow); process ``rank`` yields batch ``k`` from its stream
    ``k % workers`` (the DataLoader's dispatch, see the module docstring). Every stream is cut into
    the same number of batches of at most ``batch_size`` rows, so every process runs the same
    number of forward passes. ``valid[k]`` is the number of real rows of batch ``k``: a stream with
    no rows left pads with one repeated row, which the evaluation does not count (only datasets with
    about as few row groups as streams have such a batch)."""

    def __init__(self, row_groups, batch_size: int, *, num_replicas: int, rank: int, workers: int):
        row_groups = np.asarray(row_groups, dtype=np.int64)
        streams_per_rank = max(1, workers)
        streams = num_replicas * streams_per_rank
        total = int(row_groups.sum())
        if total == 0:
            raise InputError("the evaluation split has no rows: nothing to evaluate")
        ends = np.cumsum(row_groups)
        # stream s ends at the group boundary nearest to (s + 1) / streams of the rows
        cuts = [0] + [int(ends[np.abs(ends - total * (s + 1) / streams).argmin()]) for s in range(streams - 1)] + [total]
        cuts = np.maximum.accumulate(cuts)
        rows = np.diff(cuts)
        count = max(1, math.ceil(int(rows.max()) / batch_size))
        self.batches, self.valid = [], []
        mine = [np.array_split(np.arange(cuts[s], cuts[s + 1]), count)
                for s in range(rank * streams_per_rank, (rank + 1) * streams_per_rank)]
        filler = next(int(cuts[s]) for s in range(streams) if rows[s] > 0)
        for k in range(count):
            for stream in mine:
                batch = stream[k].tolist()
                self.valid.append(len(batch))
                self.batches.append(batch or [filler])

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
