"""The data path: every dataset in, model input out.

- :mod:`~clsvit.data.sources`: :func:`load_splits` turns the recipe's ``data`` section into
  (train, val, num_classes), whatever the source: a hub id, an imagefolder (:mod:`~clsvit.data.imagefolder`),
  parquet shards read in place (:mod:`~clsvit.data.parquet`), or the embedded shapes dataset
  (:mod:`~clsvit.data.shapes`).
- :mod:`~clsvit.data.agreement`: :func:`load_splits_on_every_process`, the splits every process
  of a launch holds, checked to be the same (rows, class names, a digest of the listing or shards).
- :mod:`~clsvit.data.images`: one sample — decoding to RGB, per-sample seeded RNGs, the base dataset
  :class:`~clsvit.data.images.ImageClassDataset`, broken files replaced and counted.
- :mod:`~clsvit.data.sampler`: :class:`TrainSampler` yields ``(index, sample_seed)`` in the order
  ``data.order`` names (grouped: each parquet row group read once per cycle of epochs by one loader worker;
  random: a permutation of all rows). With the dataset it makes every augmented sample a pure
  function of (run seed, epoch, layout, position): a mid-epoch resume is bit-identical. The random
  order does not depend on the number of DataLoader workers; the grouped order does.
- :mod:`~clsvit.data.loaders`: timm's ``create_transform`` with the DeiT-III settings from the
  recipe, :func:`build_image_dataset` for the path ``data.augment_on`` names (``cpu``: the timm PIL
  transform in the workers; ``device``: workers that hand over uint8 crops, :mod:`~clsvit.data.crops`,
  and batched augmentation on the accelerator, :mod:`~clsvit.data.augment`), and the loaders.

Neither loader goes through ``accelerator.prepare``: :class:`TrainSampler` and the eval loader's
:class:`~clsvit.data.sampler.EvalBatches` already shard by rank, and accelerate would shard again
(accelerate #4075).
"""

from clsvit.data.agreement import load_splits_on_every_process
from clsvit.data.loaders import (
    build_eval_loader,
    build_eval_transform,
    build_image_dataset,
    build_train_loader,
    build_train_sampler,
    build_train_transform,
)
from clsvit.data.sampler import TrainSampler
from clsvit.data.sources import SOURCES, load_raw_splits, load_splits, split_patterns

__all__ = ["SOURCES", "TrainSampler", "build_eval_loader", "build_eval_transform", "build_image_dataset",
           "build_train_loader", "build_train_sampler", "build_train_transform", "load_raw_splits", "load_splits",
           "load_splits_on_every_process", "split_patterns"]
