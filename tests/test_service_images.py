"""The HTTP service on an image run: base64 images in (`POST /v1/predict/images`), the same answer as the
library, limits on images per request, bytes and pixels per image (422) and on the body (413); texts go
nowhere near an image run's file system, and `/v1/predict` for texts is unchanged."""

from __future__ import annotations

import base64
import re
import io
import shutil

import numpy as np
import pytest
from PIL import Image

import s3t
from s3t.service.settings import ServiceSettings
from servicekit import InProcessServer, make_token


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(trained_image_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("svc-images") / "run"
    shutil.copytree(trained_image_dir, run_dir)
    token = make_token(run_dir, "predict", name="images", rate=1e6)
    settings = ServiceSettings(worker=False, preload=False, max_image_bytes=20_000, max_image_pixels=100 * 100,
                               max_body_bytes=200_000)
    with InProcessServer(run_dir, settings) as srv, srv.client(token) as client:
        yield srv, client


def test_base64_images_get_the_library_answer(server, tiny_image_data):
    srv, client = server
    images = list(tiny_image_data.inputs[:5])
    r = client.post("/v1/predict/images", json={"images": [b64(i) for i in images]})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = srv.service.system.classify(images)
    assert body["served_version"] == expected.served_version and body["labels"] == list(tiny_image_data.labels)
    assert [p["label"] for p in body["predictions"]] == list(expected.labels)
    assert [list(p["probabilities"].values()) for p in body["predictions"]] == expected.probabilities.tolist()


@pytest.mark.parametrize("images, match", [
    (["not base64!"], "not valid base64"),
    ([b64(b"GIF89a" + bytes(40))], r"image 0 is not a readable image file|is GIF"),
    ([b64(png(8, 8)), b64(b"\x89PNG\r\n\x1a\n garbage")], r"image 1 is not a readable image file"),
    ([b64(png(101, 100))], r"image 0 is 101x100 = 10,100 pixels; the limit is 10,000"),
    ([b64(bytes(np.random.default_rng(0).integers(0, 256, 30_000, dtype=np.uint8)))], r"30,000 bytes; the limit is 20,000"),
    ([b64(png(4, 4))] * 65, r"at most 64 items"),
    ([], r"at least 1 item"),
])
def test_bad_images_are_422_and_name_the_image(server, images, match):
    _srv, client = server
    r = client.post("/v1/predict/images", json={"images": images})
    assert r.status_code == 422, r.text
    assert re.search(match, r.text), r.text


def test_a_body_over_the_limit_is_413(server):
    _srv, client = server
    r = client.post("/v1/predict/images", json={"images": ["A" * 200_000]})
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"


def test_texts_never_reach_an_image_run(server, tmp_path):
    _srv, client = server
    (tmp_path / "secret.png").write_bytes(png(8, 8))
    r = client.post("/v1/predict", json={"texts": [str(tmp_path / "secret.png")]})
    assert r.status_code == 422 and "POST them base64-encoded to /v1/predict/images" in r.text


def test_images_sent_to_a_text_run_are_422(trained_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_dir, run_dir)
    token = make_token(run_dir, "predict", name="t")
    with InProcessServer(run_dir, ServiceSettings(worker=False, preload=False)) as srv, srv.client(token) as client:
        r = client.post("/v1/predict/images", json={"images": [b64(png(8, 8))]})
        assert r.status_code == 422 and "this run does not classify images: send texts to /v1/predict" in r.text
        assert client.post("/v1/predict", json={"texts": ["a text"]}).status_code == 200
        schema = client.get("/openapi.json").json()
    texts = schema["components"]["schemas"]["PredictRequest"]
    assert texts["required"] == ["texts"] and set(texts["properties"]) == {"texts"}   # unchanged
    images = schema["components"]["schemas"]["PredictImagesRequest"]["properties"]["images"]
    assert images["maxItems"] == 64 and images["items"]["maxLength"] == 4 * ((16 << 20) // 3 + 1)


def test_settings_refuse_nonsense_limits():
    with pytest.raises(s3t.PlanError, match="`max_image_pixels` must be an integer >= 1"):
        ServiceSettings(max_image_pixels=0)
