"""The ViT family (s3t.models.vision) on tiny random encoders of every supported type: structure found in the
loaded modules, block ranges that equal the model's own forward bit for bit, pooling as the model's own
classifier pools, preprocessing from the folder's image-processor config and independent of the batch; and
an image run through the library and the CLI (paths, bytes, PIL images and arrays give the same answer)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import s3t
from s3t.errors import DataError, PlanError
from s3t.models import family, load_model
from tiny_models import VISION, save_tiny_vit

SETTINGS = dict(num_groups=2, blocks_per_group=1, max_length=0, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                lora_targets=None, num_labels=3, slots=3)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return list(s3t.datasets.synthetic_images(6, num_labels=3, seed=4).inputs)


_LOADED: dict = {}


@pytest.fixture(params=VISION)
def vit(request, tmp_path_factory):
    """Per model type: 4 blocks, 2 groups of 1 block, 3 slots, random LoRA weights (B is zero at init)."""
    t = request.param
    if t not in _LOADED:
        model = load_model(save_tiny_vit(t, tmp_path_factory.mktemp(t)), **SETTINGS)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        _LOADED[t] = model
    _LOADED[t].set_active(0)
    return _LOADED[t]


def test_vision_types_are_supported_and_others_are_named():
    assert {family(t).__name__ for t in VISION} == {"ImageEncoder"}
    for other in ("vit_mae", "beit", "swin"):
        with pytest.raises(PlanError, match=rf"model_type '{other}', which s3t cannot cut.*supported: .*vit_msn"):
            family(other)


def test_structure_and_lora_targets(vit):
    assert vit.lora_targets == ("q_proj", "v_proj")   # found among the loaded projections (transformers 5 names)
    assert vit.group_blocks == {1: [3], 2: [2]}
    adapted = {}
    for name, module in vit.model.named_modules():
        if hasattr(module, "lora_A") and len(module.lora_A):
            block = int(name[len(vit.blocks_path) + 1:].split(".")[0])
            adapted.setdefault(block, set()).update(module.lora_A.keys())
            assert name.rsplit(".", 1)[-1] in ("q_proj", "v_proj")
    assert adapted == {2: {"g2", "s1g2", "s2g2"}, 3: {"g1", "s1g1", "s2g1"}}


def test_pieces_equal_the_model_forward_and_its_own_pooling(vit, images):
    batch = vit.prepare(images)
    t = vit.model.config.model_type
    outputs = {}
    for depth in (0, 1, 2):
        vit.set_active(depth)
        with torch.no_grad():
            ref = vit.model(pixel_values=batch["pixel_values"]).last_hidden_state   # after the final layernorm
            cut = vit.run_blocks(vit.embed(batch), batch, 0, 2)
            mine = vit.model.layernorm(vit.run_blocks(cut, batch, 2, 4))
            logits = vit.output(vit.run_blocks(cut, batch, 2, 4), batch)
        assert torch.equal(mine, ref)
        pooled = (ref.mean(1) if t == "ijepa" else ref[:, :vit.model.config.n_cls_tokens].mean(1) if t == "pixio"
                  else ref[:, 0])
        assert torch.equal(logits, vit.heads[0](pooled))
        outputs[depth] = logits
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])


def test_pixels_follow_the_processor_config_and_never_depend_on_the_batch(vit, images):
    one = vit.prepare(images[:1])["pixel_values"]
    assert one.shape == (1, 3, 16, 16)
    for rows in ([2, 0, 1], [0, 0, 0, 0, 5]):
        batch = vit.prepare([images[r] for r in rows])["pixel_values"]
        assert torch.equal(batch[rows.index(0)], one[0])
    # the folder's config (save_tiny_vit: resize 20 -> 16 px, mean 0.4/0.5/0.6, std 0.2/0.25/0.3)
    resized = np.asarray(Image.open(io.BytesIO(images[0])).convert("RGB").resize((16, 16), Image.BILINEAR),
                         dtype=np.float32) / 255
    expected = (resized - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.25, 0.3])
    assert np.allclose(one[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_without_a_processor_config_vit_defaults_apply(tmp_path, images):
    model = load_model(save_tiny_vit("vit", tmp_path, image_size=12, patch=4, processor=False), **SETTINGS)
    pixels = model.prepare(images[:1])["pixel_values"]
    assert pixels.shape == (1, 3, 12, 12) and -1.0 <= pixels.min() and pixels.max() <= 1.0   # mean = std = 0.5


def test_grey_models_get_grey_pixels(tmp_path, images):
    from transformers import AutoModel, ViTConfig, ViTImageProcessor

    config = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4, num_channels=1)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(tmp_path)
    model = load_model(tmp_path, **SETTINGS)
    batch = model.prepare(images[:2])
    assert batch["pixel_values"].shape == (2, 1, 16, 16) and model.top(model.embed(batch), batch, 0).shape == (2, 3)


def test_a_stage_from_cached_trunk_states_is_exact_and_isolated(vit, images):
    batch = vit.prepare(images)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    start = vit.group_start(2)
    vit.set_active(2, train_group=2)
    params = [p for p in vit.parameters() if p.requires_grad]
    names = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert names == {n for n in names if ".g2." in n} | {"heads.0.weight", "heads.0.bias"}
    full = vit.loss(vit.top(vit.embed(batch), batch, 0), batch, targets)
    full_grads = torch.autograd.grad(full, params)
    with torch.no_grad():
        trunk = vit.run_blocks(vit.embed(batch), batch, 0, start)
    cached = vit.loss(vit.top(trunk, batch, start), batch, targets)
    assert torch.equal(full, cached)
    assert all(torch.equal(a, b) for a, b in zip(full_grads, torch.autograd.grad(cached, params)))
    vit.set_active(0)


# -- an image run --------------------------------------------------------------------------------
@pytest.fixture
def image_run(trained_image_dir, tmp_path):
    import shutil

    shutil.copytree(trained_image_dir, tmp_path / "run")
    system = s3t.S3T.open(tmp_path / "run")
    yield system
    system.close()


def test_predict_takes_images_in_every_form(image_run, tiny_image_data, tmp_path):
    record = tiny_image_data[7]
    array = np.asarray(Image.open(io.BytesIO(record.image)))
    (tmp_path / "x.png").write_bytes(record.image)
    forms = [record.image, str(tmp_path / "x.png"), tmp_path / "x.png", Image.fromarray(array), array]
    proba = image_run.predict_proba(forms)
    assert proba.shape == (5, 3) and all(np.array_equal(proba[0], row) for row in proba)
    # an (N, H, W, C) array is N images (compared at the same batch size: CPU kernels block rows by batch)
    assert np.array_equal(image_run.predict_proba(array[None]), image_run.predict_proba([record.image]))
    assert image_run.kind == "image" and image_run.score(tiny_image_data) > 0.6
    assert image_run.predict([]) == []
    for single in (record.image, str(tmp_path / "x.png"), array, Image.fromarray(array)):
        with pytest.raises(DataError, match="not a single image; wrap it"):
            image_run.predict(single)
    with pytest.raises(DataError, match=r"image 1 .* not a readable image file"):
        image_run.predict([record.image, b"not an image"])


def test_an_image_run_refuses_text_data(make_run, tiny_image_plan, tiny_data, tmp_path):
    with pytest.raises(DataError, match=r"trains on labelled images \{id, image, label\}, but the data holds labelled "
                                        r"texts"):
        s3t.S3T.create(tmp_path / "texts", tiny_image_plan, tiny_data)


def test_cli_trains_from_an_image_folder_and_predicts_image_files(tmp_path, tiny_vit):
    from s3t.cli import app

    data = s3t.datasets.synthetic_images(24, num_labels=2, seed=3)
    for r in data:
        path = tmp_path / "images" / r.label / f"{r.id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(r.image)
    (tmp_path / "plan.toml").write_text(f'num_shards = 1\nnum_slices = 2\nblocks_per_slice = 1\nepochs = 1\n'
                                        f'num_threads = 1\ndevice = "cpu"\nbase_model = "{tiny_vit}"\n')
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "run"), "--data", str(tmp_path / "images"),
                                 "--plan", str(tmp_path / "plan.toml"), "--quiet"])
    assert result.exit_code == 0, result.output
    files = [str(tmp_path / "images" / r.label / f"{r.id}.png") for r in list(data)[:3]]
    result = runner.invoke(app, ["predict", str(tmp_path / "run"), *files, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    system = s3t.S3T.open(tmp_path / "run")
    expected = system.predict_proba(files)
    system.close()
    assert [o["label"] for o in out] == [["label-0", "label-1"][k] for k in expected.argmax(1)]
    assert [list(o["probabilities"].values()) for o in out] == [list(map(float, row)) for row in expected]
    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(tmp_path / "missing.png")])
    assert result.exit_code == 1 and "does not exist" in result.output
