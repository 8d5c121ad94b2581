"""Image records (s3t.images, ImageRecord, Dataset loaders): every way of giving an image yields the same stored
bytes and pixels, files are kept as they are, and bad input gets one line naming it."""

from __future__ import annotations

import io
import json
import zlib

import numpy as np
import pytest
from PIL import Image

import s3t
from s3t import images
from s3t.errors import DataError
from s3t.records import ImageRecord, from_payload, payload


def pixels(seed: int = 0, shape=(12, 10, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **kwargs)
    return out.getvalue()


def decoded(data: bytes, mode: str = "RGB") -> np.ndarray:
    return np.asarray(images.decode(data, mode))


def test_an_array_is_stored_losslessly_and_every_form_gives_the_same_pixels(tmp_path):
    array = pixels()
    (tmp_path / "a.png").write_bytes(encoded(array))
    forms = [array, Image.fromarray(array), encoded(array), str(tmp_path / "a.png"), tmp_path / "a.png"]
    stored = [images.to_bytes(f, where="test") for f in forms]
    assert all(np.array_equal(decoded(b), array) for b in stored)   # lossless
    assert stored[3] == stored[4] == (tmp_path / "a.png").read_bytes()   # a file's bytes are kept as they are
    grey = pixels(shape=(9, 7))
    assert np.array_equal(decoded(images.to_bytes(grey, where="g"), "L"), grey)
    assert np.array_equal(decoded(images.to_bytes(grey[:, :, None], where="g"), "L"), grey)


def test_a_jpeg_file_is_kept_byte_for_byte(tmp_path):
    jpeg = encoded(pixels(1, (16, 16, 3)), "JPEG", quality=90)
    (tmp_path / "x.jpg").write_bytes(jpeg)
    data = s3t.Dataset.from_records([{"id": "x", "image": str(tmp_path / "x.jpg"), "label": "a"}])
    assert data[0].image == jpeg and data.kind == "image" and data.labels == ("a",)


def test_image_records_round_trip_through_the_registry_payload():
    record = ImageRecord("r1", encoded(pixels()), "cat", subject="u")
    first, second = payload(record)
    assert first == record.image and second == b"cat"
    assert from_payload("image", "r1", (first, second)) == ImageRecord("r1", record.image, "cat")
    assert "bytes>" in repr(record) and len(repr(record)) < 200   # the bytes are not dumped


def test_jsonl_and_csv_paths_are_relative_to_the_data_file(tmp_path):
    (tmp_path / "img").mkdir()
    for k in range(2):
        (tmp_path / "img" / f"{k}.png").write_bytes(encoded(pixels(k)))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"id": f"i{k}", "image": f"img/{k}.png", "label": f"l{k}",
                                                             "subject": "s"}) + "\n" for k in range(2)))
    (tmp_path / "data.csv").write_text("id,image,label,risk\ni0,img/0.png,l0,0.5\ni1,img/1.png,l1,\n")
    a, b = s3t.Dataset.from_jsonl(tmp_path / "data.jsonl"), s3t.Dataset.from_csv(tmp_path / "data.csv")
    assert a.inputs == b.inputs == ((tmp_path / "img/0.png").read_bytes(), (tmp_path / "img/1.png").read_bytes())
    assert a.get("i0").subject == "s" and b.get("i0").risk == 0.5 and repr(a) == "Dataset(2 records, 2 labels)"


def test_image_folder_layout(tmp_path):
    for label, names in {"cat": ["b.png", "a.jpg", "sub/c.PNG"], "dog": ["z.jpeg"]}.items():
        for name in names:
            path = tmp_path / label / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encoded(pixels(len(name)), "JPEG" if "jp" in name else "PNG"))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")   # other files are ignored
    (tmp_path / ".hidden").mkdir()
    data = s3t.Dataset.from_image_folder(tmp_path)
    assert data.ids == ("cat/a.jpg", "cat/b.png", "cat/sub/c.PNG", "dog/z.jpeg")
    assert [r.label for r in data] == ["cat", "cat", "cat", "dog"]
    assert data.get("cat/b.png").image == (tmp_path / "cat" / "b.png").read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"label folder .*empty.* holds no .png/.jpg/.jpeg files"):
        s3t.Dataset.from_image_folder(tmp_path)
    with pytest.raises(DataError, match="No such image folder"):
        s3t.Dataset.from_image_folder(tmp_path / "nope")


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing.png", r"does not exist: .*missing.png"),
    (lambda p: p, r"is a folder, not a file"),
    (lambda p: b"\x89PNG\r\n\x1a\nthis is not a png", r"not a readable image file; use PNG or JPEG"),
    (lambda p: encoded(pixels())[:-40], r"damaged \(.*\); re-save it"),   # truncated
    (lambda p: encoded(pixels(), "GIF"), r"is GIF; s3t reads PNG and JPEG: convert it"),
    (lambda p: encoded(pixels(), "BMP"), r"is BMP; s3t reads PNG and JPEG"),
    (lambda p: pixels().astype(np.float32) / 255, r"has dtype float32; give uint8 pixel values"),
    (lambda p: pixels(shape=(4, 4, 2)), r"has shape \(4, 4, 2\)"),
    (lambda p: 3.5, r"must be a file path, PNG/JPEG bytes, a PIL image or a numpy array; got float"),
])
def test_bad_images_get_one_line_naming_them(tmp_path, make, match):
    with pytest.raises(DataError, match=match) as info:
        s3t.Dataset.from_records([{"id": "bad", "image": make(tmp_path), "label": "x"}])
    assert "records[0]" in str(info.value) and "\n" not in str(info.value)


def test_size_limits_are_checked_before_decoding():
    big = encoded(np.zeros((300, 400), dtype=np.uint8))   # compresses to a few hundred bytes
    with pytest.raises(DataError, match=r"is 400x300 = 120,000 pixels; the limit is 100,000. Downscale it"):
        images.to_bytes(big, where="x", max_pixels=100_000)
    with pytest.raises(DataError, match=r"the limit is 100\b"):
        images.to_bytes(big, where="x", max_bytes=100)
    # a decompression bomb: a tiny PNG whose header claims 20,000 x 20,000 pixels
    bomb = encoded(np.zeros((1, 1), dtype=np.uint8))
    for side, match in ((10_000, r"10000x10000 = 100,000,000 pixels; the limit is 50,000,000"),
                        (20_000, r"more than 50,000,000 pixels \(the limit\)")):   # past Pillow's own bomb check
        header = bytearray(bomb)
        header[16:24] = side.to_bytes(4, "big") * 2   # IHDR width and height
        header[29:33] = zlib.crc32(bytes(header[12:29])).to_bytes(4, "big")   # the IHDR chunk's CRC, so it parses
        with pytest.raises(DataError, match=match):
            images.to_bytes(bytes(header), where="bomb")
    assert images.MAX_IMAGE_PIXELS == 50_000_000 and images.MAX_IMAGE_BYTES == 32 << 20


def test_exif_orientation_is_applied():
    array = pixels(2, (6, 10, 3))
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6   # "rotate 90 degrees clockwise to display"
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif, quality=100)
    assert decoded(out.getvalue()).shape == (10, 6, 3)


def test_synthetic_images_are_deterministic_and_labelled_by_shape():
    a = s3t.datasets.synthetic_images(12, num_labels=4, num_subjects=3, size=16, seed=5)
    assert a == s3t.datasets.synthetic_images(12, num_labels=4, num_subjects=3, size=16, seed=5)
    assert a != s3t.datasets.synthetic_images(12, num_labels=4, num_subjects=3, size=16, seed=6)
    assert a.labels == ("label-0", "label-1", "label-2", "label-3") and {r.subject for r in a} <= {"user-0", "user-1",
                                                                                                  "user-2"}
    assert decoded(a[0].image).shape == (16, 16, 3)
    with pytest.raises(DataError, match="`num_labels` must be at most 24"):
        s3t.datasets.synthetic_images(4, num_labels=25)


def test_a_dataset_holds_one_kind():
    with pytest.raises(DataError, match="a dataset holds one kind of record"):
        s3t.Dataset.from_records([{"id": "a", "image": pixels(), "label": "x"}, {"id": "b", "text": "t", "label": "x"}])
