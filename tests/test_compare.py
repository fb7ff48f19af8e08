"""eval.py --compare over seeds: groups, mean/std/n, bootstrap intervals and paired differences,
checked against values computed by hand."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from clsvit.compare import bootstrap_interval, compare, describe
from clsvit.config import load_config, save_config

DEFAULT = Path(__file__).resolve().parent.parent / "recipes" / "default.yaml"


def test_exact_bootstrap_interval_of_the_mean():
    # two values: the 4 resample means are a, (a+b)/2 twice, b -> the 2.5 % / 97.5 % quantiles are a and b
    assert bootstrap_interval([3.0, 5.0]) == (3.0, 5.0)
    # three values: each extreme mean has probability 1/27 = 3.7 % >= 2.5 % -> [min, max]
    assert bootstrap_interval([1.0, 2.0, 6.0]) == (1.0, 6.0)
    # [0, 0, 0, 1]: the resample mean is k/4 with k ~ Binomial(4, 1/4); P(k=0) = 81/256 >= 2.5 %,
    # P(k<=2) = 243/256 = 94.9 % < 97.5 % <= P(k<=3) = 255/256 -> [0, 3/4]; shifted and scaled alike
    assert bootstrap_interval([0.0, 0.0, 0.0, 1.0]) == (0.0, 0.75)
    assert bootstrap_interval([10.0, 10.0, 10.0, 14.0]) == (10.0, 13.0)
    assert bootstrap_interval([7.0]) is None and bootstrap_interval([]) is None


def test_monte_carlo_bootstrap_beyond_six_values():
    # [0]*6 + [1]: the resample mean is k/7, k ~ Binomial(7, 1/7): P(k<=2) = 93.5 %, P(k<=3) = 99.0 %
    low, high = bootstrap_interval([0.0] * 6 + [1.0])
    assert (low, high) == (0.0, pytest.approx(3 / 7))
    assert bootstrap_interval([0.0] * 6 + [1.0]) == (low, high)  # a fixed seed: the same table every call


def test_describe_gives_mean_sample_std_and_n():
    stats = describe([1.0, 2.0, 3.0, 6.0])
    assert stats["mean"] == 3.0 and stats["n"] == 4
    assert stats["std"] == pytest.approx(math.sqrt((4 + 1 + 0 + 9) / 3))  # n - 1 in the denominator
    assert describe([2.5]) == {"mean": 2.5, "std": None, "n": 1, "lo": None, "hi": None}


def fake_run(root: Path, name: str, seed: int, overrides=(), top1=None, miou=None, rmse=None) -> Path:
    """A run directory as the comparison reads it (no weights: the parameter count is in provenance.json)."""
    run = root / f"{name}_seed{seed}"
    cfg = load_config(DEFAULT, [f"run.name={run.name}", f"run.seed={seed}", *overrides])
    save_config(cfg, run / "config.yaml")
    (run / "provenance.json").write_text(json.dumps({"params": 1000 if not overrides else 1100}))
    results = {"cls.top1": top1, "seg.miou": miou, "depth.rmse": rmse}
    (run / "eval.json").write_text(json.dumps({k: v for k, v in results.items() if v is not None}))
    return run


def test_groups_of_seeds_with_intervals_and_paired_differences(tmp_path, capsys):
    runs = tmp_path / "grid"
    base = {"top1": [70.0, 72.0, 74.0], "miou": [40.0, 41.0, 45.0], "rmse": [0.50, 0.52, 0.48]}
    spec = {"top1": [71.0, 74.0, 77.0], "miou": [39.0, 42.0, 46.0], "rmse": [0.45, 0.47, 0.46]}
    qkv = ["model.specialize.qkv=0.5"]
    for seed in range(3):
        bookkeeping = ["log.every=7", "data.num_workers=3"] if seed == 1 else []  # still the same group
        fake_run(runs, "base", seed, bookkeeping, **{k: v[seed] for k, v in base.items()})
        fake_run(runs, "spec", seed, qkv, **{k: v[seed] for k, v in spec.items()})
    for seed, top1 in enumerate([70.0, 70.0, 70.0, 74.0]):  # seed 3 has no baseline partner
        fake_run(runs, "norm", seed, ["model.specialize.norm=1.0"], top1=top1)

    result = compare([str(runs / "*")])
    groups = {g["recipe"]: g for g in result["rows"]}
    assert list(groups) == ["base", "norm", "spec"] and [g["n"] for g in groups.values()] == [3, 4, 3]
    assert groups["base"]["baseline"] and groups["spec"]["params_pct"] == pytest.approx(10.0)

    s = groups["spec"]  # 71, 74, 77: mean 74, std 3, interval [min, max] for three values
    assert (s["top1"], s["top1_std"], s["top1_n"], s["top1_lo"], s["top1_hi"]) == (74.0, 3.0, 3, 71.0, 77.0)
    # paired by seed: top-1 differences 1, 2, 3 -> mean 2 in [1, 3], resolved
    assert (s["d_top1"], s["d_top1_n"], s["d_top1_lo"], s["d_top1_hi"], s["d_top1_resolved"]) == (2.0, 3, 1.0, 3.0, True)
    # mIoU differences -1, 1, 1 -> mean 1/3 in [-1, 1]: contains 0, not resolved
    assert s["d_miou"] == pytest.approx(1 / 3) and (s["d_miou_lo"], s["d_miou_hi"]) == (-1.0, 1.0)
    assert s["d_miou_resolved"] is False
    # RMSE differences -0.05, -0.05, -0.02 -> [-0.05, -0.02], resolved
    assert (s["d_rmse_lo"], s["d_rmse_hi"]) == pytest.approx((-0.05, -0.02)) and s["d_rmse_resolved"] is True

    n = groups["norm"]  # 70, 70, 70, 74: mean 71, std 2, interval [70, 73] (Binomial(4, 1/4) as above)
    assert (n["top1"], n["top1_std"], n["top1_lo"], n["top1_hi"]) == (71.0, 2.0, 70.0, 73.0)
    # seeds 0-2 pair up: 70-70, 70-72, 70-74 -> 0, -2, -4: mean -2 in [-4, 0], not resolved
    assert (n["d_top1"], n["d_top1_n"], n["d_top1_lo"], n["d_top1_hi"]) == (-2.0, 3, -4.0, 0.0)
    assert n["d_top1_resolved"] is False and n["miou"] is None and n["d_miou"] is None

    table = (runs / "compare.md").read_text()
    assert table.strip() == capsys.readouterr().out.split("\n\nwritten")[0].strip()
    line = next(row for row in table.splitlines() if row.startswith("| spec "))
    assert "| 3 |" in line and "| 74.00 ± 3.00 [71.00, 77.00] | +2.00 [+1.00, +3.00] |" in line
    assert "| +0.33 [-1.00, +1.00] n.r. |" in line and "| -0.040 [-0.050, -0.020] |" in line
    assert "| **base** (baseline) | none | 3 |" in table and "n.r.: not resolved" in table

    with open(runs / "compare.csv") as f:
        rows = {r["recipe"]: r for r in csv.DictReader(f)}
    assert rows["spec"]["seeds"] == "0 1 2" and float(rows["spec"]["d_top1_lo"]) == 1.0
    assert rows["spec"]["d_miou_resolved"] == "False" and rows["norm"]["top1_n"] == "4"
    assert (runs / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_single_runs_and_an_explicit_baseline(tmp_path):
    runs = tmp_path / "runs"
    a = fake_run(runs, "a", 0, top1=80.0)
    fake_run(runs, "b", 0, ["model.specialize.qkv=0.5"], top1=81.5)
    result = compare([str(runs / "*")], baseline=str(runs / "b_seed0"), out=str(tmp_path / "out"))
    groups = {g["recipe"]: g for g in result["rows"]}
    assert groups["b"]["baseline"] and groups["a"]["d_top1"] == pytest.approx(-1.5)
    assert groups["a"]["d_top1_lo"] is None and groups["a"]["d_top1_resolved"] is None  # one pair: no interval
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| 80.00 | -1.50 |" in table and "n.r." not in table and "bootstrap" not in table
    assert a.is_dir()


def test_the_token_control_is_its_own_group_named_in_the_specialization_column(tmp_path):
    """The paper default and the same copies on a patch differ in model.specialize.tokens alone: two
    groups, told apart in the specialization column, each compared with the baseline or with the
    specialized arm as --baseline."""
    runs = tmp_path / "grid"
    paper = ["model.specialize.norm=1.0", "model.specialize.layerscale=1.0", "model.specialize.qkv=0.25"]
    for seed in range(2):
        fake_run(runs, "baseline", seed, top1=70.0 + seed)
        fake_run(runs, "specialized", seed, paper, top1=74.0 + seed)
        fake_run(runs, "patch_control", seed, [*paper, "model.specialize.tokens=[7,7]"], top1=71.0 + 2 * seed)
    groups = {g["recipe"]: g for g in compare([str(runs / "*")])["rows"]}
    assert groups["specialized"]["specialization"] == "norm=1 layerscale=1 qkv=0.25"
    assert groups["patch_control"]["specialization"] == "norm=1 layerscale=1 qkv=0.25 tokens=[7, 7]"
    assert groups["baseline"]["baseline"] and groups["patch_control"]["d_top1"] == pytest.approx(1.5)
    against = {g["recipe"]: g for g in compare([str(runs / "*")], baseline=str(runs / "specialized_seed0"),
                                               out=str(tmp_path / "against_specialized"))["rows"]}
    assert against["patch_control"]["d_top1"] == pytest.approx(-2.5)  # (71 - 74 + 73 - 75) / 2
    assert "| patch_control | norm=1 layerscale=1 qkv=0.25 tokens=[7, 7] |" in (
        tmp_path / "against_specialized" / "compare.md").read_text()
