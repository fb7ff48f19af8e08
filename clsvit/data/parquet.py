"""Parquet shards read in place: the rows of a split without an Arrow copy in the datasets cache.

``datasets.load_dataset("parquet", ...)`` converts every shard into Arrow files in the datasets
cache before the first row can be read: for ImageNet-1k a second copy of about 140 GB, written by one
process while the others wait. :class:`ParquetRows` reads the shards where they are instead. On
start it reads only each shard's footer (row counts, schema and the ``datasets`` features stored in
the schema metadata); a row is read when it is asked for.

Parquet's unit of reading is the row group: one row costs the read of its row group's columns
(``datasets`` writes image datasets in groups of 100 rows). :class:`ParquetRows` keeps the last
few row groups it read per process, so a sequential pass (evaluation) reads each group once; a
random training order reads a group per sample (``benchmarks/bench_scale.py`` measures the cost).

The object answers the part of ``datasets.Dataset``'s interface the rest of clsvit uses
(``column_names``, ``features``, ``select_columns``, ``cast_column``, ``len``, ``dataset[i]``) and
pickles without open files, so DataLoader workers open their own.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clsvit.errors import InputError

CACHED_ROW_GROUPS = 4  # per process: a sequential pass reads each row group once


class ParquetRows:
    """The rows of ``files`` (parquet shards of one split, in this order), read in place.

    ``columns`` selects columns (default: all); ``features`` overrides the ``datasets`` features
    found in the shards' schema metadata (as :meth:`cast_column` does). Shards whose schemas
    differ are an :class:`~clsvit.errors.InputError` naming the first one that differs.
    """

    def __init__(self, files: list[str], columns: list[str] | None = None, features=None):
        if not files:
            raise InputError("ParquetRows needs at least one parquet file")
        self.files = [str(f) for f in files]
        schema, group_rows = None, []
        for path in self.files:
            try:
                metadata = pq.read_metadata(path)
            except (OSError, pa.ArrowInvalid) as error:
                first_line = str(error).strip().splitlines()[0]
                raise InputError(f"{path} is not a readable parquet file ({first_line})") from error
            file_schema = metadata.schema.to_arrow_schema()
            if schema is None:
                schema = file_schema
            elif not file_schema.remove_metadata().equals(schema.remove_metadata()):
                raise InputError(f"{path} has columns {file_schema.names} ({file_schema.types}), but "
                                 f"{self.files[0]} has {schema.names} ({schema.types}): one split's shards "
                                 f"must share one schema")
            group_rows.append([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
        self._all_features = datasets.Features.from_arrow_schema(schema)
        self.columns = list(columns) if columns is not None else list(schema.names)
        self._features = datasets.Features(features if features is not None else
                                           {name: self._all_features[name] for name in self.columns})
        # row group k covers the rows [starts[k], starts[k + 1]); it is group groups[k, 1] of file groups[k, 0]
        self._groups = np.array([(f, g) for f, rows in enumerate(group_rows) for g in range(len(rows))],
                                dtype=np.int64).reshape(-1, 2)
        self._starts = np.concatenate([[0], np.cumsum([n for rows in group_rows for n in rows])]).astype(np.int64)
        self._opened: dict = {}

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
        row = self._row_group(group).slice(index - int(self._starts[group]), 1).to_pylist()[0]
        return self._features.decode_example(row)

    # ---- a whole column

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of every row (reads only that column of each shard)."""
        return pa.concat_tables(pq.read_table(path, columns=[name]) for path in self.files).column(name)

    # ---- reading

    def _view(self, columns: list[str], features: dict) -> ParquetRows:
        view = object.__new__(ParquetRows)
        view.__dict__.update(self.__dict__)
        view.columns, view._features, view._opened = columns, datasets.Features(features), {}
        return view

    def _row_group(self, group: int) -> pa.Table:
        """Row group ``group`` (the selected columns), from this process's cache when it is there."""
        pid = os.getpid()
        if pid not in self._opened:  # a forked DataLoader worker opens its own files, keeps its own cache
            self._opened = {pid: ({}, OrderedDict())}
        handles, cache = self._opened[pid]
        if group in cache:
            cache.move_to_end(group)
            return cache[group]
        file_index, row_group = (int(v) for v in self._groups[group])
        if file_index not in handles:
            handles[file_index] = pq.ParquetFile(self.files[file_index], memory_map=True)
        table = handles[file_index].read_row_group(row_group, columns=self.columns)
        cache[group] = table
        if len(cache) > CACHED_ROW_GROUPS:
            cache.popitem(last=False)
        return table

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_opened": {}}
