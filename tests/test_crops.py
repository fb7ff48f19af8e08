"""clsvit.data.crops as a unit: which files the worker only header-parses, the DCT-scaled crop
against PIL's own reduced-size decoding (``Image.draft``), what a worker hands over, CropBatch's
buffers, and the accelerator's JPEG decoding with its per-file and host fallbacks against PIL's
decode. The device path against timm's transform: tests/test_augment.py."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from clsvit.data import augment as A
from clsvit.data import crops
from clsvit.data.crops import CropBatch, CropDataset, decode_crop, decode_jpegs, open_image, read_bytes
from clsvit.data.images import seeded_rngs
from clsvit.errors import InputError
from clsvit import data as D
from host_transfers import BlockingTransfers
from test_augment import jpeg, recipe
from test_data import class_dataset, png_bytes, random_image


def pil_rgb(data: bytes, reduced_to: tuple[int, int] | None = None) -> np.ndarray:
    """PIL's decode as RGB; ``reduced_to`` (width, height): libjpeg's reduced-size decode that
    PIL's ``draft`` picks, the smallest at least that size."""
    image = Image.open(io.BytesIO(data))
    if reduced_to is not None:
        image.draft("RGB", reduced_to)
    return np.asarray(image.convert("RGB"))


def with_second_soi(data: bytes) -> bytes:
    """A JPEG with a second start-of-image marker in its scan: the header parses (YCbCr) and the file
    ends with the end-of-image marker, so it passes the worker's checks; every decoder rejects it."""
    sos = data.index(b"\xff\xda")
    middle = (sos + len(data)) // 2
    return data[:middle] + b"\xff\xd8" + data[middle:]


# ---------------------------------------------------------------- reading and opening

def test_read_bytes_reads_the_file_when_the_value_holds_no_bytes(tmp_path):
    data = jpeg(random_image(0, size=(16, 12)))
    (tmp_path / "a.jpg").write_bytes(data)
    assert read_bytes({"bytes": None, "path": str(tmp_path / "a.jpg")}) == data
    assert read_bytes({"bytes": data, "path": str(tmp_path / "missing.jpg")}) == data


def test_open_image_header_parses_the_jpegs_simplejpeg_decodes(monkeypatch):
    """YCbCr and greyscale JPEGs up to Pillow's pixel limit are only header-parsed (no PIL image);
    CMYK JPEGs, PNGs and JPEGs above the limit are opened by PIL, which refuses what it refuses on
    the CPU path (above twice the limit)."""
    image = random_image(1, size=(64, 48))
    assert open_image(jpeg(image)) == (64, 48, None)
    assert open_image(jpeg(image.convert("L"))) == (64, 48, None)
    for data, mode in ((jpeg(image.convert("CMYK")), "CMYK"), (png_bytes(image)["bytes"], "RGB")):
        width, height, opened = open_image(data)
        assert (width, height, opened.mode) == (64, 48, mode)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48)  # at the limit
    assert open_image(jpeg(image)) == (64, 48, None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 - 1)  # above it, within Pillow's 2x tolerance
    width, height, opened = open_image(jpeg(image))
    assert (width, height, opened.format) == (64, 48, "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 // 2 - 1)
    with pytest.raises(Image.DecompressionBombError):
        open_image(jpeg(image))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # no limit
    assert open_image(jpeg(image)) == (64, 48, None)


def test_open_image_leaves_the_size_check_to_the_worker(monkeypatch):
    """Above Pillow's limit but within its 2x tolerance, PIL opens the file without its
    DecompressionBombWarning, as on the CPU path: the worker checks the size (data.max_image_pixels)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image(png_bytes(random_image(1, size=(64, 48)))["bytes"])[:2] == (64, 48)


# ---------------------------------------------------------------- the crop

@pytest.mark.parametrize("size, box, min_side, scale, rows, cols", [
    ((64, 2), (0, 0, 2, 64), 1, 2, (0, 1), (0, 32)),      # a strip 2 rows high: its width decides nothing
    ((2, 64), (0, 0, 64, 2), 1, 2, (0, 32), (0, 1)),      # and 2 columns wide
    ((64, 48), (3, 3, 2, 2), 1, 2, (2, 3), (2, 3)),       # edges at 1.5 and 2.5 round to 2: one pixel kept
    ((64, 48), (47, 63, 1, 1), None, 1, (47, 48), (63, 64)),  # the last pixel
    ((64, 48), (8, 16, 40, 40), 5, 8, (1, 6), (2, 7)),
    ((64, 48), (5, 9, 34, 27), 6, 4, (1, 10), (2, 9)),    # 1.25 -> 1, 2.25 -> 2, 9.75 -> 10, 9 -> 9
])
def test_crop_is_the_box_of_libjpegs_reduced_decode(size, box, min_side, scale, rows, cols):
    """decode_crop == PIL's decode at 1/scale (Image.draft), cut at the box's edges divided by the
    scale and rounded to the nearest pixel (hand-computed here), for both sides of flat strips,
    edges on half pixels and the image's last pixel; a C-contiguous, writable array."""
    data = jpeg(random_image(2, size=size))
    crop, inner = decode_crop(data, None, box, min_side)
    reduced = pil_rgb(data, (-(-size[0] // scale), -(-size[1] // scale)))
    assert reduced.shape[:2] == (-(-size[1] // scale), -(-size[0] // scale))
    assert np.array_equal(crop, reduced[rows[0]:rows[1], cols[0]:cols[1]])
    assert inner == (0, 0, rows[1] - rows[0], cols[1] - cols[0])
    assert crop.flags.c_contiguous and crop.flags.writeable


def test_crop_of_an_image_pil_decodes_is_its_own_writable_array():
    """A PNG (decoded by PIL, whose arrays are read-only): the box of PIL's decode, C-contiguous and
    writable, so torch.from_numpy shares it without a warning."""
    data = png_bytes(random_image(3, size=(40, 30)))["bytes"]
    width, height, image = open_image(data)
    crop, _ = decode_crop(data, image, (4, 5, 20, 30), 8)
    assert np.array_equal(crop, pil_rgb(data)[4:24, 5:35])
    assert crop.flags.c_contiguous and crop.flags.writeable


@pytest.mark.parametrize("start, length, scale, limit, span", [
    (3, 2, 2, 24, (2, 3)),     # round(1.5) = round(2.5) = 2: still one pixel
    (5, 4, 2, 24, (2, 4)),     # round(2.5) = 2, round(4.5) = 4
    (46, 2, 2, 24, (23, 24)),  # the last pixel
    (48, 2, 2, 24, (23, 24)),  # past the decoded pixels: the last one
])
def test_scaled_span_keeps_at_least_one_pixel_inside_the_decoded_ones(start, length, scale, limit, span):
    assert crops._scaled_span(start, length, scale, limit) == span


# ---------------------------------------------------------------- what a worker hands over

def test_worker_hands_over_crops_by_default_and_complete_jpeg_files_on_request():
    """Without jpeg_on_device a JPEG is decoded in the worker. With it, a complete JPEG travels as its
    file, also when zero bytes pad it; one with other bytes after its end-of-image marker is
    decoded in the worker, as is a PNG. Each sample's draws name its row, after a broken
    file was replaced."""
    base = jpeg(random_image(4, size=(40, 30)))
    images = [{"bytes": base[: len(base) // 2], "path": None}, {"bytes": base, "path": None},
              {"bytes": base + bytes(7), "path": None}, {"bytes": base + b"XX", "path": None},
              png_bytes(random_image(5, size=(40, 30)))]
    hf = class_dataset(images, [0] * 5)
    augment = A.EvalTransform(D.build_eval_transform(recipe(img_size=16)))
    in_worker = CropDataset(hf, augment, num_classes=3)
    (crop, draws), _, problems = in_worker[0]
    assert crop.shape == (30, 40, 3) and (int(draws[A.JPEG]), int(draws[A.ROW]), len(problems)) == (0, 1, 1)
    files = CropDataset(hf, augment, jpeg_on_device=True, num_classes=3)
    for index, travels_as_file in ((1, True), (2, True), (3, False), (4, False)):
        (handed, draws), _, _ = files[index]
        assert (bool(draws[A.JPEG]), int(draws[A.ROW])) == (travels_as_file, index), index
        if travels_as_file:
            assert handed.numpy().tobytes() == images[index]["bytes"]
        else:
            assert handed.shape == (30, 40, 3)


def test_training_crops_decode_reduced_but_keep_the_output_size():
    """A 256 x 192 JPEG and a 16-pixel output: every training box (at least 8 % of the image, so at
    least 54 pixels a side) decodes at 1/2 or less, still at least 16 pixels a side."""
    data = jpeg(random_image(6, size=(256, 192)))
    dataset = D.build_image_dataset(class_dataset([{"bytes": data, "path": None}], [0]), recipe(img_size=16),
                                    train=True, num_classes=3)
    for seed in range(20):
        (crop, draws), _, _ = dataset[(0, seed)]
        with seeded_rngs(seed):
            box = dataset.transform.draw(256, 192)[A.BOX]
        assert 16 <= min(crop.shape[:2]) and crop.shape[0] <= box[2] / 2 + 1 and crop.shape[1] <= box[3] / 2 + 1
        assert draws[A.BOX].tolist() == [0, 0, crop.shape[0], crop.shape[1]]


# ---------------------------------------------------------------- CropBatch

def jpeg_file(data: bytes, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    draws = torch.zeros(A.NUM_PARAMS, dtype=torch.float64)
    draws[A.JPEG], draws[A.ROW] = 1, row
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), draws


def test_crop_batch_of_files_only_and_of_crops_only_keeps_uint8_buffers():
    """A batch of JPEG files only: an empty uint8 pixel buffer, sizes (file length, 0), the files one
    after the other, and flat_images' buffer is the uint8 decoded images and zero padding. A batch
    of crops only: an empty uint8 file buffer."""
    data = [jpeg(random_image(7, size=(20, 12))), jpeg(random_image(8, size=(10, 14)).convert("L"))]
    batch = CropBatch.collate([jpeg_file(d, row) for row, d in enumerate(data)])
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.numel() == 0
    assert batch.sizes.tolist() == [[len(data[0]), 0], [len(data[1]), 0]]
    assert batch.files.numpy().tobytes() == data[0] + data[1]
    buffer, offsets, widths = batch.flat_images(pad_bytes=5)
    assert buffer.dtype == torch.uint8 and offsets.tolist() == [0, 12 * 20 * 3] and widths.tolist() == [20, 10]
    assert np.array_equal(buffer[:12 * 20 * 3].view(12, 20, 3).numpy(), pil_rgb(data[0]))
    assert np.array_equal(buffer[12 * 20 * 3:-5].view(14, 10, 3).numpy(), pil_rgb(data[1]))
    assert not buffer[-5:].any()
    crop = torch.zeros(3, 4, 3, dtype=torch.uint8), torch.zeros(A.NUM_PARAMS, dtype=torch.float64)
    assert CropBatch.collate([crop]).files.dtype == torch.uint8


def test_crop_batch_moves_its_pixels_as_tensor_to_does():
    """to(device) moves the pixel buffer (the meta device stands for an accelerator) and keeps the
    host arrays; flat_images builds its buffer, padding included, on that device. Like Tensor.to,
    the copy blocks unless non_blocking=True (tests/host_transfers.py)."""
    pixels = torch.arange(2 * 3 * 3, dtype=torch.uint8).view(2, 3, 3)
    batch = CropBatch.collate([(pixels, torch.zeros(A.NUM_PARAMS, dtype=torch.float64))])
    moved = batch.to("meta")
    assert moved.pixels.device.type == "meta" and moved.pixels.shape == batch.pixels.shape
    assert moved.sizes is batch.sizes and moved.params is batch.params and moved.files is batch.files
    buffer, offsets, widths = moved.flat_images(pad_bytes=4)
    assert buffer.device.type == "meta" and buffer.shape == (18 + 4,) and buffer.dtype == torch.uint8
    with BlockingTransfers("cpu") as blocking:
        batch.to("cpu")
    with BlockingTransfers("cpu") as overlapping:
        batch.to("cpu", non_blocking=True)
    assert len(blocking.calls) == 1 and overlapping.calls == []


# ---------------------------------------------------------------- decoding JPEG files on the accelerator

@pytest.fixture
def jpeg_files():
    """A colour and a greyscale JPEG, as decode_jpegs takes them, with PIL's RGB decode of each."""
    data = [jpeg(random_image(9, size=(24, 16))), jpeg(random_image(10, size=(12, 20)).convert("L"))]
    return [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data], [pil_rgb(d) for d in data]


def test_decode_jpegs_gives_rgb_images(jpeg_files):
    files, expected = jpeg_files
    images = decode_jpegs(files, [0, 1], "cpu")
    assert [image.permute(1, 2, 0).numpy().tolist() for image in images] == [e.tolist() for e in expected]


def test_decode_jpegs_falls_back_file_by_file_then_to_the_host(monkeypatch, jpeg_files):
    """A device decoder that rejects some files (a fault injected into torchvision's decode_jpeg as
    decode_jpegs calls it, as nvJPEG rejects some files): the batch fails, each file is decoded
    alone, the rejected ones on the host, a CMYK JPEG as the CPU path decodes it; every image is
    RGB and equals PIL's decode, and the host images' copies to the device do not block."""
    files, expected = jpeg_files
    cmyk = jpeg(random_image(12, size=(20, 10)).convert("CMYK"))
    files, expected = [*files, torch.frombuffer(bytearray(cmyk), dtype=torch.uint8)], [*expected, pil_rgb(cmyk)]
    real, calls = crops.decode_jpeg, []

    def rejects_the_colour_and_cmyk_files(data, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        if any(f is files[0] or f is files[2] for f in (data if isinstance(data, list) else [data])):
            raise RuntimeError("injected decoder failure")
        return real(data, **kwargs)

    monkeypatch.setattr(crops, "decode_jpeg", rejects_the_colour_and_cmyk_files)
    with BlockingTransfers("cpu") as transfers:
        images = decode_jpegs(files, [3, 4, 5], "cpu")
    assert calls == [3, 1, 1, 1] and transfers.calls == []
    assert [image.permute(1, 2, 0).numpy().tolist() for image in images] == [e.tolist() for e in expected]


def test_a_jpeg_file_no_decoder_decodes_is_an_error_naming_its_row():
    """data.decode_on=device: a JPEG that passes the worker's checks but that neither torchvision nor
    simplejpeg nor PIL decodes stops the batch with one line naming its dataset row, both decoders'
    errors and the setting that counts and replaces such files."""
    good = jpeg(random_image(11, size=(32, 24)))
    images = [{"bytes": good, "path": None}, {"bytes": with_second_soi(good), "path": None}]
    cfg = recipe(img_size=16)
    cfg["data"]["decode_on"] = "device"
    dataset = D.build_image_dataset(class_dataset(images, [0, 1]), cfg, train=False, num_classes=3)
    batch = dataset.collate([dataset[0], dataset[1]])[0]
    assert batch.params[:, A.JPEG].tolist() == [1, 1]
    with pytest.raises(InputError) as error:
        dataset.batch_transform("cpu")(batch)
    assert str(error.value) == (
        "row 1: a JPEG that passed the worker's checks decodes neither on the device (RuntimeError) nor on the "
        "host (OSError: broken data stream when reading image file); set data.decode_on=cpu to have such "
        "files counted and replaced")
