"""The device path (``data.augment_on: device``, clsvit.data.crops + clsvit.data.augment) against timm's PIL
transform: the same draws on the same seeds, each batched op against its PIL op, DCT-scaled crop
decoding against full decoding on a real photograph, batched == per-sample, odd and broken files
exactly as on the CPU path, and a bit-identical resume."""

from __future__ import annotations

import io
import math
import random
import re

import matplotlib.cbook as cbook
import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from safetensors.torch import load_file
from timm.data import create_transform
from timm.data.auto_augment import AugmentOp, AutoAugment
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from clsvit.data import augment as A
from clsvit import data as D
from clsvit.data.images import ImageClassDataset, seeded_rngs
from clsvit.errors import InputError
from clsvit.training import MicroBatchStream, Progress
from clsvit.data import crops
from clsvit.data.crops import CropBatch, CropDataset, dct_scale, decode_crop, open_image
from host_transfers import BlockingTransfers
from test_data import broken_images, class_dataset, png_bytes, random_image
from trainer_utils import REPO, read_jsonl, run_train, subprocess_env, write_tiny_recipe

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def recipe(img_size=224, augment_on="device", **aug):
    cfg = yaml.safe_load((REPO / "recipes" / "default.yaml").read_text())
    cfg["model"]["img_size"] = img_size
    cfg["data"]["augment_on"] = augment_on
    cfg["aug"].update(aug)
    return cfg


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A real photograph (512 x 600 JPEG) that matplotlib ships."""
    return open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), "rb").read()


def jpeg(image: Image.Image, quality=90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def levels(x: torch.Tensor) -> torch.Tensor:
    """float [0, 1] or uint8 images -> float levels 0..255."""
    return x.float() * 255 if x.is_floating_point() else x.float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(255.0 ** 2 / ((levels(a) - levels(b)) ** 2).mean()))


def denormalised(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


# ---------------------------------------------------------------- draws

class Spy:
    """Records what timm's own transform draws while it runs (the functions are called through)."""

    def __init__(self, monkeypatch):
        self.calls = []
        get_params = RandomResizedCropAndInterpolation.get_params
        monkeypatch.setattr(RandomResizedCropAndInterpolation, "get_params",
                            staticmethod(lambda *a: self._record("box", get_params(*a))))
        hflip = TF.hflip
        monkeypatch.setattr(TF, "hflip", lambda img: self._record("flip", True) and hflip(img))
        op_call = AugmentOp.__call__
        monkeypatch.setattr(AugmentOp, "__call__", lambda op, img: self._record("op", op.name) and op_call(op, img))
        blur = ImageFilter.GaussianBlur.__init__
        monkeypatch.setattr(ImageFilter.GaussianBlur, "__init__",
                            lambda f, radius=2: self._record("sigma", radius) and blur(f, radius))
        jitter = T.ColorJitter.get_params
        monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(lambda *a: self._record("jitter", jitter(*a))))

    def _record(self, kind, value):
        self.calls.append((kind, value))
        return value

    def take(self) -> dict:
        calls, self.calls = dict(self.calls), []
        return calls


def test_draws_are_timms_on_the_same_seeds(monkeypatch):
    """Per seed: the same box, flip, 3-Augment op, blur radius and jitter order/factors as timm's
    PIL transform, and the random generators end in the same state (no draw more, none less)."""
    cfg = recipe(img_size=64)
    transform = D.build_train_transform(cfg)
    augment = A.TrainAugment(transform)
    spy = Spy(monkeypatch)
    seen_ops = set()
    for seed in range(120):
        image = random_image(seed, size=(90 + seed % 40, 70 + seed % 53))
        with seeded_rngs(seed):
            transform(image)
            timm_states = random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy()
        timm = spy.take()
        with seeded_rngs(seed):
            row = augment.draw(*image.size)
            our_states = random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy()
        assert our_states[0] == timm_states[0] and torch.equal(our_states[1], timm_states[1]), seed
        assert np.array_equal(our_states[2], timm_states[2])  # neither draws from NumPy (the worker skips it)
        assert tuple(row[A.BOX]) == timm["box"]
        assert row[A.FLIP] == float(timm.get("flip", False))
        assert A.OPS[int(row[A.THREE_AUG])] == timm["op"]
        seen_ops.add(timm["op"])
        if timm["op"] == "GaussianBlurRand":
            assert row[A.BLUR_SIGMA] == timm["sigma"]
        order, *factors = timm["jitter"]
        assert row[A.JITTER_OPS].tolist() == order[order < 3].tolist()
        assert row[A.JITTER_FACTORS].tolist() == [factors[i] for i in order[order < 3].tolist()]
    assert seen_ops == set(A.OPS)


def test_crop_boxes_keep_timms_scale_and_ratio_distribution():
    """The boxes handed over, after DCT-scaled decoding rounds their edges, measured in the original
    image: the same scale/ratio histograms as timm's RandomResizedCrop on the same seeds, and the
    very same box wherever the crop is decoded at full size."""
    augment = A.TrainAugment(D.build_train_transform(recipe(img_size=224)))
    header = Image.new("RGB", (1000, 750))
    ours, timm, scaled = [], [], 0
    for seed in range(1500):
        with seeded_rngs(seed):
            top, left, height, width = augment.draw(1000, 750)[A.BOX]
        with seeded_rngs(seed):
            timm_box = augment.crop.get_params(header, augment.crop.scale, augment.crop.ratio)
        scale = dct_scale(height, width, 224)
        scaled += scale > 1
        effective = ((round((top + height) / scale) - round(top / scale)) * scale,
                     (round((left + width) / scale) - round(left / scale)) * scale)
        if scale == 1:
            assert effective == timm_box[2:], seed
        ours.append((effective[0] * effective[1] / 750000, math.log(effective[1] / effective[0])))
        timm.append((timm_box[2] * timm_box[3] / 750000, math.log(timm_box[3] / timm_box[2])))
    ours, timm = np.array(ours), np.array(timm)
    for column, edges in ((0, np.linspace(0.0, 1.0, 11)), (1, np.linspace(math.log(3 / 4), math.log(4 / 3), 11))):
        ours_counts, _ = np.histogram(ours[:, column], edges)
        timm_counts, _ = np.histogram(timm[:, column], edges)
        assert np.abs(ours_counts - timm_counts).max() <= 20, (ours_counts, timm_counts)  # of ~150 per bin
    assert (np.abs(ours - timm).max(0) < [0.02, 0.03]).all()  # per box: area fraction, log aspect ratio
    assert scaled > 500  # most crops of a 1000 x 750 image decode at 1/2 or less


# ---------------------------------------------------------------- decoding

@pytest.mark.parametrize("box, size, scale", [((40, 30, 460, 420), 96, 4), ((100, 50, 300, 280), 96, 2),
                                              ((100, 52, 300, 280), 56, 4), ((0, 0, 600, 512), 56, 8),
                                              ((200, 100, 150, 200), 96, 1)])
def test_scaled_region_decode_matches_full_decode(photo, box, size, scale):
    """Decode what the crop needs at 1/scale, then resize == full decode, crop, resize (timm's PIL
    resized_crop) of the same box, whose edges DCT scaling snaps to multiples of the scale
    (tests above: the boxes keep timm's distribution): PSNR >= 35 dB on a real photograph at
    1/2 to 1/8, and >= 60 dB at full scale (torchvision's resize vs PIL's)."""
    width, height, image = open_image(photo)
    assert (width, height, image) == (512, 600, None)  # a JPEG for simplejpeg
    crop, inner = decode_crop(photo, image, box, size)
    assert dct_scale(*box[2:], size) == scale
    assert inner == (0, 0, crop.shape[0], crop.shape[1]) and min(crop.shape[:2]) >= size or scale == 1
    top, left = round(box[0] / scale) * scale, round(box[1] / scale) * scale
    height, width = crop.shape[0] * scale, crop.shape[1] * scale
    assert abs(top - box[0]) <= scale / 2 and abs(top + height - box[0] - box[2]) <= scale / 2
    assert abs(left - box[1]) <= scale / 2 and abs(left + width - box[1] - box[3]) <= scale / 2
    ours = F.resize(torch.from_numpy(crop).permute(2, 0, 1), [size, size], T.InterpolationMode.BICUBIC, antialias=True)
    full = TF.resized_crop(Image.open(io.BytesIO(photo)).convert("RGB"), top, left, height, width, [size, size],
                           T.InterpolationMode.BICUBIC)
    assert psnr(ours, to_uint8_chw(full)) >= (60 if scale == 1 else 35)


def test_full_scale_decode_is_pils_decode(photo):
    crop, _ = decode_crop(photo, None, (10, 20, 300, 200), 224)
    assert np.array_equal(crop, np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))[10:310, 20:220])


# ---------------------------------------------------------------- each op against PIL

@pytest.fixture(scope="module")
def picture():
    """A 224 x 224 crop of the photograph, as PIL image and as float batch of one."""
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    image = image.resize((224, 224), Image.BICUBIC)
    return image, F.to_dtype(to_uint8_chw(image)[None], torch.float32, scale=True)


def test_resize_and_flip_match_pil(photo):
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    crop = to_uint8_chw(image)[:, 50:400, 30:330]
    ours = F.resize(crop, [224, 224], T.InterpolationMode.BICUBIC, antialias=True)
    pil = to_uint8_chw(TF.resized_crop(image, 50, 30, 350, 300, [224, 224], T.InterpolationMode.BICUBIC))
    assert (ours.int() - pil.int()).abs().max() <= 1  # torchvision's antialiased bicubic = PIL's up to rounding
    assert torch.equal(F.horizontal_flip(pil), to_uint8_chw(TF.hflip(Image.fromarray(pil.permute(1, 2, 0).numpy()))))


def test_three_augment_ops_match_pil(picture):
    image, x = picture
    grey = A.blend(x, F.rgb_to_grayscale(x), 0.0)
    assert (levels(grey[0]) - levels(to_uint8_chw(ImageEnhance.Color(image).enhance(0.0)))).abs().max() <= 0.6
    assert torch.equal(A.solarize(to_uint8_chw(image), 128), to_uint8_chw(ImageOps.solarize(image, 128)))
    for sigma in (0.1, 0.3, 0.7, 1.3, 2.0):
        ours = levels(A.gaussian_blur(x, torch.tensor([sigma], dtype=torch.float64), 2.0)[0])
        difference = (ours - levels(to_uint8_chw(image.filter(ImageFilter.GaussianBlur(sigma))))).abs()
        # PIL rounds to uint8 after each of its six box passes and repeats the border at each pass
        assert difference.mean() <= 0.7 and difference[:, 6:-6, 6:-6].max() <= 3, (sigma, difference.mean())


@pytest.mark.parametrize("op, adjust", [(0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)])
def test_colour_jitter_matches_torchvision_and_pil(picture, op, adjust):
    image, x = picture
    for factor in (0.7, 1.0, 1.3):
        ours = A.color_jitter(x.clone(), torch.tensor([[op, -1, -1]], dtype=torch.float64),
                              torch.tensor([[factor, 1.0, 1.0]], dtype=torch.float64))
        assert torch.allclose(ours[0], adjust(x[0], factor), atol=1e-6)  # torchvision's tensor op
        assert (levels(ours[0]) - levels(to_uint8_chw(adjust(image, factor)))).abs().max() <= 1.1  # PIL rounds to uint8


def test_whole_train_augmentation_matches_timm_on_the_same_draws():
    """Device path vs the CPU path (timm's PIL transform), same photographs and seeds: PSNR >= 40 dB
    for every image. The crops here decode at full size (DCT-scaled decoding is tested above)."""
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    images = [{"bytes": jpeg(photo.resize((100 + 3 * i, 90 + i), Image.BICUBIC)), "path": None} for i in range(24)]
    hf = class_dataset(images, [0] * 24)
    cpu = D.build_image_dataset(hf, recipe(img_size=64, augment_on="cpu"), train=True, num_classes=3)
    device = D.build_image_dataset(hf, recipe(img_size=64), train=True, num_classes=3)
    assert isinstance(device, CropDataset)
    batch, labels, problems = device.collate([device[(i, 50 + i)] for i in range(24)])
    ours = denormalised(device.batch_transform("cpu")(batch))
    reference = denormalised(torch.stack([cpu[(i, 50 + i)][0] for i in range(24)]))
    assert ours.shape == (24, 3, 64, 64) and labels.tolist() == [0] * 24 and problems == []
    assert min(psnr(a, b) for a, b in zip(ours, reference)) >= 40
    assert set(batch.params[:, A.THREE_AUG].tolist()) == {0, 1, 2}


def test_batched_equals_per_sample():
    images = [{"bytes": jpeg(random_image(i, size=(80, 60))), "path": None} for i in range(10)]
    device = D.build_image_dataset(class_dataset(images, [1] * 10), recipe(img_size=32), train=True, num_classes=3)
    samples = [device[(i, 7 * i)] for i in range(10)]
    together = device.batch_transform("cpu")(device.collate(samples)[0])
    alone = torch.cat([device.batch_transform("cpu")(device.collate([sample])[0]) for sample in samples])
    assert torch.allclose(together, alone, atol=1e-5)


def test_eval_transform_matches_timm():
    images = [{"bytes": jpeg(random_image(i, size=(70 + 9 * i, 50 + 4 * i))), "path": None} for i in range(6)]
    hf = class_dataset(images, [2] * 6)
    cpu = D.build_image_dataset(hf, recipe(img_size=32, augment_on="cpu"), train=False, num_classes=3)
    device = D.build_image_dataset(hf, recipe(img_size=32), train=False, num_classes=3)
    ours = device.batch_transform("cpu")(device.collate([device[i] for i in range(6)])[0])
    reference = torch.stack([cpu[i][0] for i in range(6)])
    assert (levels(denormalised(ours)) - levels(denormalised(reference))).abs().max() <= 1.01


def test_batched_resize_equals_torchvisions_resize_of_each_crop():
    """resize_boxes (one batched pass for every box size) against torchvision's antialiased resize
    of each crop on its own, the op the device path ran per image: within one level, for crops
    smaller and larger than the output, bicubic and bilinear, flipped or not, and for the eval
    geometry (shorter side resized, centre crop) against torchvision's resize + centre_crop."""
    generator = np.random.default_rng(5)
    crops = []
    for index in range(12):
        height, width = generator.integers(12, 150, 2)
        row = torch.zeros(A.NUM_PARAMS, dtype=torch.float64)
        row[A.BOX] = torch.tensor([0, 0, height, width], dtype=torch.float64)
        row[A.FLIP] = index % 2
        crops.append((torch.from_numpy(np.array(random_image(index, size=(int(width), int(height))))), row))
    batch = CropBatch.collate(crops)
    boxes = batch.params[:, A.BOX].numpy()
    for mode in (T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR):
        support, kernel = A.RESAMPLING[mode]
        plan = A.ResizePlan(boxes, resized=[[40, 56]], first=[[0, 0]], count=(40, 56), support=support,
                            flip=batch.params[:, A.FLIP].numpy() > 0)
        ours = A.resize_boxes(*batch.flat_images(plan.pad_bytes), plan, kernel)
        for (pixels, row), image in zip(crops, ours):
            reference = F.resize(pixels.permute(2, 0, 1), [40, 56], mode, antialias=True)
            reference = reference.flip(-1) if row[A.FLIP] else reference
            assert (image.int() - reference.int()).abs().max() <= 1, (mode, pixels.shape)
    evaluate = A.EvalTransform(D.build_eval_transform(recipe(img_size=32, eval_crop_pct=0.875)))
    ours = evaluate.normalize.host[1] * evaluate(batch) + evaluate.normalize.host[0]
    for (pixels, _), image in zip(crops, ours):
        reference = F.center_crop(F.resize(pixels.permute(2, 0, 1), 36, T.InterpolationMode.BICUBIC, antialias=True), 32)
        assert (levels(image) - levels(reference)).abs().max() <= 1.01


class DispatchedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_device_path_ops_per_batch_do_not_grow_with_the_batch(monkeypatch, train):
    """On a GPU every dispatched op costs host time: the batch transform of 64 images dispatches at
    most 1.2x the ops of 16 (no loop over images). CPU_CHUNK is lifted so the whole batch goes
    through at once, as on an accelerator."""
    monkeypatch.setattr(A, "CPU_CHUNK", 1 << 20)
    images = [{"bytes": jpeg(random_image(i, size=(40 + 7 * (i % 9), 36 + 5 * (i % 7)))), "path": None} for i in range(64)]
    dataset = D.build_image_dataset(class_dataset(images, [0] * 64), recipe(img_size=32), train=train, num_classes=3)
    transform = dataset.batch_transform("cpu")
    counts = {}
    for size in (16, 64):
        batch = dataset.collate([dataset[(i, i) if train else i] for i in range(size)])[0]
        assert not train or set(batch.params[:, A.THREE_AUG].tolist()) == {0, 1, 2}  # every branch runs at both sizes
        with DispatchedOps() as ops:
            transform(batch)
        counts[size] = ops.count
    assert counts[64] <= 1.2 * counts[16], counts


@pytest.mark.parametrize("decode_on", ["cpu", "device"])
def test_device_path_builds_no_tensor_from_python_data_on_the_device(decode_on):
    """The train and eval batch transforms copy nothing to the device that would block a GPU's host:
    no tensor built from Python numbers there, no copy without non_blocking (tests/host_transfers.py)."""
    images = [{"bytes": jpeg(random_image(i, size=(50 + 3 * i, 40 + i))), "path": None} for i in range(12)]
    cfg = recipe(img_size=32)
    cfg["data"]["decode_on"] = decode_on
    for train in (True, False):
        dataset = D.build_image_dataset(class_dataset(images, [1] * 12), cfg, train=train, num_classes=3)
        batch = dataset.collate([dataset[(i, i) if train else i] for i in range(12)])[0]
        assert (batch.params[:, A.JPEG] > 0).all() == (decode_on == "device")
        with BlockingTransfers("cpu") as transfers:
            dataset.batch_transform("cpu")(batch)
        assert transfers.calls == [], transfers.calls


def test_rand_augment_recipe_names_both_keys():
    with pytest.raises(ValueError, match="aug.rand_augment.*data.augment_on=cpu"):
        D.build_image_dataset(class_dataset([png_bytes(random_image(0))], [0]),
                              recipe(three_augment=False, rand_augment="rand-m9-mstd0.5-inc1"), train=True, num_classes=3)


# ---------------------------------------------------------------- odd and broken files

def without_addresses(records):
    """PIL names an in-memory file by its object's address ("<_io.BytesIO object at 0x...>")."""
    return [(r.path, r.row, re.sub(r" at 0x[0-9a-f]+", "", r.error)) for r in records]


def test_odd_and_broken_files_behave_as_on_the_cpu_path():
    """CMYK, greyscale (JPEG and PNG), palette, 16-bit PNG decode as on the CPU path; truncated,
    empty, non-image and bomb files give the same records and the same replacement sample."""
    base = random_image(3, size=(64, 48))
    ramp16 = Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16))
    good = [png_bytes(base.convert("CMYK"), "JPEG"), png_bytes(base.convert("P")), png_bytes(base.convert("L")),
            png_bytes(base.convert("L"), "JPEG"), png_bytes(ramp16), png_bytes(base, "JPEG")]
    bad = [{"bytes": data, "path": f"dir: odd/{name}"} for name, data in broken_images().items()]
    images = good[:3] + bad + good[3:]
    hf = class_dataset(images, list(range(3)) * 3 + [0])
    cpu = D.build_image_dataset(hf, recipe(img_size=48, augment_on="cpu"), train=False, num_classes=3)
    device = D.build_image_dataset(hf, recipe(img_size=48), train=False, num_classes=3)
    for index in range(len(images)):
        cpu_image, cpu_label, cpu_problems = cpu[index]
        crop, label, problems = device[index]
        assert (label, without_addresses(problems)) == (cpu_label, without_addresses(cpu_problems)), index
        ours = device.batch_transform("cpu")(device.collate([(crop, label, problems)])[0])[0]
        assert (levels(denormalised(ours)) - levels(denormalised(cpu_image))).abs().max() <= 1.01, index
    _, _, problems = device[3]
    assert [(p.path, p.error.split(":")[0]) for p in problems] == [
        ("dir: odd/truncated.jpg", "OSError"), ("dir: odd/empty.jpg", "UnidentifiedImageError"),
        ("dir: odd/notes.txt", "UnidentifiedImageError"), ("dir: odd/bomb.png", "DecompressionBombError")]


# ---------------------------------------------------------------- CropBatch

def test_crop_batch_packs_and_cuts():
    def draws(top, left, height, width):
        row = torch.zeros(A.NUM_PARAMS, dtype=torch.float64)
        row[A.BOX] = torch.tensor([top, left, height, width], dtype=torch.float64)
        return row

    crops = [(torch.arange(h * w * 3, dtype=torch.uint8).view(h, w, 3), draws(1, 2, h - 2, w - 3))
             for h, w in ((5, 7), (9, 4))]
    batch = CropBatch.collate(crops)
    assert batch.pixels.shape == (5 * 7 * 3 + 9 * 4 * 3,) and batch.sizes.tolist() == [[5, 7], [9, 4]]
    assert batch.files.numel() == 0
    buffer, offsets, widths = batch.flat_images(pad_bytes=6)
    assert buffer.shape == (5 * 7 * 3 + 9 * 4 * 3 + 6,) and not buffer[-6:].any()
    assert offsets.tolist() == [0, 5 * 7 * 3] and widths.tolist() == [7, 4]
    for (pixels, _), offset in zip(crops, offsets):
        assert torch.equal(buffer[offset:offset + pixels.numel()].view(pixels.shape), pixels)
    assert len(batch.to("cpu")) == 2


def test_jpeg_decoding_on_the_device_with_a_per_file_fallback(monkeypatch):
    """data.decode_on=device (run here with torchvision's CPU decoder): complete JPEGs travel as
    files, the rest as crops; the images equal the CPU-decoded path's. A file the device decoder
    rejects (a fault injected into torchvision's decode_jpeg as crops.py calls it) is decoded on the
    host instead."""
    sizes = [(60, 44), (52, 40), (48, 48), (64, 50)]
    images = [{"bytes": jpeg(random_image(i, size=size)), "path": None} for i, size in enumerate(sizes)]
    images.append(png_bytes(random_image(9, size=(50, 40))))  # a PNG: decoded in the worker
    hf = class_dataset(images, [0, 1, 2, 0, 1])
    host_decoded = D.build_image_dataset(hf, recipe(img_size=32), train=True, num_classes=3)
    cfg = recipe(img_size=32)
    cfg["data"]["decode_on"] = "device"
    device = D.build_image_dataset(hf, cfg, train=True, num_classes=3)
    samples = [device[(i, 30 + i)] for i in range(5)]
    batch = device.collate(samples)[0]
    assert batch.params[:, A.JPEG].tolist() == [1, 1, 1, 1, 0] and batch.files.numel() == sum(
        len(image["bytes"]) for image in images[:4])
    reference = host_decoded.batch_transform("cpu")(host_decoded.collate([host_decoded[(i, 30 + i)] for i in range(5)])[0])
    assert torch.allclose(device.batch_transform("cpu")(batch), reference, atol=1e-5)

    real, calls = crops.decode_jpeg, []
    rejected = len(images[2]["bytes"])

    def fails_on_one_file(data, **kwargs):
        files = data if isinstance(data, list) else [data]
        calls.append(len(files))
        if any(len(f) == rejected for f in files):
            raise RuntimeError("injected decoder failure")
        return real(data, **kwargs)

    monkeypatch.setattr(crops, "decode_jpeg", fails_on_one_file)
    assert torch.allclose(device.batch_transform("cpu")(batch), reference, atol=1e-5)
    assert calls == [4, 1, 1, 1, 1]  # the batch, then file by file
    with pytest.raises(ValueError, match="data.decode_on=device needs data.augment_on=device"):
        D.build_image_dataset(hf, {**cfg, "data": {**cfg["data"], "augment_on": "cpu"}}, train=True, num_classes=3)


def test_loader_batches_do_not_depend_on_workers():
    images = [{"bytes": jpeg(random_image(i, size=(50 + i, 40))), "path": None} for i in range(12)]
    dataset = D.build_image_dataset(class_dataset(images, [i % 3 for i in range(12)]), recipe(img_size=32),
                                    train=True, num_classes=3)

    def batches(workers):
        sampler = D.TrainSampler(len(dataset), num_replicas=1, rank=0, seed=4)
        data_cfg = {**recipe()["data"], "num_workers": workers}
        return [(dataset.batch_transform("cpu")(images), labels)
                for images, labels, _ in D.build_train_loader(dataset, sampler, 4, data_cfg)]

    for (ours, our_labels), (theirs, their_labels) in zip(batches(2), batches(0), strict=True):
        assert torch.equal(ours, theirs) and torch.equal(our_labels, their_labels)


def test_device_decoding_prepared_ahead_equals_in_line():
    """data.decode_on=device through train.py's stream: the JPEGs decoded and augmented one batch
    ahead on the background thread give the very tensors, in the same order and at the same loop
    positions, as decoding in line (a real DataLoader with a worker process, over an epoch end)."""
    images = [{"bytes": jpeg(random_image(i, size=(48 + i, 40 + 2 * i))), "path": None} for i in range(14)]
    cfg = recipe(img_size=32)
    cfg["data"].update(decode_on="device", num_workers=1)
    dataset = D.build_image_dataset(class_dataset(images, [i % 3 for i in range(14)]), cfg, train=True, num_classes=3)
    transform = dataset.batch_transform("cpu")

    def run(ahead: bool) -> list:
        sampler, progress = D.TrainSampler(len(dataset), num_replicas=1, rank=0, seed=3), Progress()
        stream = MicroBatchStream(D.build_train_loader(dataset, sampler, 4, cfg["data"]), sampler, progress, 4,
                                  epoch_samples=12, prepare=lambda batch: (transform(batch[0]), batch[1]), ahead=ahead)
        return [(next(stream), progress.epoch, progress.samples_in_epoch) for _ in range(5)]

    expected, ahead = run(ahead=False), run(ahead=True)
    assert [position for *_, position in expected][2:4] == [12, 4]  # across the epoch end
    for ((x, labels), *position), ((y, their_labels), *their_position) in zip(ahead, expected, strict=True):
        assert torch.equal(x, y) and torch.equal(labels, their_labels) and position == their_position


@pytest.mark.slow
def test_resume_is_bit_identical_with_augment_on_device(tmp_path):
    """train.py with data.augment_on=device: 8 steps straight == 4 steps, a relaunch, 4 more (every
    weight equal); the single-process note about repeated augmentation; the final evaluation."""
    env = subprocess_env(tmp_path / "hf_cache")
    straight = write_tiny_recipe(tmp_path, tmp_path / "straight")
    first = run_train(straight, "data.augment_on=device", "train.max_steps=8", env=env)
    assert "note: aug.repeated_aug=3 is inactive on a single process" in first.stdout + first.stderr
    resumed = write_tiny_recipe(tmp_path, tmp_path / "resumed")
    run_train(resumed, "data.augment_on=device", "train.max_steps=4", env=env)
    run_train(resumed, "data.augment_on=device", "train.max_steps=8", env=env)
    a = load_file(tmp_path / "straight" / "tiny" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "tiny" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    evals = [e for e in read_jsonl(tmp_path / "straight" / "tiny" / "metrics.jsonl") if "val/top1" in e]
    assert [(e["step"], e["val/images"]) for e in evals] == [(8, 50)]


# ---------------------------------------------------------------- recipe options and refusals

def train_transform(size=48, *, policy=None, **options):
    """timm's training transform (create_transform) with DeiT-III's defaults unless ``options`` say
    otherwise; ``policy`` replaces 3-Augment's sub-policies by timm AugmentOps ``(name, prob, magnitude)``."""
    options = dict(dict(scale=(0.08, 1.0), hflip=0.5, auto_augment="3a", color_jitter=0.3, interpolation="bicubic",
                        re_prob=0.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)), **options)
    transform = create_transform(size, is_training=True, **options)
    if policy is not None:
        (three_augment,) = [step for step in transform.transforms if isinstance(step, AutoAugment)]
        three_augment.policy = [[AugmentOp(*op) for op in sub_policy] for sub_policy in policy]
    return transform


def eval_transform(size=32, **options):
    return create_transform(size, is_training=False, interpolation="bicubic", **options)


RECIPES = {
    # every option the device path reads, none at its DeiT-III value; contrast off (its factor is None)
    "options": dict(scale=(0.3, 0.9), ratio=(0.5, 2.0), hflip=0.7, color_jitter=(0.4, 0.0, 0.2),
                    interpolation="bilinear", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25)),
    # 3-Augment's magnitudes read per op: solarize at 230, keep 0.3 of the colour, blur radius up to 1.0
    "magnitudes": dict(policy=[[("Solarize", 1.0, 9)], [("Desaturate", 1.0, 4)], [("GaussianBlurRand", 1.0, 5)]]),
    # solarize at 179, keep half the colour, blur radius uniform(0.1, 0) (timm's level 0)
    "lowest levels": dict(policy=[[("Solarize", 1.0, 7)], [("Desaturate", 1.0, 0)], [("GaussianBlurRand", 1.0, 0)]]),
    # no flip, no 3-Augment, no colour jitter: timm leaves their steps out
    "nothing random": dict(hflip=0.0, auto_augment=None, color_jitter=None),
}


@pytest.mark.parametrize("options", RECIPES.values(), ids=RECIPES.keys())
def test_device_path_follows_each_recipe_option_as_timm(options):
    """TrainAugment built from timm transforms other than the default recipe's: crop scale and
    ratio, flip probability, bilinear resize, colour jitter with a factor off, mean/std, 3-Augment
    magnitudes, and every optional step left out. Against timm's own PIL transform on the same
    seeds: PSNR >= 40 dB for every image."""
    transform = train_transform(**options)
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    images = [{"bytes": jpeg(photo.resize((100 + 3 * i, 90 + i), Image.BICUBIC)), "path": None} for i in range(18)]
    hf = class_dataset(images, [0] * 18)
    cpu = ImageClassDataset(hf, transform, num_classes=3)
    device = CropDataset(hf, A.TrainAugment(transform), num_classes=3)
    batch = device.collate([device[(i, 80 + i)] for i in range(18)])[0]
    mean, std = (torch.as_tensor(value).view(3, 1, 1) for value in (options.get("mean", MEAN), options.get("std", STD)))
    ours = device.batch_transform("cpu")(batch) * std + mean
    reference = torch.stack([cpu[(i, 80 + i)][0] for i in range(18)]) * std + mean
    assert min(psnr(a, b) for a, b in zip(ours, reference)) >= 40
    if "policy" in options:
        assert set(batch.params[:, A.THREE_AUG].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("policy", [[[("Solarize", 1.0, 0.5)], [("Desaturate", 1.0, 4)], [("GaussianBlurRand", 1.0, 5)]],
                                    [[("Solarize", 1.0, 7)], [("Desaturate", 1.0, 0)], [("GaussianBlurRand", 1.0, 0)]]],
                         ids=["solarize below magnitude 1", "lowest levels"])
def test_three_augment_levels_are_the_ones_timm_passes_to_pil(monkeypatch, policy):
    """Per seed, with 3-Augment magnitudes other than 3a's: the op, the solarize threshold, the
    colour-enhance factor and the blur radius that timm's ops hand to PIL are the device path's
    (colour jitter off: its saturation calls PIL's colour enhance too)."""
    transform = train_transform(policy=policy, color_jitter=None)
    augment = A.TrainAugment(transform)
    spy = Spy(monkeypatch)
    solarize, enhance = ImageOps.solarize, ImageEnhance.Color.enhance
    monkeypatch.setattr(ImageOps, "solarize", lambda image, threshold: spy._record("threshold", threshold)
                        and solarize(image, threshold))
    monkeypatch.setattr(ImageEnhance.Color, "enhance", lambda self, factor: spy._record("keep", factor) is None
                        or enhance(self, factor))
    image = random_image(0, size=(60, 50))
    seen = set()
    for seed in range(30):
        with seeded_rngs(seed):
            transform(image)
            timm_state = random.getstate()
        timm = spy.take()
        with seeded_rngs(seed):
            row = augment.draw(*image.size)
            assert random.getstate() == timm_state, seed
        seen.add(timm["op"])
        assert A.OPS[int(row[A.THREE_AUG])] == timm["op"]
        if timm["op"] == "Solarize":
            assert augment.solarize_threshold == timm["threshold"]
        elif timm["op"] == "Desaturate":
            assert augment.desaturate_keep == timm["keep"]
        else:
            assert row[A.BLUR_SIGMA] == timm["sigma"]
    assert seen == set(A.OPS)


def test_rows_without_random_choices_encode_none():
    """A training transform with no flip, 3-Augment or jitter draws a row that says so in the
    encoding the accelerator reads (A.THREE_AUG, A.JITTER_OPS: -1 none; jitter factor 1, the
    identity of torchvision's adjust_*), the same as the evaluation transform's row, whose box is
    the whole image."""
    augment = A.TrainAugment(train_transform(**RECIPES["nothing random"]))
    evaluate = A.EvalTransform(eval_transform())
    none = [0.0, -1.0, 0.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0]  # FLIP .. JITTER_FACTORS
    for seed in range(5):
        with seeded_rngs(seed):
            row = augment.draw(90, 70)
        assert row[4:13].tolist() == none
    row = evaluate.draw(90, 70)
    assert row[A.BOX].tolist() == [0, 0, 70, 90] and row[4:13].tolist() == none


def test_flip_on_a_tie_follows_torchvision():
    """torchvision's RandomHorizontalFlip flips when torch.rand(1) < p: with p exactly the value the
    generator draws, neither it nor the row flips; with p one step above, both do."""
    transform = train_transform()
    augment = A.TrainAugment(transform)
    image = torch.arange(2 * 3 * 5, dtype=torch.uint8).view(3, 2, 5)
    for seed in range(3):
        with seeded_rngs(seed):
            drawn = torch.rand(1).item()  # the first draw from torch: the flip's (the crop draws from Python's random)
        for p, flipped in ((drawn, False), (float(np.nextafter(np.float32(drawn), np.float32(1))), True)):
            augment.flip.p = p
            with seeded_rngs(seed):
                assert torch.equal(augment.flip(image), image.flip(-1) if flipped else image)
            with seeded_rngs(seed):
                assert augment.draw(50, 40)[A.FLIP] == float(flipped), (seed, p)


def refusal(build, transform) -> str:
    with pytest.raises(InputError) as error:
        build(transform)
    return str(error.value)


def test_train_transforms_the_device_path_cannot_run_are_refused_word_for_word():
    """Each timm training option the accelerator does not implement stops in one line that names
    it and the key to set."""
    extra = train_transform(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    assert refusal(A.TrainAugment, extra) == (
        "data.augment_on=device runs RandomResizedCrop, flip, 3-Augment, colour jitter and normalisation on the "
        "accelerator; this recipe's transform also has RandAugment, RandomErasing: set data.augment_on=cpu")
    assert refusal(A.TrainAugment, train_transform(interpolation="random")) == (
        "data.augment_on=device needs one aug.interpolation, not a random choice")
    assert refusal(A.TrainAugment, train_transform(color_jitter=(0.3, 0.3, 0.3, 0.1))) == (
        "data.augment_on=device has no hue jitter (DeiT-III uses none): set data.augment_on=cpu")
    policies = {"a probability below 1": [[("Solarize", 0.5, 5)]], "an op outside 3a": [[("Rotate", 1.0, 5)]],
                "two ops": [[("Solarize", 1.0, 5), ("Desaturate", 1.0, 10)]]}
    transforms = [train_transform(policy=policy) for policy in policies.values()]
    transforms.append(train_transform(auto_augment="3a-mstd0.5"))  # timm's magnitude noise
    for transform in transforms:
        (three_augment,) = [step for step in transform.transforms if isinstance(step, AutoAugment)]
        assert refusal(A.TrainAugment, transform) == (
            f"data.augment_on=device implements timm's 3-Augment policy only, got {three_augment.policy[0]}: "
            f"set data.augment_on=cpu")


def test_eval_transforms_the_device_path_cannot_run_are_refused_word_for_word():
    """timm's border and squash crop modes, a transform without a centre crop and a crop larger
    than the resize (crop_pct > 1) each stop in one line."""
    assert refusal(A.EvalTransform, eval_transform(crop_mode="border")) == (
        "data.augment_on=device runs resize, centre crop and normalisation on the accelerator; this recipe's "
        "transform also has ResizeKeepRatio, CenterCropOrPad: set data.augment_on=cpu")
    squash = eval_transform(crop_mode="squash")
    no_crop = T.Compose([T.Resize(32), MaybeToTensor(), T.Normalize((0.5,) * 3, (0.2,) * 3)])
    for transform in (squash, no_crop):
        assert refusal(A.EvalTransform, transform) == (
            f"data.augment_on=device expects timm's centre-crop eval transform, got {transform}")
    assert refusal(A.EvalTransform, eval_transform(crop_pct=1.2)) == (
        "data.augment_on=device crops the resized image; aug.eval_crop_pct > 1 pads it instead (resize to 26, "
        "crop [32, 32]): set data.augment_on=cpu")


def test_size_only_stands_in_for_the_rgb_image():
    """torchvision reads the same channels, height and width from the stand-in as from the PIL image."""
    assert TF.get_dimensions(A.size_only(70, 50)) == TF.get_dimensions(Image.new("RGB", (70, 50))) == [3, 50, 70]


def test_normalize_is_torchvisions_bit_for_bit():
    """Normalize == torchvision's Normalize (which computes in the image's float32) bit for bit, with
    mean/std given as Python numbers and as float64 tensors."""
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for m, s in ((mean, std), (torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))):
        assert torch.equal(A.Normalize(m, s)(x.clone()), T.Normalize(m, s)(x.clone()))


def test_host_values_are_copied_to_the_images_device():
    """The per-sample masks and normalisation's mean/std end on the images' device (here the meta
    device, which runs without an accelerator), once for mean/std."""
    meta = torch.device("meta")
    mask = A._column(torch.tensor([True, False, True]), meta)
    assert mask.device == meta and mask.shape == (3, 1, 1, 1)
    normalize = A.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.25))
    assert normalize(torch.empty(2, 3, 4, 4, device=meta)).device == meta
    assert list(normalize.on_device) == [meta] and all(t.device == meta for t in normalize.on_device[meta])
