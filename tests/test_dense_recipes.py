"""The evaluation recipes (recipes/eval/*.yaml): headers, and each one end to end through eval.py on a
tiny local copy of its dataset in the dataset's own layout, cut from a real photo at non-square sizes."""

import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clsvit.config import load_config, save_config
from clsvit.errors import InputError
from clsvit.model import build_model

ROOT = Path(__file__).resolve().parents[1]


EVAL_RECIPES = sorted((ROOT / "recipes" / "eval").glob("*.yaml"))
PHOTO = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB"))
TINY_SEG = ["eval.seg.iterations=2", "eval.seg.batch_size=2", "eval.seg.crop_size=[48, 64]", "eval.seg.scale=[96, 48]",
            "eval.seg.slide_stride=[32, 40]"]
TINY_DEPTH = ["eval.depth.iterations=2", "eval.depth.batch_size=2", "eval.depth.crop_size=[64, 96]", "eval.depth.n_bins=8"]


def header_fields(recipe: Path) -> dict:
    return {m.group(1): m.group(2) for line in recipe.read_text().splitlines() if line.startswith("#")
            for m in [re.match(r"# (\w+): (.*)$", line)] if m}


def test_eval_recipes_have_headers_and_load_over_a_run_config(tmp_path):
    assert {p.stem for p in EVAL_RECIPES} == {"ade20k_linear", "ade20k_ms", "voc_linear", "cityscapes_linear",
                                             "nyu_linear", "kitti_linear"}
    for recipe in EVAL_RECIPES:
        fields = header_fields(recipe)
        assert {"reproduces", "source", "launch", "expected", "data"} <= set(fields), recipe.name
        assert f"--recipe recipes/eval/{recipe.name}" in recipe.read_text()
        cfg = load_config(ROOT / "recipes" / "default.yaml", overlays=[recipe])
        task = "seg" if "seg" in recipe.read_text().split("\neval:\n", 1)[1].split("\n")[0] else "depth"
        assert cfg["eval"][task]["source"] == "folder" and cfg["eval"][task]["iterations"] is None


def test_eval_recipes_name_the_published_table_and_row_they_compare_to():
    """Each header quotes its published numbers with their table and row, and the eval.json key to compare."""
    for recipe in EVAL_RECIPES:
        expected = header_fields(recipe)["expected"]
        table = "Table 11" if recipe.stem in ("nyu_linear", "kitti_linear") else "Table 10"
        assert re.search(rf"DINOv2 paper \(arXiv 2304\.07193v2\) {table}, [\w ]+ \"[^\"]+\" column", expected), recipe.name
        assert re.search(r"ViT-S/14 \d+\.\d+, ViT-B/14 \d+\.\d+, ViT-L/14 \d+\.\d+, ViT-g/14 \d+\.\d+", expected), recipe.name
        assert re.search(r"eval\.json (seg\.miou|depth\.rmse)", expected), recipe.name
    dinov3 = [header_fields(ROOT / "recipes" / "eval" / f"{name}.yaml")["expected"] for name in ("ade20k_linear", "nyu_linear")]
    assert all("DINOv3 MODEL_CARD.md" in text and "ViT-7B/16" in text for text in dinov3)
    assert "seg.miou_best" in dinov3[0]  # DINOv3's segmentation reports the best of its evaluations


def test_dinov3_linear_is_called_clsvits_extension_where_dinov3_has_no_such_evaluation():
    extended = {recipe.stem for recipe in EVAL_RECIPES if "clsvit's extension" in header_fields(recipe)["reproduces"]
                + header_fields(recipe)["source"]}
    assert extended == {"voc_linear", "cityscapes_linear", "kitti_linear"}


def tile(y, x, h, w):
    return PHOTO[y : y + h, x : x + w].copy()


def classes_of(image, n, offset=0):
    gray = image.mean(2)
    return (np.digitize(gray, np.quantile(gray, np.linspace(0, 1, n + 1)[1:-1])) + offset).astype(np.uint8)


def make_ade20k(root):
    masks = {}
    for split, boxes in (("training", [(0, 0, 90, 70), (200, 100, 70, 100)]), ("validation", [(300, 50, 80, 110), (100, 300, 120, 66)])):
        for i, box in enumerate(boxes):
            image, name = tile(*box), f"ADE_{split[:5]}_{i:08d}"
            mask = classes_of(image, 3, offset=1)  # classes 1..3 of 150
            mask[:4] = 0  # unlabelled
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(mask).save(root / "annotations" / split / f"{name}.png")
            masks[(split, i)] = mask
    return sum(int((m != 0).sum()) for (split, _), m in masks.items() if split == "validation")


def make_voc(root, bad_label=False):
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    palette = [v for k in range(256) for v in ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256)]
    labelled = 0
    for split, boxes in (("train", [(10, 10, 75, 100), (300, 200, 100, 75)]), ("val", [(150, 150, 64, 90), (400, 300, 90, 64)])):
        ids = []
        for i, box in enumerate(boxes):
            image, sample_id = tile(*box), f"2007_{split}{i:02d}"
            mask = classes_of(image, 3, offset=0) * 7  # background 0, classes 7 and 14 of 21
            mask[:, :2] = 255  # object borders
            if bad_label and split == "val" and i == 1:
                mask[5, 5] = 30
            png = Image.fromarray(mask, mode="P")
            png.putpalette(palette)
            png.save(root / "SegmentationClass" / f"{sample_id}.png")
            Image.fromarray(image).save(root / "JPEGImages" / f"{sample_id}.jpg")
            ids.append(sample_id)
            labelled += int((mask != 255).sum()) if split == "val" else 0
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return labelled


def make_cityscapes(root):
    labelled = 0
    for split, boxes in (("train", [(0, 0, 64, 128), (100, 50, 64, 128)]), ("val", [(300, 0, 64, 128), (400, 100, 64, 128)])):
        for i, box in enumerate(boxes):
            image, city, stem = tile(*box), "aachen", f"aachen_{i:06d}_000019"
            mask = classes_of(image, 4, offset=10)  # train ids 10..13 of 19
            mask[-3:] = 255
            for folder, name, array in (("leftImg8bit", f"{stem}_leftImg8bit.png", image),
                                        ("gtFine", f"{stem}_gtFine_labelTrainIds.png", mask)):
                (root / folder / split / city).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / folder / split / city / name)
            labelled += int((mask != 255).sum()) if split == "val" else 0
    return labelled


def depth_from(image, scale, far):
    """A depth map from the photo's luminance (near = bright), in metres, with holes."""
    depth = 1.0 + (1 - image.mean(2) / 255.0) * (far - 1.0)
    depth[::7, ::5] = 0.0
    return np.round(depth * scale).astype(np.uint16)


def make_nyu(root):
    image = np.asarray(Image.fromarray(PHOTO).resize((640, 480), Image.BILINEAR))  # NYUv2: 480 x 640
    lines, valid = {"train": [], "test": []}, 0
    for split, flips in (("train", (False, True)), ("test", (False,))):
        for i, flip in enumerate(flips):
            scene = root / f"bedroom_{split}"
            scene.mkdir(parents=True, exist_ok=True)
            picture = image[:, ::-1].copy() if flip else image
            depth = depth_from(picture, 1000.0, 9.0)  # uint16 millimetres
            Image.fromarray(picture).save(scene / f"rgb_{i:05d}.jpg")
            Image.fromarray(depth).save(scene / f"sync_depth_{i:05d}.png")
            lines[split].append(f"/bedroom_{split}/rgb_{i:05d}.jpg /bedroom_{split}/sync_depth_{i:05d}.png 518.8579")
            if split == "test":
                metres, region = depth / 1000.0, np.zeros(depth.shape, bool)
                region[45:471, 41:601] = True
                valid += int(((metres > 1e-3) & (metres < 10.0) & region).sum())
    for split, entries in lines.items():
        (root / f"nyu_{split}.txt").write_text("\n".join(entries) + "\n")
    return valid


def make_kitti(root):
    image = np.asarray(Image.fromarray(PHOTO).resize((1242, 375), Image.BILINEAR))  # KITTI: 375 x 1242
    lines, valid = {"train": [], "test": []}, 0
    for split, count in (("train", 2), ("test", 1)):
        for i in range(count):
            drive = f"2011_09_26/2011_09_26_drive_000{i}_sync"
            (root / "input" / drive).mkdir(parents=True, exist_ok=True)
            (root / "gt_depth" / drive).mkdir(parents=True, exist_ok=True)
            depth = np.zeros((375, 1242), np.uint16)
            sparse = depth_from(image, 256.0, 70.0)
            depth[::4, ::3] = sparse[::4, ::3]  # sparse lidar, uint16 x 256
            Image.fromarray(image).save(root / "input" / drive / f"{i:010d}.png")
            Image.fromarray(depth).save(root / "gt_depth" / drive / f"{i:010d}.png")
            lines[split].append(f"{drive}/{i:010d}.png {drive}/{i:010d}.png 721.5377")
            if split == "test":
                metres = (depth / 256.0)[23:375, 13:1229]
                h, w = metres.shape
                region = np.zeros(metres.shape, bool)
                region[int(0.40810811 * h):int(0.99189189 * h), int(0.03594771 * w):int(0.96405229 * w)] = True
                valid += int(((metres > 1e-3) & (metres < 80.0) & region).sum())
        (root / f"kitti_eigen_{split}.txt").write_text("\n".join(lines[split]) + "\n")
    return valid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a tiny untrained ViT (patch 16)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = load_config(ROOT / "recipes" / "default.yaml", [
        "model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.num_classes=4", f"run.name={run_dir.name}",
        "model.timm_kwargs={depth: 2, embed_dim: 32, num_heads: 2}", "data.source=shapes"])
    torch.manual_seed(0)
    model = build_model(cfg["model"])
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("name,make,task,tiny", [
    ("ade20k_linear", make_ade20k, "seg", TINY_SEG), ("voc_linear", make_voc, "seg", TINY_SEG),
    ("cityscapes_linear", make_cityscapes, "seg", TINY_SEG), ("nyu_linear", make_nyu, "depth", TINY_DEPTH),
    ("kitti_linear", make_kitti, "depth", TINY_DEPTH),
    ("ade20k_ms", make_ade20k, "seg", TINY_SEG + ["eval.seg.layers=2"])])  # the tiny run has 2 blocks, not 4
def test_eval_recipe_end_to_end(eval_script, run, tmp_path, name, make, task, tiny):
    root = tmp_path / name
    root.mkdir()
    expected_pixels = make(root)
    recipe = ROOT / "recipes" / "eval" / f"{name}.yaml"
    results = eval_script.main(["--run", str(run), "--tasks", task, "--recipe", str(recipe),
                                f"eval.{task}.path={root}", *tiny])
    saved = json.loads((run / "eval.json").read_text())
    assert saved[f"{task}.pixels"] == results[f"{task}.pixels"] == expected_pixels
    assert saved[f"{task}.protocol"] == "dinov2_linear" and saved[f"{task}.settings"]["lr"] > 0
    assert saved[f"{task}.settings"]["iterations"] == 2
    metric = "seg.miou" if task == "seg" else "depth.rmse"
    assert np.isfinite(saved[metric])


@pytest.mark.slow
def test_dinov3_segmentation_records_final_and_best_in_eval_json(eval_script, run, tmp_path):
    make_ade20k(tmp_path / "ade20k")
    results = eval_script.main(["--run", str(run), "--tasks", "seg", "--recipe", str(ROOT / "recipes/eval/ade20k_linear.yaml"),
                                f"eval.seg.path={tmp_path / 'ade20k'}", *TINY_SEG, "eval.seg.protocol=dinov3_linear"])
    saved = json.loads((run / "eval.json").read_text())
    assert saved["seg.settings"]["eval_interval"] == 5000  # more than the 2 steps here: the final head is the one evaluated
    assert saved["seg.evaluated_steps"] == [2] and saved["seg.evaluated_miou"] == [saved["seg.miou"]]
    assert saved["seg.miou_best"] == saved["seg.miou"] == results["seg.miou_best"] and saved["seg.best_step"] == 2


def test_a_label_outside_the_classes_names_its_file(eval_script, run, tmp_path):
    make_voc(tmp_path / "voc", bad_label=True)
    with pytest.raises(InputError, match=r"mask .*SegmentationClass/2007_val01.png \(row 1\) has label 30 outside \[0, 21\)"):
        eval_script.main(["--run", str(run), "--tasks", "seg", "--recipe", str(ROOT / "recipes/eval/voc_linear.yaml"),
                          f"eval.seg.path={tmp_path / 'voc'}", *TINY_SEG, "eval.seg.max_val_images=0"])
