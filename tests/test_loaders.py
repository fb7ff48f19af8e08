"""What clsvit.data.loaders builds from a recipe: the training transform (timm's), the dataset of the
recipe's columns, the sampler's order and the DataLoaders' settings, checked against timm's
attributes, torch's DataLoader attributes and orders computed by hand."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import Subset, TensorDataset
from torchvision.transforms import InterpolationMode

from clsvit import data as D
from clsvit.config import load_config
from clsvit.data.parquet import ParquetRows
from clsvit.errors import InputError
from test_parquet import rows_of as shard  # one shard in row groups of the given sizes; column i = the row


def recipe(*overrides):
    return load_config("recipes/default.yaml", ["model.img_size=32", *overrides])


def png(seed: int, size: int = 8) -> dict:
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def images(count: int, image_column: str = "image", label_column: str = "label") -> Dataset:
    """``count`` 8x8 PNGs, label ``i % 3``, in the named columns."""
    features = Features({image_column: ImageFeature(), label_column: ClassLabel(num_classes=3)})
    return Dataset.from_dict({image_column: [png(i) for i in range(count)],
                              label_column: [i % 3 for i in range(count)]}, features=features)


# ---------------------------------------------------------------- transform and dataset

def test_the_training_crop_resizes_with_the_recipes_interpolation():
    """aug.interpolation reaches timm's RandomResizedCrop (timm's own default is bilinear; DeiT-III's
    recipe says bicubic)."""
    assert D.build_train_transform(recipe()).transforms[0].interpolation == InterpolationMode.BICUBIC
    bilinear = D.build_train_transform(recipe("aug.interpolation=bilinear"))
    assert bilinear.transforms[0].interpolation == InterpolationMode.BILINEAR


def test_the_dataset_reads_the_columns_the_recipe_names():
    """data.image_column / data.label_column other than image / label (webdataset-style jpg / cls): each
    sample is the eval transform of that column's image with that column's label."""
    rows = images(4, image_column="jpg", label_column="cls")
    cfg = recipe()
    dataset = D.build_image_dataset(rows, cfg, train=False, num_classes=3, image_column="jpg", label_column="cls")
    transform = D.build_eval_transform(cfg)
    for i in range(4):
        image, label, problems = dataset[i]
        assert label == i % 3 and problems == ()
        assert torch.equal(image, transform(Image.open(io.BytesIO(png(i)["bytes"])).convert("RGB")))


def test_device_decoding_with_cpu_augmentation_is_refused_in_one_line():
    cfg = recipe()
    cfg["data"]["decode_on"] = "device"
    with pytest.raises(InputError) as error:
        D.build_image_dataset(images(2), cfg, train=True, num_classes=3)
    assert str(error.value) == "data.decode_on=device needs data.augment_on=device (the CPU path decodes with PIL)"


# ---------------------------------------------------------------- the training order

def test_the_random_order_without_repeats_splits_every_row_once_over_the_processes():
    """aug.repeated_aug=1 on two processes: each of the 40 rows once, 20 per process (with the
    default of 3 repeats timm's selection of 40 // 256 * 256 rows would leave none)."""
    cfg = recipe("aug.repeated_aug=1")
    samplers = [D.build_train_sampler(list(range(40)), cfg, num_replicas=2, rank=rank, micro_batch=4)
                for rank in range(2)]
    per_rank = [[index for index, _ in sampler] for sampler in samplers]
    assert [len(s) for s in samplers] == [len(r) for r in per_rank] == [20, 20]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(40))


class Rows(torch.utils.data.Dataset):
    """What build_image_dataset makes, as far as the sampler sees it: the rows as ``.dataset``."""

    def __init__(self, rows):
        self.dataset = rows

    def __len__(self):
        return len(self.dataset)


def test_the_grouped_order_follows_the_recipes_workers_micro_batch_and_window(tmp_path):
    """Eight row groups of 10 rows, data.num_workers=2, micro-batches of 4, data.window=10: batch k
    comes from worker stream k % 2 (torch hands batch k to worker k % 2), the two streams read disjoint
    row groups, and with a window of one group each stream draws a group's 10 rows before opening the
    next, so its first 10 rows are one whole row group."""
    rows = shard(tmp_path / "train.parquet", [10] * 8)
    cfg = recipe("data.num_workers=2", "data.window=10")
    sampler = D.build_train_sampler(Rows(rows), cfg, num_replicas=1, rank=0, micro_batch=4)
    order = np.array([index for index, _ in sampler])
    assert len(order) == 80
    batches = order.reshape(-1, 4)
    streams = [batches[0::2].reshape(-1), batches[1::2].reshape(-1)]
    groups = [set((stream // 10).tolist()) for stream in streams]
    assert groups[0].isdisjoint(groups[1]) and len(groups[0]) == len(groups[1]) == 4
    for stream in streams:
        for start in range(0, 40, 10):
            assert len(set((stream[start:start + 10] // 10).tolist())) == 1
    assert sampler.layout() == {"order": "grouped", "processes": 1, "workers": 2, "micro_batch": 4, "window": 10}


# ---------------------------------------------------------------- the DataLoaders

def test_the_train_loader_yields_full_batches_only():
    """10 rows in batches of 4: two full batches, the 2 rows left over are not a batch (batch-mode
    Mixup needs equal sizes)."""
    cfg = recipe("data.num_workers=0")
    dataset = D.build_image_dataset(images(10), cfg, train=True, num_classes=3)
    sampler = D.TrainSampler(len(dataset), num_replicas=1, rank=0, seed=0)
    loader = D.build_train_loader(dataset, sampler, 4, cfg["data"])
    assert [len(labels) for _, labels, _ in loader] == [4, 4]
    assert len(loader) == 2


@pytest.mark.parametrize("accelerator", [False, True])
def test_loader_settings_come_from_the_recipe(monkeypatch, accelerator):
    """num_workers, prefetch_factor and persistent_workers reach torch's DataLoader from one worker
    on; pin_memory only where an accelerator is there to copy to (torch.accelerator.is_available)."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator)
    dataset = D.build_image_dataset(images(8), recipe(), train=True, num_classes=3)
    sampler = D.TrainSampler(len(dataset), num_replicas=1, rank=0, seed=0)
    for pin in (False, True):
        cfg = recipe("data.num_workers=1", "data.prefetch_factor=3", f"data.pin_memory={str(pin).lower()}")
        loader = D.build_train_loader(dataset, sampler, 4, cfg["data"])
        assert loader.pin_memory is (pin and accelerator)
        assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (1, 3, True)


def test_the_eval_loader_reads_each_row_group_in_one_worker_and_keeps_no_workers(tmp_path):
    """Row groups of 5 and 3 rows, two workers, batches of at most 4: worker 0 reads group 0 (rows
    0-4) and worker 1 group 1 (rows 5-7), each in two batches, dispatched alternately; row by row
    (ignoring the groups) the cut would be rows 0-3 | 4-7. The loader runs the recipe's workers and
    prefetch, and does not keep them alive between evaluations."""
    path = tmp_path / "validation-00000-of-00001.parquet"
    pq.write_table(images(8).data.table, path, row_group_size=5)
    rows = ParquetRows([str(path)])
    assert rows.row_groups().tolist() == [5, 3]
    cfg = recipe("data.num_workers=2", "data.prefetch_factor=3")
    loader = D.build_eval_loader(D.build_image_dataset(rows, cfg, train=False, num_classes=3), 4, cfg["data"])
    assert list(loader.batch_sampler) == [[0, 1, 2], [5, 6], [3, 4], [7]]
    assert (loader.num_workers, loader.prefetch_factor) == (2, 3)
    assert loader.persistent_workers is False


def test_a_subset_batches_with_its_datasets_collate_and_a_plain_dataset_with_torchs():
    """Through a Subset (eval.py evaluates a shard of the split) the batch is ImageClassDataset.collate's:
    the broken row 1 of the subset's rows [3, 1, 0] is one record in a flat list. A dataset without its
    own collate gets torch's default_collate."""
    rows = images(4).cast_column("image", ImageFeature(decode=False))
    broken = rows.map(lambda row, i: {"image": {"bytes": b"not an image", "path": None} if i == 1 else row["image"]},
                      with_indices=True)
    cfg = recipe("data.num_workers=0")
    dataset = D.build_image_dataset(broken, cfg, train=False, num_classes=3)
    [(batch, labels, problems)] = list(D.build_eval_loader(Subset(dataset, [3, 1, 0]), 3, cfg["data"]))
    assert batch.shape == (3, 3, 32, 32) and labels.tolist() == [0, 2, 0]  # row 1 replaced by row 2
    assert [(p.path, p.row) for p in problems] == [(None, 1)]
    plain = D.build_eval_loader(TensorDataset(torch.arange(5)), 2, cfg["data"])
    assert [batch[0].tolist() for batch in plain] == [[0, 1], [2, 3], [4]]
