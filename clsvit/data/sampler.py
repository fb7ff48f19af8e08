"""The training order: :class:`TrainSampler` yields ``(index, sample_seed)`` per process."""

from __future__ import annotations

import math

import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Sampler

from clsvit.errors import InputError


class TrainSampler(Sampler):
    """The training order of one process: ``(index, sample_seed)`` pairs, sharded by rank.

    Why it yields seeds: the seed makes each sample's augmentation reproducible (see
    :class:`ImageClassDataset`), so :meth:`set_start` can resume mid-epoch bit-identically by
    skipping positions without loading data, and results do not depend on ``num_workers``. The
    seed depends on (seed, epoch, rank, position), so the copies of a repeated image get
    different augmentations.

    Order per epoch, from ``torch.Generator().manual_seed(seed + epoch)``:
    - repeats > 1 and several processes: timm's ``RepeatAugSampler`` (DeiT repeated augmentation:
      each image ``repeats`` times in a row, interleaved over ranks, and its epoch selection of
      ``floor(N // 256 * 256 / num_replicas)`` samples per rank, about N / num_replicas);
    - otherwise a strided split ``perm[rank::num_replicas]``, wrapped around to equal lengths.
      Repeated augmentation is inactive on one process, as in the DeiT reference.

    Being rank-aware, the train DataLoader must not go through ``accelerator.prepare``.
    Call :meth:`set_epoch` (and :meth:`set_start` when resuming) before creating the loader iterator.
    """

    def __init__(self, num_samples: int, *, num_replicas: int, rank: int, seed: int,
                 repeats: int = 3, shuffle: bool = True):
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
            if self.repeated_aug:
                raise InputError(
                    f"repeated augmentation (aug.repeated_aug={self.repeats}, timm's RepeatAugSampler) draws "
                    f"{len(self)} images per process per epoch from the {self.num_samples}-image training split "
                    f"over {self.num_replicas} processes; {needed}: set aug.repeated_aug=1 or lower "
                    f"train.global_batch")
            raise InputError(f"the {self.num_samples}-image training split gives {len(self)} images per process per "
                             f"epoch over {self.num_replicas} process(es); {needed}: lower train.global_batch")
        return steps

    def set_start(self, position: int):
        """Skip the first ``position`` samples of the next iteration (mid-epoch resume); one-shot."""
        if not 0 <= position <= len(self):
            raise ValueError(f"start position {position} outside [0, {len(self)}]")
        self.start = position

    def __len__(self) -> int:
        if self.repeated_aug:
            return len(self._repeat_aug_sampler())
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self):
        indices = self._indices()
        seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(len(indices))
        start, self.start = self.start, 0
        return iter(list(zip(indices[start:], seeds[start:].tolist())))

    def _indices(self) -> list[int]:
        if self.repeated_aug:
            return list(self._repeat_aug_sampler())
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        order = order.tolist()
        total = len(self) * self.num_replicas
        return [order[i % self.num_samples] for i in range(self.rank, total, self.num_replicas)]

    def _repeat_aug_sampler(self):
        sampler = RepeatAugSampler(range(self.num_samples), num_replicas=self.num_replicas, rank=self.rank,
                                   shuffle=self.shuffle, num_repeats=self.repeats)
        sampler.set_epoch(self.seed + self.epoch)  # timm seeds its permutation with the epoch alone
        return sampler

