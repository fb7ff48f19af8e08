"""Dense evaluation of frozen ViT features: linear segmentation (mIoU) and depth (RMSE and the rest) on
the published DINOv2 / DINOv3 linear protocols.

- :mod:`clsvit.dense.protocols` — the named protocols and the resolved settings of a run (with sources),
- :mod:`clsvit.dense.datasets` — datasets at their own resolution, in any source or their own layout,
- :mod:`clsvit.dense.transforms` — the protocols' image operations (mmseg, DINOv3, depth toolbox) and the
  training / evaluation views built from them,
- :mod:`clsvit.dense.heads` — linear heads, losses, schedules,
- :mod:`clsvit.dense.engine` — training the head, slide / whole-image inference, metrics, and what
  segmentation and depth do differently (``TASKS``).
"""

from clsvit.dense.datasets import DenseDataset, load_dense_splits
from clsvit.dense.engine import run_probe
from clsvit.dense.protocols import Settings, resolve

__all__ = ["DenseDataset", "Settings", "load_dense_splits", "resolve", "run_probe"]
