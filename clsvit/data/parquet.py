"""Parquet shards read in place: the rows of a split without an Arrow copy in the datasets cache.

``datasets.load_dataset("parquet", ...)`` converts every shard into Arrow files in the datasets
cache before the first row can be read: for ImageNet-1k a second copy of about 140 GB, written by
one process while the others wait. :class:`ParquetRows` reads the shards where they are instead. On
start it reads only each shard's footer (row counts, schema and the ``datasets`` features stored in
the schema metadata); a row is read when it is asked for.

Parquet's unit of reading is the row group: one row costs the read of its row group's columns.
Each process (each DataLoader worker) keeps the row groups it read in a cache of ``cache_rows``
rows plus one group; a group all of whose rows were read leaves first, then the least recently used.
The orders of :mod:`clsvit.data.sampler` read each group once per pass with this cache (the grouped
training order sets ``cache_rows`` to its window, :func:`clsvit.data.loaders.build_train_sampler`).

What a run can rely on:

- open files are bounded: at most :data:`OPEN_SHARDS` per process, least recently used closed first;
- files are read with ``memory_map=False``: no file-backed memory grows with the bytes read, and a
  shard truncated under a running job is a read error, not a bus error;
- a shard whose size, modification time or row groups differ from what the launch read, or whose
  row group cannot be read, stops the run with an :class:`~clsvit.errors.InputError` naming the
  shard and the row group (a worker's error reaches the main process as this type).

The object answers the part of ``datasets.Dataset``'s interface the rest of clsvit uses
(``column_names``, ``features``, ``select_columns``, ``cast_column``, ``len``, ``dataset[i]``) and
pickles without open files or cached rows, so DataLoader workers open their own.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clsvit.errors import InputError, quote_error

OPEN_SHARDS = 16  # open parquet files per process (each DataLoader worker is one)


class ParquetRows:
    """The rows of ``files`` (parquet shards of one split, in this order), read in place.

    ``columns`` selects columns (default: all); ``features`` overrides the ``datasets`` features
    found in the shards' schema metadata (as :meth:`cast_column` does). Shards whose schemas
    (column names and types) differ are an :class:`~clsvit.errors.InputError` naming the first one
    that differs. ``cache_rows``: rows of row groups each process keeps beyond the one it reads.
    """

    def __init__(self, files: list[str], columns: list[str] | None = None, features=None, cache_rows: int = 0):
        if not files:
            raise InputError("ParquetRows needs at least one parquet file")
        self.files = [str(f) for f in files]
        schema, group_rows, self._identities = None, [], []
        for path in self.files:
            try:
                stat = os.stat(path)
                metadata = pq.read_metadata(path)
            except (OSError, pa.ArrowInvalid) as error:
                raise InputError(f"{path} is not a readable parquet file ({quote_error(error)})") from error
            file_schema = metadata.schema.to_arrow_schema()
            if schema is None:
                schema = file_schema
            elif not file_schema.remove_metadata().equals(schema.remove_metadata()):
                raise InputError(f"{path} has columns {_describe(file_schema)}, but {self.files[0]} has "
                                 f"{_describe(schema)}: one split's shards must share one schema")
            rows = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            group_rows.append(rows)
            self._identities.append(_identity(stat))
        self._all_features = datasets.Features.from_arrow_schema(schema)
        self.columns = list(columns) if columns is not None else list(schema.names)
        self._features = datasets.Features(features if features is not None else
                                           {name: self._all_features[name] for name in self.columns})
        # row group k covers the rows [starts[k], starts[k + 1]); it is group groups[k, 1] of file groups[k, 0]
        self._groups = np.array([(f, g) for f, rows in enumerate(group_rows) for g in range(len(rows))],
                                dtype=np.int64).reshape(-1, 2)
        self._file_groups = group_rows
        self._starts = np.concatenate([[0], np.cumsum([n for rows in group_rows for n in rows])]).astype(np.int64)
        self.cache_rows = cache_rows
        self._reader = None

    # ---- the datasets.Dataset interface clsvit uses

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    @property
    def features(self) -> datasets.Features:
        return self._features

    def __len__(self) -> int:
        return int(self._starts[-1])

    def select_columns(self, columns: list[str]) -> ParquetRows:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise InputError(f"column(s) {', '.join(missing)} not in {self.files[0]}; "
                             f"available columns: {', '.join(self.columns)}")
        return self._view(list(columns), {c: self._features[c] for c in columns})

    def cast_column(self, column: str, feature) -> ParquetRows:
        """Another way of presenting a stored column (e.g. ``Image(decode=False)``); the stored
        values are not converted."""
        if column not in self.columns:
            raise InputError(f"column {column!r} not in {self.files[0]}; available columns: {', '.join(self.columns)}")
        return self._view(self.columns, {**self._features, column: feature})

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} outside [0, {len(self)})")
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        row = self._reader_here().row(group, index - int(self._starts[group]))
        return self._features.decode_example(row)

    # ---- row groups

    def row_groups(self) -> np.ndarray:
        """Rows per row group, in row order (what :mod:`clsvit.data.sampler`'s orders read by)."""
        return np.diff(self._starts)

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of every row (reads only that column of each shard)."""
        return pa.concat_tables(pq.read_table(path, columns=[name], memory_map=False)
                                for path in self.files).column(name)

    @property
    def reads(self) -> int:
        """Row groups this process has read from the files."""
        return self._reader.reads if self._reader is not None and self._reader.pid == os.getpid() else 0

    # ---- reading

    def _view(self, columns: list[str], features: dict) -> ParquetRows:
        view = object.__new__(ParquetRows)
        view.__dict__.update(self.__dict__)
        view.columns, view._features, view._reader = columns, datasets.Features(features), None
        return view

    def _reader_here(self) -> _Reader:
        """This process's files and cache: a forked DataLoader worker opens its own."""
        if self._reader is None or self._reader.pid != os.getpid():
            largest = int(self.row_groups().max())
            self._reader = _Reader(self, self.cache_rows + largest)
        return self._reader

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}


class _Reader:
    """One process's open shards (at most :data:`OPEN_SHARDS`) and cached row groups (at most
    ``capacity`` rows)."""

    def __init__(self, rows: ParquetRows, capacity: int):
        self.pid, self.rows, self.capacity = os.getpid(), rows, capacity
        self.files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self.cache: OrderedDict[int, tuple[pa.Table, np.ndarray]] = OrderedDict()  # group -> (table, rows read)
        self.cached_rows, self.reads = 0, 0

    def row(self, group: int, offset: int) -> dict:
        if group in self.cache:
            self.cache.move_to_end(group)
        else:
            self._load(group)
        table, seen = self.cache[group]
        seen[offset] = True
        return table.slice(offset, 1).to_pylist()[0]

    def _load(self, group: int) -> None:
        table = self._read(group)
        self.reads += 1
        self.cache[group] = (table, np.zeros(table.num_rows, dtype=bool))
        self.cached_rows += table.num_rows
        while self.cached_rows > self.capacity and len(self.cache) > 1:
            done = next((g for g, (_, seen) in self.cache.items() if g != group and seen.all()), None)
            evicted = done if done is not None else next(iter(self.cache))  # else the least recently used
            self.cached_rows -= self.cache.pop(evicted)[0].num_rows

    def _read(self, group: int) -> pa.Table:
        rows = self.rows
        file_index, row_group = (int(v) for v in rows._groups[group])
        path = rows.files[file_index]
        where = f"parquet shard {path}, row group {row_group}"
        try:
            stat = os.stat(path)
        except OSError as error:
            raise InputError(f"{where}: the shard cannot be read any more ({quote_error(error)})") from error
        expected = rows._identities[file_index]
        if _identity(stat) != expected:
            raise InputError(f"{where}: the shard changed after the launch read it ({_change(expected, stat)}); "
                             f"restore it, or relaunch to train on the data as it is now")
        try:
            handle = self._open(file_index)
            metadata = handle.metadata
            if [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] != rows._file_groups[file_index]:
                raise InputError(f"{where}: the shard's row groups changed after the launch read it; restore it, "
                                 f"or relaunch to train on the data as it is now")
            return handle.read_row_group(row_group, columns=rows.columns)
        except (OSError, pa.ArrowException) as error:
            self._close(file_index)
            raise InputError(f"{where} cannot be read ({quote_error(error)}); the shard "
                             f"is damaged: download or write it again") from error

    def _open(self, file_index: int) -> pq.ParquetFile:
        if file_index in self.files:
            self.files.move_to_end(file_index)
            return self.files[file_index]
        while len(self.files) >= OPEN_SHARDS:
            self._close(next(iter(self.files)))
        handle = pq.ParquetFile(self.rows.files[file_index], memory_map=False)
        self.files[file_index] = handle
        return handle

    def _close(self, file_index: int) -> None:
        handle = self.files.pop(file_index, None)
        if handle is not None:
            handle.close()


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    """What a shard must still be when a row group is read: its size, modification time and file."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _change(expected: tuple, stat: os.stat_result) -> str:
    size, _, inode = expected
    if stat.st_ino != inode:
        return "another file now has its name"
    if stat.st_size != size:
        return f"{size} bytes at launch, {stat.st_size} now"
    return "modified since"


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{name}: {kind}" for name, kind in zip(schema.names, schema.types))
