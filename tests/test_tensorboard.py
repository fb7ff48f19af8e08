"""What TensorBoard shows of an ablation: runs written by train.py (one resumed) and eval.py, served by a
real `tensorboard --logdir` on 127.0.0.1 and read back through its HTTP data API, as the browser reads
it; and the HParams column layout (clsvit.tracking) on its own."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from clsvit.config import ConfigError, load_config
from clsvit.tracking import METRICS, RunLog, hparams_columns
from tensorboard_server import served_tensorboard
from trainer_utils import REPO, read_jsonl, run_train, subprocess_env, write_tiny_recipe

SPECIALIZED = "tiny_norm_ls_qkv_third"  # the tiny recipe is the specialized shapes recipe, depth 2
BASELINE = "tiny_baseline"
UNSPECIALIZED = [f"model.specialize.{c}=0.0" for c in ("norm", "layerscale", "qkv")]
FRACTIONS = [f"0{i} model.specialize.{c}" for i, c in enumerate(("norm", "layerscale", "qkv", "proj", "mlp"), 1)]
IDENTITY = ["13 model.arch", "14 run.name", "15 run.seed", "16 train.global_batch", "17 schedule.epochs"]
QUICK_PROBES = ["--tasks", "cls,seg,depth,analysis", "eval.seg.iterations=4", "eval.depth.iterations=4",
                "eval.seg.max_train_images=32", "eval.depth.max_train_images=32", "eval.seg.max_val_images=8",
                "eval.depth.max_val_images=8", "eval.depth.n_bins=16", "eval.analysis.num_images=8",
                "eval.analysis.pca_images=2"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """Two runs as a user makes them: the specialized one trained to step 4, then resumed to step 8
    (validation at 4 and 8) and evaluated by eval.py; the baseline trained to step 8, not probed."""
    root = tmp_path_factory.mktemp("runs")
    env = subprocess_env(tmp_path_factory.mktemp("hf_cache"))
    recipe = write_tiny_recipe(root, root)
    common = ["eval.every=4", "log.every=2"]
    run_train(recipe, f"run.name={SPECIALIZED}", "train.max_steps=4", *common, env=env)
    run_train(recipe, f"run.name={SPECIALIZED}", "train.max_steps=8", *common, env=env)
    run_train(recipe, f"run.name={BASELINE}", "train.max_steps=8", *common, *UNSPECIALIZED, env=env)
    result = subprocess.run([sys.executable, str(REPO / "eval.py"), "--run", str(root / SPECIALIZED), *QUICK_PROBES],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with served_tensorboard(root) as tensorboard:
        # loaded when the probe results of the specialized run and the baseline's last point are served
        tensorboard.wait_for(lambda tb: tb.scalars(SPECIALIZED, "analysis/cos_cls_patch/norm1")
                             and tb.scalars(BASELINE, "train/median_images_per_s")
                             and len(tb.session_groups()) == 2)
        yield root, tensorboard


@pytest.mark.slow
def test_runs_are_the_run_directories(ablation):
    _, tensorboard = ablation
    assert sorted(tensorboard.get("/data/runs")) == [BASELINE, SPECIALIZED]


@pytest.mark.slow
def test_every_validation_point_at_its_real_step_across_a_resume(ablation):
    """val/* at steps 4 (first launch) and 8 (final, resumed launch), training scalars at every log
    step of both launches: nothing at step 0, nothing purged."""
    root, tensorboard = ablation
    for run in (SPECIALIZED, BASELINE):
        logged = read_jsonl(root / run / "metrics.jsonl")
        tags = tensorboard.get("/data/plugin/scalars/tags")[run]
        val_tags = sorted(tag for tag in tags if tag.startswith("val/"))
        assert val_tags == ["val/images", "val/top1", "val/top5", "val/undecodable"]
        for tag in val_tags + ["train/loss", "train/lr"]:
            expected = [(line["step"], pytest.approx(line[tag], rel=1e-6)) for line in logged if tag in line]
            assert tensorboard.scalars(run, tag) == expected, tag
        assert [step for step, _ in tensorboard.scalars(run, "val/top1")] == [4, 8]
        assert [step for step, _ in tensorboard.scalars(run, "train/loss")] == [2, 4, 6, 8]


@pytest.mark.slow
def test_hparams_columns_specialization_and_identity_first(ablation):
    """The columns TensorBoard serves, in its order, are those of clsvit.tracking.hparams_columns:
    the five specialization fractions first (the ones the tab ticks), then the tokens, final_norm, the
    block lists as text, the run identity, then the rest of the recipe."""
    root, tensorboard = ablation
    served = tensorboard.experiment()["hparamInfos"]
    names = [info["name"] for info in served]
    assert names[:5] == FRACTIONS and all(info.get("differs") for info in served[:5])
    assert not any(info.get("differs") for info in served[5:])
    assert names[5:17] == ["06 model.specialize.tokens", "07 model.specialize.final_norm",
                           *[f"{i:02d} model.specialize.{c} blocks" for i, c in
                             enumerate(("norm", "layerscale", "qkv", "proj", "mlp"), 8)], *IDENTITY]
    assert [info["type"] for info in served[:5]] == ["DATA_TYPE_FLOAT64"] * 5
    assert served[names.index("10 model.specialize.qkv blocks")]["type"] == "DATA_TYPE_STRING"
    assert served[names.index("06 model.specialize.tokens")]["type"] == "DATA_TYPE_STRING"
    cfg = load_config(root / SPECIALIZED / "config.yaml")
    assert names == [column.name for column in hparams_columns(cfg, depth=2)]
    assert "optim.lr" in names and "model.specialize.qkv" not in names  # the raw mixed-type value is not a column


@pytest.mark.slow
def test_hparams_values_and_metrics_of_probed_and_unprobed_runs(ablation):
    root, tensorboard = ablation
    metrics = [info["name"]["tag"] for info in tensorboard.experiment()["metricInfos"]]
    assert metrics[:7] == ["val/top1", "val/top5", "seg/miou", "depth/rmse", "depth/delta1",
                           "train/median_images_per_s", "model/param_overhead_pct"]
    assert not {"val/images", "val/undecodable", "model/params", "data/undecodable", "cls/images"} & set(metrics)

    groups = tensorboard.session_groups()
    assert sorted(groups) == [BASELINE, SPECIALIZED]
    spec, base = groups[SPECIALIZED], groups[BASELINE]
    assert [spec["hparams"][name] for name in FRACTIONS] == [1.0, 1.0, pytest.approx(1 / 3), 0.0, 0.0]
    assert [base["hparams"][name] for name in FRACTIONS] == [0.0] * 5
    assert spec["hparams"]["10 model.specialize.qkv blocks"] == "0"  # round(2/3) = 1 of the 2 blocks
    assert spec["hparams"]["08 model.specialize.norm blocks"] == "0-1"
    assert base["hparams"]["08 model.specialize.norm blocks"] == "none"
    assert spec["hparams"]["06 model.specialize.tokens"] == "global"
    assert spec["hparams"]["14 run.name"] == SPECIALIZED and spec["hparams"]["16 train.global_batch"] == 32
    assert spec["sessions"][0]["status"] == "STATUS_SUCCESS"
    # the ticked columns tell the runs apart
    assert [spec["hparams"][n] for n in FRACTIONS] != [base["hparams"][n] for n in FRACTIONS]

    def values(group):
        return {m["name"]["tag"]: (m["trainingStep"], m["value"]) for m in group["metricValues"]}

    evaluated = json.loads((root / SPECIALIZED / "eval.json").read_text())
    final = [line for line in read_jsonl(root / SPECIALIZED / "metrics.jsonl") if "val/top1" in line][-1]
    spec_values = values(spec)
    assert spec_values["val/top1"] == (8, pytest.approx(final["val/top1"]))
    assert spec_values["seg/miou"] == (8, pytest.approx(evaluated["seg.miou"]))  # probes at the run's last step
    assert spec_values["depth/rmse"] == (8, pytest.approx(evaluated["depth.rmse"]))
    assert spec_values["depth/delta1"] == (8, pytest.approx(evaluated["depth.delta1"]))
    provenance = json.loads((root / SPECIALIZED / "provenance.json").read_text())
    assert spec_values["model/param_overhead_pct"][1] == pytest.approx(provenance["param_overhead_pct"], rel=1e-5)
    assert spec_values["train/median_images_per_s"][0] == 8
    # not probed: no probe values (empty cells), the training metrics are there
    base_values = values(base)
    assert {"val/top1", "val/top5", "train/median_images_per_s", "model/param_overhead_pct"} <= set(base_values)
    assert not {"seg/miou", "depth/rmse", "depth/delta1"} & set(base_values)
    assert base_values["model/param_overhead_pct"][1] == 0.0


@pytest.mark.slow
def test_token_analysis_per_block_and_figures_at_the_last_step(ablation):
    root, tensorboard = ablation
    evaluated = json.loads((root / SPECIALIZED / "eval.json").read_text())
    tags = tensorboard.get("/data/plugin/scalars/tags")[SPECIALIZED]
    analysis = sorted(tag for tag in tags if tag.startswith("analysis/"))
    assert len(analysis) == 16  # 4 statistics x 4 sites
    for tag in analysis:
        expected = evaluated[tag.replace("/", ".")]
        assert tensorboard.scalars(SPECIALIZED, tag) == [(block, pytest.approx(v)) for block, v in enumerate(expected)]
    images = tensorboard.get("/data/plugin/images/tags")[SPECIALIZED]
    assert {"analysis/pca", "analysis/token_statistics"} <= set(images)
    steps = tensorboard.get("/data/plugin/images/images", run=SPECIALIZED, tag="analysis/pca")
    assert [image["step"] for image in steps] == [8]


@pytest.mark.slow
def test_custom_scalars_page_overlays_every_run(ablation):
    """One chart each for val/top1, train/loss, seg/miou and depth/rmse, drawing every run that has
    the tag (the baseline has no probe results)."""
    _, tensorboard = ablation
    layout = tensorboard.get("/data/plugin/custom_scalars/layout")
    charts = [chart["multiline"]["tag"] for category in layout["category"] for chart in category["chart"]]
    has = {SPECIALIZED: {"val/top1", "train/loss", "seg/miou", "depth/rmse"}, BASELINE: {"val/top1", "train/loss"}}
    for tag in ("val/top1", "train/loss", "seg/miou", "depth/rmse"):
        assert [f"^{tag}$"] in charts
        for run in (SPECIALIZED, BASELINE):
            data = tensorboard.get("/data/plugin/custom_scalars/scalars", run=run, tag=f"^{tag}$")
            assert data["regex_valid"] and (tag in data["tag_to_events"]) == (tag in has[run]), (run, tag)


# ----------------------------------------------------------------------------- the layout on its own


def tiny_config(*overrides):
    return load_config(REPO / "recipes" / "default.yaml", ["model.timm_kwargs={depth: 12}", *overrides])


def test_block_lists_are_fractions_and_text():
    columns = {c.name: c for c in hparams_columns(tiny_config("model.specialize.qkv=[0,1,2,3]",
                                                              "model.specialize.mlp=[0,2,3,4,11]"), depth=12)}
    assert columns["03 model.specialize.qkv"].value == pytest.approx(4 / 12)
    assert columns["10 model.specialize.qkv blocks"].value == "0-3"
    assert columns["12 model.specialize.mlp blocks"].value == "0,2-4,11"
    assert columns["05 model.specialize.mlp"].value == pytest.approx(5 / 12)
    assert columns["03 model.specialize.qkv"].display == "specialized qkv"


def test_the_tokens_that_get_the_copies_are_a_column_as_a_recipe_writes_them():
    """One text column for the token choice, beside the fractions (ticked first when swept)."""
    for tokens, shown in (("global", "global"), ("cls", "cls"), ("[7,7]", "[7, 7]")):
        cfg = tiny_config("model.specialize.norm=1.0", f"model.specialize.tokens={tokens}")
        columns = {c.name: c for c in hparams_columns(cfg, depth=12)}
        assert columns["06 model.specialize.tokens"].value == shown
        assert columns["06 model.specialize.tokens"].display == "specialized tokens"
        assert "model.specialize.tokens" not in columns  # not a second time among the rest of the recipe
    swept = hparams_columns(tiny_config("log.hparams_first=model.specialize.tokens,run.seed"), depth=12)
    assert [(c.name, c.first) for c in swept[:3]] == [("06 model.specialize.tokens", True), ("15 run.seed", True),
                                                      ("01 model.specialize.norm", False)]


def test_hparams_first_puts_swept_keys_first():
    """A sweep over optim.lr and seeds: those two columns first, then the specialization fractions."""
    order = [c.name for c in hparams_columns(tiny_config("log.hparams_first=optim.lr,run.seed"), depth=12)]
    assert order[:5] == ["15 run.seed", "optim.lr", *FRACTIONS[:3]]
    columns = [(c.name, c.first) for c in hparams_columns(tiny_config("log.hparams_first=model.specialize.qkv"),
                                                          depth=12)]
    # a specialization key is shown first by its fraction; its block list follows among the comparison columns
    assert columns[0] == ("03 model.specialize.qkv", True) and not any(first for _, first in columns[1:])
    assert columns[9] == ("10 model.specialize.qkv blocks", False)
    with pytest.raises(ConfigError, match="log.hparams_first: 'optim.lrr' is not a recipe key"):
        hparams_columns(tiny_config("log.hparams_first=optim.lrr"), depth=12)


def test_one_type_per_column_whatever_the_run():
    """TensorBoard's filters compare a column's values, so a key that may be null keeps its type."""
    unset = {c.name: c.value for c in hparams_columns(tiny_config(), depth=12)}
    set_ = {c.name: c.value for c in hparams_columns(tiny_config("train.max_steps=40", "model.reg_tokens=4",
                                                                 "train.compile=true"), depth=12)}
    assert math.isnan(unset["train.max_steps"]) and set_["train.max_steps"] == 40.0
    assert math.isnan(unset["model.reg_tokens"]) and set_["model.reg_tokens"] == 4.0
    assert (unset["train.compile"], set_["train.compile"]) == ("null", "true")
    assert unset["model.pretrained"] == "null" and unset["aug.crop_scale"] == "[0.08, 1.0]"
    assert unset["model.timm_kwargs"] == "{depth: 12}"


def test_a_step_lower_than_one_written_is_refused(tmp_path):
    log = RunLog(tmp_path, enabled=True, tensorboard=False, resume_step=None)
    log.log(10, {"val/top1": 50.0})
    log.log(10, {"val/top5": 80.0, "train/loss": 1.0})
    with pytest.raises(ValueError, match="val/top1 at step 0 after step 10"):
        log.log(0, {"val/top1": 50.0})
    log.close()


def test_a_fresh_start_moves_the_earlier_attempt_aside(tmp_path):
    """TensorBoard keeps the first HParams summary of a run, so a launch from step 0 must not share
    the run directory's events with an earlier attempt; nothing is deleted."""
    (tmp_path / "events.out.tfevents.1.host.1.0").write_bytes(b"earlier")
    (tmp_path / "metrics.jsonl").write_text('{"step": 2}\n')
    RunLog(tmp_path, enabled=True, tensorboard=False, resume_step=None).close()
    aside = list(tmp_path.glob("logs.replaced-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == [
        "events.out.tfevents.1.host.1.0", "metrics.jsonl"]
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_metric_columns_are_measurements_not_counters():
    tags = [metric.tag for metric in METRICS]
    assert len(tags) == len(set(tags))
    assert not [tag for tag in tags if tag.split("/")[-1] in ("images", "undecodable", "params", "pixels")]
