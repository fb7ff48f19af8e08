"""The orders of clsvit.data.sampler read through real DataLoader workers: the grouped training order
reads each parquet row group once per cycle, in one worker, and yields each row aug.repeated_aug
times; a resume stays sample-exact; the evaluation pass reads every row once and counts it once."""

import os
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from clsvit import data as D
from clsvit.config import ConfigError, load_config
from clsvit.data.parquet import ParquetRows
from clsvit.data.sampler import EvalBatches, TrainSampler
from clsvit.errors import InputError
from test_parquet import rows_of as shard  # one shard in row groups of the given sizes; column i = the row


class ReadProbe(Dataset):
    """Each sample: (row, the worker that fetched it, whether fetching it read a row group from the file)."""

    def __init__(self, rows: ParquetRows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        before = self.rows.reads
        assert self.rows[index]["i"] == index
        info = torch.utils.data.get_worker_info()
        return index, info.id if info is not None else 0, self.rows.reads - before


def group_of(rows: ParquetRows):
    starts = np.cumsum(rows.row_groups()) - rows.row_groups()
    return lambda index: int(np.searchsorted(starts, index, side="right")) - 1


def read_epochs(rows, samplers, workers: int, batch: int, epochs):
    """Every process's loader (persistent workers, a new iterator per epoch as train.py's loop makes
    them) over ``epochs``: per epoch the rows yielded and the row groups read, as (process, worker, group)."""
    loaders = [DataLoader(ReadProbe(rows), batch_size=batch, sampler=sampler, drop_last=True, num_workers=workers,
                          persistent_workers=workers > 0, collate_fn=lambda b: b) for sampler in samplers]
    group, out = group_of(rows), []
    for epoch in epochs:
        yielded, reads = [], []
        for rank, (sampler, loader) in enumerate(zip(samplers, loaders)):
            sampler.set_epoch(epoch)
            for samples in loader:
                yielded += [index for index, _, _ in samples]
                reads += [(rank, worker, group(index)) for index, worker, read in samples if read]
        out.append((yielded, reads))
    return out


def samplers(rows, processes: int, workers: int, batch: int, window: int, repeats: int = 3, seed: int = 0):
    rows.cache_rows = window  # as build_train_sampler sizes it
    return [TrainSampler(len(rows), num_replicas=processes, rank=rank, seed=seed, repeats=repeats,
                         row_groups=rows.row_groups(), workers=workers, batch_size=batch, window=window)
            for rank in range(processes)]


def test_two_processes_two_workers_read_each_row_group_once_and_yield_each_row_three_times(tmp_path):
    """A cycle of aug.repeated_aug=3 epochs (DeiT's epoch: about N samples over all processes, so a
    cycle reads the split once): every row group read once, by one worker of one process, and every
    row yielded exactly 3 times; within an epoch no row group is read twice."""
    rows = shard(tmp_path / "train.parquet", [10] * 16)
    cycle = read_epochs(rows, samplers(rows, processes=2, workers=2, batch=4, window=15), workers=2, batch=4,
                        epochs=range(3))
    yielded = Counter(index for rows_of_epoch, _ in cycle for index in rows_of_epoch)
    assert yielded == Counter({index: 3 for index in range(160)})
    reads = [read for _, epoch_reads in cycle for read in epoch_reads]
    assert sorted(group for _, _, group in reads) == list(range(16))
    assert all(len(epoch) == 160 for epoch, _ in cycle)  # an epoch: N samples over the processes (DeiT)
    # the next cycle reads every group once more, in another order
    (_, next_reads), = read_epochs(rows, samplers(rows, 2, 2, 4, 15), workers=2, batch=4, epochs=[3])
    assert [g for _, _, g in next_reads] != [g for _, _, g in cycle[0][1]][:len(next_reads)]


@pytest.mark.parametrize("sizes", [[1] * 60, [100] * 4 + [37], [1000, 1000, 1000, 421], [7] * 9 + [2]],
                         ids=["1-row groups", "100-row groups, short last", "1000-row groups, short last",
                              "7-row groups, short last"])
def test_row_group_sizes_each_read_once_per_epoch(tmp_path, sizes):
    """One process, two workers, no repeats: an epoch reads every row group once, in one worker, and
    yields every row at most once: all of them but the few (fewer than a micro-batch plus the
    difference between the two workers' rows) that the equal stream lengths leave out."""
    rows = shard(tmp_path / "train.parquet", sizes)
    batch, window = 4, 50
    (yielded, reads), = read_epochs(rows, samplers(rows, 1, 2, batch, window, repeats=1), workers=2, batch=batch,
                                    epochs=[1])
    assert max(Counter(yielded).values()) == 1
    assert len(Counter(group for _, _, group in reads)) == len(reads)  # no group read twice
    streams = np.sort(D.sampler.dealt_rows(np.asarray(sizes), 2))
    assert len(yielded) == 2 * (streams[0] // batch * batch)
    assert sum(sizes) - len(yielded) < 2 * batch + (streams[1] - streams[0])
    used_groups = {group_of(rows)(index) for index in yielded}
    assert used_groups <= {group for _, _, group in reads}


def test_fewer_row_groups_than_streams_are_cut_between_workers(tmp_path):
    rows = shard(tmp_path / "train.parquet", [30])
    (yielded, reads), = read_epochs(rows, samplers(rows, 1, 2, 5, 100, repeats=1), workers=2, batch=5, epochs=[0])
    assert sorted(yielded) == list(range(30))
    assert sorted(worker for _, worker, _ in reads) == [0, 1]  # the one group, read by each worker once


def test_the_window_bounds_what_a_worker_holds(tmp_path):
    """Rows are drawn from the open row groups only: at any position, the groups opened and not yet
    drawn empty hold fewer than window + one group's rows."""
    sizes = [10] * 40
    rows = shard(tmp_path / "train.parquet", sizes)
    sampler = samplers(rows, 1, 0, 4, 25, repeats=1)[0]
    order = [index for index, _ in sampler]
    group = group_of(rows)
    remaining = Counter(group(index) for index in order)
    opened, most = set(), 0
    for index in order:
        opened.add(group(index))
        remaining[group(index)] -= 1
        most = max(most, 10 * sum(1 for g in opened if remaining[g] > 0) + 1)
    assert most < 25 + 10
    assert order[:40] != sorted(order[:40])  # shuffled within the window


def test_a_resume_is_sample_exact_and_keeps_one_worker_per_group(tmp_path):
    rows = shard(tmp_path / "train.parquet", [10] * 12)
    (full, _), = read_epochs(rows, samplers(rows, 1, 2, 4, 20, repeats=1), workers=2, batch=4, epochs=[2])
    resumed = samplers(rows, 1, 2, 4, 20, repeats=1)
    resumed[0].set_epoch(2)
    resumed[0].set_start(5 * 4)  # batch 5 goes to worker 0 now: stream 1 -> worker 0, stream 0 -> worker 1
    loader = DataLoader(ReadProbe(rows), batch_size=4, sampler=resumed[0], num_workers=2, collate_fn=lambda b: b)
    samples = [sample for batch in loader for sample in batch]
    assert [index for index, _, _ in samples] == full[20:]
    group = group_of(rows)
    readers = defaultdict(set)
    for index, worker, _ in samples:
        readers[group(index)].add(worker)
    assert all(len(workers) == 1 for workers in readers.values())
    assert sum(read for _, _, read in samples) == len(readers)  # each group read once


# ---------------------------------------------------------------- TrainSampler's contract, both orders

def grouped(n=120, **kwargs):
    options = dict(num_replicas=1, rank=0, seed=3, repeats=1, row_groups=[10] * (n // 10), workers=2,
                   batch_size=4, window=20)
    return TrainSampler(n, **{**options, **kwargs})


@pytest.mark.parametrize("make", [
    lambda: TrainSampler(40, num_replicas=1, rank=0, seed=3),
    lambda: TrainSampler(40, num_replicas=2, rank=1, seed=3, repeats=1),
    lambda: grouped(),
    lambda: grouped(num_replicas=2, rank=1, repeats=3),
], ids=["random, one process", "random, no repeats", "grouped, one process", "grouped, repeats"])
def test_every_epoch_has_its_own_order(make):
    sampler = make()
    orders = []
    for epoch in (0, 1, 2, 3):
        sampler.set_epoch(epoch)
        orders.append([index for index, _ in sampler])
    assert all(orders[a] != orders[b] for a in range(4) for b in range(a))
    sampler.set_epoch(1)
    assert [index for index, _ in sampler] == orders[1]  # a pure function of the epoch


def test_the_random_order_on_one_process_is_torch_randperm_of_seed_plus_epoch():
    sampler = TrainSampler(40, num_replicas=1, rank=0, seed=3)
    sampler.set_epoch(5)
    expected = torch.randperm(40, generator=torch.Generator().manual_seed(8)).tolist()
    assert [index for index, _ in sampler] == expected


@pytest.mark.parametrize("make", [lambda: TrainSampler(40, num_replicas=2, rank=1, seed=3), grouped])
def test_set_start_takes_every_position_up_to_the_epoch_length(make):
    sampler = make()
    epoch = list(sampler)
    for position in (0, 7, len(sampler)):
        sampler.set_start(position)
        assert list(sampler) == epoch[position:]
    assert list(sampler) == epoch  # one-shot
    with pytest.raises(ValueError, match="start position"):
        sampler.set_start(len(sampler) + 1)


def test_a_mid_epoch_resume_with_another_layout_is_refused_in_one_line():
    saved = grouped(workers=2).state_dict()
    assert saved == {"layout": {"order": "grouped", "processes": 1, "workers": 2, "micro_batch": 4, "window": 20}}
    same = grouped(workers=2)
    same.load_state_dict(saved)
    same.set_start(8)
    other = grouped(workers=3)
    other.load_state_dict(saved)
    with pytest.raises(InputError) as error:
        other.set_start(8)
    assert str(error.value) == (
        "the checkpoint stopped 8 samples into an epoch of the grouped order of 1 process(es) x 2 loader worker(s), "
        "micro-batch 4, window 20 rows, and this launch has the grouped order of 1 process(es) x 3 loader worker(s), "
        "micro-batch 4, window 20 rows: the rest of that epoch cannot be re-derived; relaunch with the checkpoint's "
        "layout (processes, data.num_workers, train.batch_per_device, data.window)")
    at_epoch_start = grouped(workers=3)
    at_epoch_start.load_state_dict(saved)
    at_epoch_start.set_start(0)  # a new epoch: any layout
    random_order = TrainSampler(40, num_replicas=1, rank=0, seed=3)
    random_order.load_state_dict({"layout": {"order": "random", "processes": 2}})
    with pytest.raises(InputError, match="random order of 2 process"):
        random_order.set_start(4)


def test_too_few_rows_per_stream_for_a_micro_batch_names_the_keys():
    with pytest.raises(InputError, match=r"^the grouped order deals the 3 row groups \(30 rows\) of the training split "
                                         r"to 2 process\(es\) x 4 loader stream\(s\), 3 rows to the smallest, fewer "
                                         r"than a micro-batch of 4: lower data.num_workers"):
        TrainSampler(30, num_replicas=2, rank=0, seed=0, row_groups=[10] * 3, workers=4, batch_size=4)


def test_grouped_seeds_differ_per_copy_and_per_rank():
    per_rank = [list(grouped(num_replicas=2, rank=rank, repeats=3)) for rank in (0, 1)]
    seeds = [seed for rank in per_rank for _, seed in rank]
    assert len(set(seeds)) == len(seeds)
    first = per_rank[0]
    assert first[0][0] == first[1][0] == first[2][0]  # a row's copies in a row: one micro-batch


# ---------------------------------------------------------------- the order a recipe asks for

def recipe(*overrides):
    return load_config("recipes/default.yaml", ["model.img_size=32", *overrides])


def test_the_source_picks_the_order_and_a_key_without_meaning_is_refused(tmp_path):
    rows = shard(tmp_path / "train.parquet", [10] * 8)

    class Images(Dataset):  # what build_image_dataset makes: the rows as .dataset
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

    sampler = D.build_train_sampler(Images(rows), recipe(), num_replicas=1, rank=0, micro_batch=4)
    assert sampler.order == "grouped" and sampler.layout()["window"] == 1000 and rows.cache_rows == 1000
    assert D.build_train_sampler(Images(rows), recipe("data.order=random"), num_replicas=1, rank=0,
                                 micro_batch=4).order == "random"
    folder_rows = Images(list(range(80)))
    assert D.build_train_sampler(folder_rows, recipe(), num_replicas=1, rank=0, micro_batch=4).order == "random"
    with pytest.raises(InputError, match="data.order=grouped reads parquet row groups, and data.source=hub"):
        D.build_train_sampler(folder_rows, recipe("data.order=grouped"), num_replicas=1, rank=0, micro_batch=4)
    with pytest.raises(ConfigError, match=r"^data.order='grouped' with data.source='imagefolder': "):
        recipe("data.source=imagefolder", "data.order=grouped")
    with pytest.raises(ConfigError, match=r"^data.window=200 with data.source='imagefolder': "):
        recipe("data.source=imagefolder", "data.window=200")
    with pytest.raises(ConfigError, match=r"^data.window=200 with data.order='random': "):
        recipe("data.order=random", "data.window=200")


# ---------------------------------------------------------------- the evaluation pass

@pytest.mark.parametrize("sizes, processes, workers, batch", [
    ([10] * 7 + [3], 2, 2, 4), ([100, 100, 7], 1, 2, 32), ([1] * 9, 2, 1, 2), ([5], 2, 2, 4), ([1] * 3, 2, 2, 8)])
def test_an_evaluation_pass_reads_every_row_once_in_one_worker_per_group(tmp_path, sizes, processes, workers, batch):
    rows = shard(tmp_path / "val.parquet", sizes)
    group, counted, readers, lengths = group_of(rows), Counter(), defaultdict(set), []
    for rank in range(processes):
        batches = EvalBatches(rows.row_groups(), batch, num_replicas=processes, rank=rank, workers=workers)
        loader = DataLoader(ReadProbe(rows), batch_sampler=batches, num_workers=workers, collate_fn=lambda b: b)
        lengths.append(len(batches))
        for valid, samples in zip(batches.valid, loader, strict=True):
            assert 1 <= len(samples) <= batch and valid <= len(samples)
            counted.update(index for index, _, _ in samples[:valid])
            for index, worker, _ in samples[:valid]:
                readers[group(index)].add((rank, worker))
    assert counted == Counter(range(sum(sizes)))
    assert len(set(lengths)) == 1  # every process runs as many forward passes
    if len(sizes) >= processes * max(1, workers):
        assert all(len(r) == 1 for r in readers.values())


def test_top1_over_the_grouped_pass_equals_a_sequential_count(tmp_path):
    """The evaluation of clsvit.evaluation over the pass of build_eval_loader (two workers) counts
    what a plain loop over the split counts."""
    from accelerate import Accelerator
    from datasets import ClassLabel, Dataset as HFDataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image
    import io

    from clsvit.evaluation import topk_accuracy

    rng = np.random.default_rng(0)
    images = []
    for _ in range(45):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    labels = rng.integers(0, 7, 45).tolist()
    path = tmp_path / "validation-00000-of-00001.parquet"
    HFDataset.from_dict({"image": images, "label": labels},
                        features=Features(image=ImageFeature(), label=ClassLabel(num_classes=7))).to_parquet(
        str(path), batch_size=10)
    cfg = recipe("data.num_workers=2")
    dataset = D.build_image_dataset(ParquetRows([str(path)]), cfg, train=False, num_classes=7)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 7)).eval()
    with torch.no_grad():
        logits = torch.cat([model(dataset[i][0][None]) for i in range(len(dataset))])
    truth = torch.tensor(labels)
    top1 = 100 * (logits.argmax(1) == truth).float().mean().item()
    top5 = 100 * logits.topk(5, 1).indices.eq(truth[:, None]).any(1).float().mean().item()
    result = topk_accuracy(model, D.build_eval_loader(dataset, 8, cfg["data"]), Accelerator(cpu=True))
    assert result["images"] == 45
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)


# ---------------------------------------------------------------- the dense probes' passes

def test_the_dense_feature_pass_deals_row_groups_to_workers(tmp_path):
    """The feature cache's pass over a sorted plan: each row group's entries go to one loader worker,
    every entry once (slot >= 0), and every batch has the same size."""
    from clsvit.dense.engine import _contiguous_share, _grouped_share

    rows = shard(tmp_path / "train.parquet", [10] * 9 + [4])

    class Dense:  # a DenseDataset's shape: the rows as .dataset
        dataset = rows

    index = torch.tensor(sorted(np.random.default_rng(0).choice(94, 40, replace=False).tolist()))
    plan = {"index": index, "seed": torch.arange(40)}
    share = _grouped_share(Dense(), plan, per_rank=4, workers=2)
    slots = share["slot"].view(-1, 4)
    assert sorted(share["slot"][share["slot"] >= 0].tolist()) == list(range(40))
    group = group_of(rows)
    workers = defaultdict(set)
    for k, batch in enumerate(share["index"].view(-1, 4).tolist()):
        for entry, slot in zip(batch, slots[k].tolist()):
            if slot >= 0:
                assert entry == index[slot]
                workers[group(entry)].add(k % 2)
    assert all(len(w) == 1 for w in workers.values())
    # validation: a process's rows are one run, each worker's part of it contiguous
    assert _contiguous_share(10, 0, 2, 2) == [0, 3, 1, 4, 2] and _contiguous_share(10, 1, 2, 1) == [5, 6, 7, 8, 9]


# ---------------------------------------------------------------- train.py end to end

@pytest.mark.slow
def test_sigkill_mid_epoch_on_parquet_resumes_bit_identically_and_a_changed_layout_is_refused(tmp_path):
    """train.py on parquet shards in the grouped order, 2 processes (gloo) x 2 loader workers, 16
    row groups: killed (SIGKILL) 3 steps after its checkpoint at step 12, in the middle of the
    second epoch; a relaunch with one worker less is refused in one line, the relaunch with the
    same layout resumes from step 12 and ends with weights equal to an uninterrupted run's."""
    import signal

    from safetensors.torch import load_file

    from clsvit.data.shapes import ensure_shapes_dataset
    from test_train import start_paused
    from trainer_utils import run_train, subprocess_env, write_tiny_recipe

    env = subprocess_env(tmp_path / "hf_cache")
    shapes = ensure_shapes_dataset(num_train=256, num_val=50, image_size=32, num_classes=10, cache_dir=tmp_path / "src")
    data = tmp_path / "parquet"
    data.mkdir()
    for split in ("train", "validation"):
        name = f"{split}-00000-of-00001.parquet"
        pq.write_table(pq.read_table(shapes / name), data / name, row_group_size=16)
    overrides = [f"data.source=parquet", f"data.path={data}", "data.num_workers=2", "train.max_steps=20",
                 "train.checkpoint_every=4", "eval.every=1000"]
    run_train(write_tiny_recipe(tmp_path, tmp_path / "reference"), *overrides, env=env, processes=2)
    reference = load_file(tmp_path / "reference" / "tiny" / "model.safetensors")

    recipe = write_tiny_recipe(tmp_path, tmp_path / "killed")
    run_dir = tmp_path / "killed" / "tiny"
    launch, pids = start_paused(recipe, *overrides, env=env, pause_dir=tmp_path / "paused", step=16, processes=2)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    launch.communicate(timeout=120)
    refused = run_train(recipe, *overrides, "data.num_workers=1", env=env, processes=2, check=False)
    lines = [line for line in refused.stderr.splitlines() if "train.py: error" in line]
    assert refused.returncode != 0 and lines, refused.stderr[-3000:]
    assert lines[0].endswith(
        "the checkpoint stopped 64 samples into an epoch of the grouped order of 2 process(es) x 2 loader worker(s), "
        "micro-batch 16, window 1000 rows, and this launch has the grouped order of 2 process(es) x 1 loader "
        "worker(s), micro-batch 16, window 1000 rows: the rest of that epoch cannot be re-derived; relaunch with the "
        "checkpoint's layout (processes, data.num_workers, train.batch_per_device, data.window)"), lines
    relaunch = run_train(recipe, *overrides, env=env, processes=2)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_12'}" in relaunch.stdout + relaunch.stderr
    final = load_file(run_dir / "model.safetensors")
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in reference)


def test_the_documented_one_time_shuffle_writes_shuffled_hub_shaped_shards(tmp_path, monkeypatch):
    """docs/data.md's snippet for class-sorted shards, run as written on a class-sorted split: the
    shards it writes hold the same rows, in another order, in row groups of 100 rows, and load."""
    import re
    from pathlib import Path

    import datasets
    import pyarrow as pa

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    snippet = re.search(r"```python\n(# shuffle class-sorted shards once.*?)```", text, re.S).group(1)
    (tmp_path / "sorted").mkdir()
    labels = sorted(np.random.default_rng(0).integers(0, 5, 450).tolist())
    pq.write_table(pa.table({"image": [{"bytes": bytes([i % 256]), "path": f"{i}.jpg"} for i in range(450)],
                             "label": labels}), tmp_path / "sorted" / "train-00000-of-00001.parquet")
    snippet = snippet.replace("/data/imagenet-sorted", str(tmp_path / "sorted")).replace(
        "/data/imagenet-shuffled", str(tmp_path / "shuffled")).replace("shards = 294", "shards = 2")
    exec(compile(snippet, "docs/data.md", "exec"), {})
    written = sorted((tmp_path / "shuffled").glob("train-*.parquet"))
    assert [p.name for p in written] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    rows = ParquetRows([str(p) for p in written])
    assert rows.row_groups().tolist() == [100, 100, 25, 100, 100, 25]
    paths = [rows[i]["image"]["path"] for i in range(len(rows))]
    assert sorted(paths, key=lambda p: int(p[:-4])) == [f"{i}.jpg" for i in range(450)]
    assert [rows[i]["label"] for i in range(len(rows))] != labels
