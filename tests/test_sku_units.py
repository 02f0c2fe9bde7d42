"""Unit tests of the sku_index pipeline's library: catalog, augmentation, encoder, encode loop, index."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mlprep.devices import select_precision
from mlprep.encoders import ClipEncoder, ModelSpec
from mlprep.failures import FailureLog, ItemError, ItemFailedError
from mlprep.sku.augment import AugmentSettings, ViewParams, original_view, read_image_file, render_views, sample_view
from mlprep.sku.catalog import read_catalog
from mlprep.sku.encode import ViewPlan, encode_items
from mlprep.indexing import build_index, recall_at_k
from mlprep.sku.index import merge_shards, rank_skus
from mlprep.io import save_npy, write_parquet
from mlprep.views import decode_image

from conftest import make_catalog


def _img(path, colour=(200, 30, 30), size=(120, 90)):
    Image.new("RGB", size, colour).save(path)
    return path


# ---------------------------------------------------------------- catalog


@pytest.mark.parametrize(
    "data",
    [
        [{"sku_id": "A", "name": "Apple", "category": "fruit", "images": ["a.jpg"]}],
        {"skus": [{"id": "A", "title": "Apple", "category": "fruit", "image_paths": ["a.jpg"]}]},
        {"A": {"name": "Apple", "category": "fruit", "image": "a.jpg"}},
        {"products": [{"sku": "A", "name": "Apple", "category": "fruit", "image_files": "a.jpg"}]},
    ],
)
def test_catalog_accepts_the_documented_shapes(tmp_path, data):
    (tmp_path / "img").mkdir()
    _img(tmp_path / "img" / "a.jpg")
    (tmp_path / "s.json").write_text(json.dumps(data))
    catalog = read_catalog(tmp_path / "s.json", tmp_path / "img", 4)
    assert catalog.failures == []
    [item] = catalog.items
    assert (item.item_id, item.sku_id, item.name, item.category, item.image) == ("A/a.jpg", "A", "Apple", "fruit", "a.jpg")


def test_catalog_records_every_problem(tmp_path):
    (tmp_path / "img").mkdir()
    _img(tmp_path / "img" / "ok.jpg")
    data = [
        {"sku_id": "A", "images": ["ok.jpg", "missing.jpg"]},
        {"sku_id": "A", "images": ["ok.jpg"]},  # duplicate id
        {"sku_id": "B", "images": []},  # no images
        {"name": "no id", "images": ["ok.jpg"]},
        {"sku_id": "C", "images": ["../outside.jpg", "/etc/passwd"]},
        "not an object",
    ]
    (tmp_path / "s.json").write_text(json.dumps(data))
    catalog = read_catalog(tmp_path / "s.json", tmp_path / "img", 2)
    assert [i.item_id for i in catalog.items] == ["A/ok.jpg"]
    reasons = {(f.item_id, f.reason.split(" (")[0].split(":")[0]) for f in catalog.failures}
    assert ("A/missing.jpg", "image file not found") in reasons
    assert ("A", "duplicate SKU id; the first entry is kept") in reasons
    assert ("B", "SKU has no images") in reasons
    assert ("", "SKU has no id") in reasons
    assert any(f.item_id == "C/../outside.jpg" and "escapes" in f.reason for f in catalog.failures)
    assert any(f.item_id == "C//etc/passwd" and "must be relative" in f.reason for f in catalog.failures)
    assert any("not an object" in f.reason for f in catalog.failures)
    assert len(catalog.failures) == 7


@pytest.mark.parametrize("text", ["", "[]", "{}", "{not json"])
def test_catalog_empty_or_broken_json_is_a_failure_naming_the_file(tmp_path, text):
    (tmp_path / "s.json").write_text(text)
    catalog = read_catalog(tmp_path / "s.json", tmp_path, 2)
    assert catalog.items == []
    [failure] = catalog.failures
    assert failure.path == str(tmp_path / "s.json")


def test_catalog_shards_do_not_move_when_skus_are_added(tmp_path):
    make_catalog(tmp_path, 10, 1)
    before = {i.item_id: i.shard for i in read_catalog(tmp_path / "sku_data.json", tmp_path / "images", 4).items}
    data = json.loads((tmp_path / "sku_data.json").read_text())
    data.insert(0, {"sku_id": "new", "images": [data[0]["images"][0]]})
    (tmp_path / "sku_data.json").write_text(json.dumps(data))
    after = {i.item_id: i.shard for i in read_catalog(tmp_path / "sku_data.json", tmp_path / "images", 4).items}
    assert {k: after[k] for k in before} == before


# ---------------------------------------------------------------- augmentation


def test_decode_image_reduces_large_jpegs_and_keeps_rgb(tmp_path):
    _img(tmp_path / "big.jpg", (255, 0, 0), (1600, 1200))
    image = decode_image(read_image_file(tmp_path / "big.jpg"), 224)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert 224 <= min(image.shape[1:]) < 448
    assert image[0].float().mean() > 240 and image[1].float().mean() < 15  # red stays red


def test_decode_image_rejects_truncated_and_garbage(tmp_path):
    _img(tmp_path / "ok.jpg", size=(400, 300))
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    for name, code in [("trunc.jpg", "truncated"), ("junk.jpg", "not_an_image"), ("gone.jpg", "missing")]:
        with pytest.raises(ItemError) as caught:
            decode_image(read_image_file(tmp_path / name), 64)
        assert caught.value.code == code, name


def test_original_view_is_the_centre_crop():
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    image[:, :, 50:150] = 255  # the centre square is white, the sides black
    [view] = render_views(image, [original_view(200, 100)], 50)
    assert view.float().mean() > 250


def test_views_are_seeded_and_different():
    settings = AugmentSettings()
    a = sample_view(settings, 1, "s", "item", 1, 640, 480)
    assert a == sample_view(settings, 1, "s", "item", 1, 640, 480)
    assert a != sample_view(settings, 1, "s", "item", 2, 640, 480)
    assert a != sample_view(settings, 2, "s", "item", 1, 640, 480)
    assert a != sample_view(settings, 1, "q", "item", 1, 640, 480)
    image = torch.randint(0, 255, (3, 120, 160), dtype=torch.uint8)
    params = [original_view(160, 120)] + [sample_view(settings, 1, "s", "item", k, 160, 120) for k in (1, 2, 3)]
    views = render_views(image, params, 64)
    assert views.shape == (4, 3, 64, 64) and views.dtype == torch.uint8
    assert torch.equal(views, render_views(image, params, 64))
    assert len({v.numpy().tobytes() for v in views}) == 4


def test_a_views_parameters_are_stored_as_the_json_of_all_its_fields():
    """The index's `augmentation` column: ViewParams.as_json is json.dumps(asdict(p), sort_keys=True), text for text
    (flips, blur, the original view and query views included), and gives the parameters back."""
    from dataclasses import asdict

    settings = AugmentSettings(flip_prob=0.5, blur_prob=0.5)
    params = [original_view(640, 480), original_view(300, 700)]
    params += [sample_view(settings, seed, stream, f"item{k}", k, 640, 480)
               for seed in (1, 2) for stream in ("s", "q") for k in range(1, 40)]
    assert {p.flip for p in params} == {False, True} and any(p.blur_sigma > 0 for p in params)
    for p in params:
        assert p.as_json() == json.dumps(asdict(p), sort_keys=True)
        assert json.loads(p.as_json()) == json.loads(json.dumps(asdict(p)))


def test_colour_jitter_and_blur_do_what_they_say():
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[0] = 200
    image[:, :, 32:] = 40  # a vertical edge
    base = original_view(64, 64)
    brighter = base.__class__(**{**base.as_dict(), "brightness": 1.2})
    grey = base.__class__(**{**base.as_dict(), "saturation": 0.0})
    blurred = base.__class__(**{**base.as_dict(), "blur_sigma": 2.0})
    plain, b, g, bl = render_views(image, [base, brighter, grey, blurred], 64).float()
    assert b.mean() > plain.mean()
    assert (g[0] - g[1]).abs().max() <= 1  # no saturation: channels equal
    assert (bl[:, :, 31] - bl[:, :, 32]).abs().max() < (plain[:, :, 31] - plain[:, :, 32]).abs().max()


def test_augment_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="sku_index.augment: unknown keys sharpness"):
        AugmentSettings.from_config({"sharpness": 1})


# ---------------------------------------------------------------- encoder


def test_encoder_loads_a_local_checkpoint_and_normalises(tiny_clip):
    spec = ModelSpec.from_config(tiny_clip)
    enc = ClipEncoder(spec, torch.device("cpu"), torch.float32, batch_size=4)
    images = torch.randint(0, 255, (6, 3, 64, 64), dtype=torch.uint8)
    out = enc.encode_images(images)
    assert out.shape == (6, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    # padding makes each row independent of its batch-mates: bit-identical
    np.testing.assert_array_equal(enc.encode_images(images[2:3]), out[2:3])
    texts = enc.encode_texts(["a red can", "a blue box"])
    assert texts.shape == (2, 32)
    # the checkpoint really was loaded: a second encoder built from it agrees exactly
    again = ClipEncoder(spec, torch.device("cpu"), torch.float32, batch_size=4)
    np.testing.assert_array_equal(again.encode_images(images), out)


def test_encoder_bf16_is_close_to_fp32(tiny_clip):
    spec = ModelSpec.from_config(tiny_clip)
    images = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    fp32 = ClipEncoder(spec, torch.device("cpu"), torch.float32, 4).encode_images(images)
    bf16 = ClipEncoder(spec, torch.device("cpu"), select_precision("bf16", torch.device("cpu")), 4).encode_images(images)
    assert (fp32 * bf16).sum(axis=1).min() > 0.98


def test_encoder_errors_name_the_missing_file(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ClipEncoder(ModelSpec(tiny_clip["name"], str(tmp_path / "nope.pt"), tiny_clip["config_file"]), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipEncoder(ModelSpec("no-such-model"), torch.device("cpu"), torch.float32)


def test_random_weights_are_announced_and_the_same_in_every_process(caplog, tiny_clip):
    import logging

    caplog.set_level(logging.WARNING)
    spec = ModelSpec.from_config({"name": tiny_clip["name"], "config_file": tiny_clip["config_file"]}, seed=5)
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    first = ClipEncoder(spec, torch.device("cpu"), torch.float32, 2).encode_images(images)
    assert "RANDOM weights" in caplog.text
    torch.manual_seed(123)  # whatever the global RNG holds, the same seed builds the same random model
    np.testing.assert_array_equal(ClipEncoder(spec, torch.device("cpu"), torch.float32, 2).encode_images(images), first)
    other = ModelSpec.from_config({"name": tiny_clip["name"], "config_file": tiny_clip["config_file"]}, seed=6)
    assert not np.allclose(ClipEncoder(other, torch.device("cpu"), torch.float32, 2).encode_images(images), first)


# ---------------------------------------------------------------- encode loop and index


@pytest.mark.parametrize("workers", [0, 1])
def test_encode_items_counts_views_and_records_bad_files(tiny_clip, tmp_path, workers):
    make_catalog(tmp_path, 3, 1)
    (tmp_path / "images" / "bad.jpg").write_bytes(b"garbage")
    (tmp_path / "sku_data.json").write_text(
        json.dumps(json.loads((tmp_path / "sku_data.json").read_text()) + [{"sku_id": "bad", "images": ["bad.jpg"]}])
    )
    catalog = read_catalog(tmp_path / "sku_data.json", tmp_path / "images", 1)
    enc = ClipEncoder(ModelSpec.from_config(tiny_clip), torch.device("cpu"), torch.float32, 4)
    plan = ViewPlan(seed=3, augment_per_image=2, queries_per_image=1, settings=AugmentSettings(), image_size=64)
    failures = FailureLog(True)
    out = encode_items(catalog.items, plan, enc, failures, workers=workers)
    assert out.items_ok == 3 and len(failures) == 1
    assert failures.records[0].path.endswith("bad.jpg") and failures.records[0].stage == "decode"
    assert failures.records[0].reason_code == "not_an_image"
    assert out.index_vectors.shape == (9, 32) and len(out.index_meta) == 9
    assert out.query_vectors.shape == (3, 32) and len(out.query_meta) == 3
    assert out.index_meta["view"].tolist() == [0, 1, 2] * 3
    with pytest.raises(ItemFailedError, match="bad.jpg"):
        encode_items(catalog.items, plan, enc, FailureLog(False), workers=workers)


def test_merge_is_independent_of_shard_layout(tmp_path):
    rng = np.random.default_rng(0)
    import pandas as pd

    meta = pd.DataFrame({"item_id": [f"i{n % 5}" for n in range(10)], "sku_id": "s", "image": "a.jpg",
                         "view": np.array([n // 5 for n in range(10)], np.int32), "augmentation": "", "content_hash": ""})
    vectors = rng.standard_normal((10, 4)).astype(np.float32)
    paths = []
    for shard, rows in enumerate([[0, 3, 7], [1, 2, 4, 5, 6, 8, 9]]):
        save_npy(vectors[rows], tmp_path / f"{shard}.npy")
        write_parquet(meta.iloc[rows], tmp_path / f"{shard}.parquet", "sku.shard_views")
        paths.append(shard)
    merged, merged_meta = merge_shards([tmp_path / "0.npy", tmp_path / "1.npy"], [tmp_path / "0.parquet", tmp_path / "1.parquet"])
    swapped, _ = merge_shards([tmp_path / "1.npy", tmp_path / "0.npy"], [tmp_path / "1.parquet", tmp_path / "0.parquet"])
    np.testing.assert_array_equal(merged, swapped)
    assert list(zip(merged_meta["item_id"], merged_meta["view"])) == sorted(zip(meta["item_id"], meta["view"]))


def test_index_factories_and_recall():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    flat = build_index(vectors, "Flat", 0, 1000)
    assert flat.metric_type == faiss.METRIC_INNER_PRODUCT and flat.ntotal == 2000
    assert recall_at_k(flat, vectors, vectors[:50], 10) == 1.0
    ivf = build_index(vectors, "IVF16,Flat", 0, 1000)
    ivf.nprobe = 16
    assert recall_at_k(ivf, vectors, vectors[:50], 10) == 1.0
    ivf.nprobe = 1
    assert recall_at_k(ivf, vectors, vectors[:50], 10) < 1.0
    hnsw = build_index(vectors, "HNSW32", 0, 1000)
    assert recall_at_k(hnsw, vectors, vectors[:50], 10) > 0.8
    with pytest.raises(ValueError, match="cannot build"):
        build_index(vectors, "NotAFactory", 0, 10)
    with pytest.raises(ValueError, match="could not train"):
        build_index(vectors[:10], "IVF1024,PQ4", 0, 10)


def test_rank_skus_counts_each_sku_once():
    vectors = np.eye(4, dtype=np.float32)
    vectors[1] = vectors[0] * 0.99 + vectors[1] * 0.01
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(4)
    index.add(vectors)
    skus = np.array(["a", "a", "b", "c"], dtype=object)
    [ranked] = rank_skus(index, skus, vectors[:1], k=3, fetch=1)
    assert ranked[0][0] == "a" and ranked[0][1] == pytest.approx(1.0)
    assert len({s for s, _ in ranked}) == len(ranked) == 3


def test_a_truth_table_of_query_photos_reads_in_every_format_and_names_what_is_wrong(tmp_path):
    from mlprep.sku.queries import TruthTableError, read_truth

    table = pd.DataFrame({"image": ["a.jpg", "shelf/b.png"], "sku_id": ["007", "B2"], "note": ["x", "y"]})
    table.to_csv(tmp_path / "t.csv", index=False)
    table.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    table.to_parquet(tmp_path / "t.parquet")
    table.to_json(tmp_path / "t.json", orient="records")
    for name in ("t.csv", "t.tsv", "t.parquet", "t.json"):
        got = read_truth(tmp_path / name)
        assert got.to_dict("list") == {"image": ["a.jpg", "shelf/b.png"], "sku_id": ["007", "B2"]}, name
    (tmp_path / "bad.csv").write_text("photo,sku_id\na.jpg,007\n")
    with pytest.raises(TruthTableError, match=r"bad.csv: no column 'image' .* it has 'photo', 'sku_id'"):
        read_truth(tmp_path / "bad.csv")
    (tmp_path / "blank.csv").write_text("image,sku_id\na.jpg,007\nb.jpg,\n")
    with pytest.raises(TruthTableError, match="blank.csv: row 2 has an empty image or sku_id"):
        read_truth(tmp_path / "blank.csv")
    (tmp_path / "empty.csv").write_text("image,sku_id\n")
    with pytest.raises(TruthTableError, match="empty.csv: the truth table has no rows"):
        read_truth(tmp_path / "empty.csv")
    with pytest.raises(TruthTableError, match="must be a .csv, .tsv, .parquet or .json"):
        read_truth(tmp_path / "t.xlsx")
    with pytest.raises(TruthTableError, match="no such file"):
        read_truth(tmp_path / "gone.csv")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TruthTableError, match="broken.parquet: cannot be read as a truth table"):
        read_truth(tmp_path / "broken.parquet")


def test_query_photo_accuracy_counts_unreadable_photos_as_misses_and_leaves_unknown_skus_out():
    from mlprep.sku.queries import query_photo_accuracy

    rows = pd.DataFrame({"sku_id": ["a", "b", "c", "z"], "in_catalog": [True, True, True, False],
                         "status": ["ok", "ok", "failed", "ok"],
                         "embedding_top": [["b", "a"], ["b", "a"], [], ["a", "b"]],
                         "reranked_top": [["a", "b"], ["b", "a"], [], ["a", "b"]],
                         "ranked_by": ["geometry", "embedding", "", "geometry"]})
    got = query_photo_accuracy(rows, [1, 2], reranked=True)
    assert got == {"n_queries": 3, "n_failed": 1, "n_not_in_catalog": 1,
                   "embedding": {"top1": 1 / 3, "top2": 2 / 3}, "reranked": {"top1": 2 / 3, "top2": 2 / 3},
                   "verified_first": 1 / 3}
    assert "reranked" not in query_photo_accuracy(rows, [1], reranked=False)


def test_embedding_parts_pair_each_vector_with_its_row_in_the_layout_autofaiss_reads(tmp_path):
    from mlprep.sku.steps import write_embedding_parts

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((12, 4)).astype(np.float32)
    meta = pd.DataFrame({"image": [f"{k}.jpg" for k in range(12)], "name": "Mug", "sku_id": [f"s{k // 3}" for k in range(12)],
                         "item_id": [f"s{k // 3}/{k}.jpg" for k in range(12)], "view": np.arange(12, dtype=np.int32) % 3,
                         "category": "kitchen"})
    assert write_embedding_parts(vectors, meta, tmp_path / "parts", rows_per_part=5) == 3
    npys = sorted((tmp_path / "parts" / "img_emb").iterdir())
    tables = sorted((tmp_path / "parts" / "metadata").iterdir())
    assert [p.name for p in npys] == ["img_emb_00000.npy", "img_emb_00001.npy", "img_emb_00002.npy"]
    assert [p.name for p in tables] == ["metadata_00000.parquet", "metadata_00001.parquet", "metadata_00002.parquet"]
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in npys]), vectors)
    rows = pd.concat([pd.read_parquet(p) for p in tables], ignore_index=True)
    assert rows["image_path"].tolist() == meta["image"].tolist() and rows["caption"].eq("Mug").all()
    assert [len(np.load(p)) for p in npys] == [len(pd.read_parquet(p)) for p in tables] == [5, 5, 2]


def test_the_eval_searches_a_seeded_sample_of_held_out_views_and_an_exact_index_once(monkeypatch):
    """Each held-out view is searched against every vector, three times over: past eval.max_queries the eval
    searches a seeded sample of them (the same whatever the order or shard split), and a built index that is itself
    exact is not searched a second time as its 'exact equivalent'."""
    from mlprep.sku import evaluate as ev

    meta = pd.DataFrame({"item_id": [f"i{k // 2}" for k in range(400)], "view": [k % 2 + 6 for k in range(400)]})
    rows = ev.sample_queries(meta, 50, seed=3)
    assert len(rows) == 50 and (np.diff(rows) > 0).all()
    picked = set(zip(meta["item_id"][rows], meta["view"][rows]))
    shuffled = meta.sample(frac=1, random_state=0).reset_index(drop=True)
    again = ev.sample_queries(shuffled, 50, seed=3)
    assert set(zip(shuffled["item_id"][again], shuffled["view"][again])) == picked
    assert set(zip(*(meta.iloc[ev.sample_queries(meta, 50, seed=4)][c] for c in ("item_id", "view")))) != picked
    assert (ev.sample_queries(meta, None, 3) == np.arange(400)).all()
    assert (ev.sample_queries(meta, 400, 3) == np.arange(400)).all()

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((60, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index_meta = pd.DataFrame({"sku_id": [f"s{k % 10}" for k in range(60)], "view": [k // 10 for k in range(60)]})
    queries = vectors[:12] + 0.05 * rng.standard_normal((12, 8)).astype(np.float32)
    query_meta = pd.DataFrame({"sku_id": [f"s{k % 10}" for k in range(12)]})
    searched = []
    real = ev.topk_accuracy
    monkeypatch.setattr(ev, "topk_accuracy", lambda index, *a: searched.append(index.ntotal) or real(index, *a))
    flat = ev.evaluate(ev.exact_index(vectors), vectors, index_meta, queries, query_meta, [1, 5])
    assert searched == [60, 10] and flat["augmented_exact"] == flat["augmented_index"]
    searched.clear()
    ivf = faiss.index_factory(8, "IVF2,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add(vectors)
    other = ev.evaluate(ivf, vectors, index_meta, queries, query_meta, [1, 5])
    assert searched == [60, 60, 10] and other["augmented_exact"] == flat["augmented_exact"]


def _reference_numbers(p, width: int, height: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One view's sampling matrix, colour matrix and shift, written out factor by factor for that view alone."""
    import math

    def eye_with(**entries):
        m = np.eye(3)
        for key, value in entries.items():
            m[int(key[1]), int(key[2])] = value
        return m

    x, y, w, h = p.crop
    a = math.radians(p.angle)
    warp = np.eye(3)
    if any(p.corners):
        src = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64)
        dst = src + np.asarray(p.corners).reshape(4, 2) * size
        rows, rhs = [], []
        for (sx, sy), (u, v) in zip(src, dst):
            rows += [[sx, sy, 1, 0, 0, 0, -u * sx, -u * sy], [0, 0, 0, sx, sy, 1, -v * sx, -v * sy]]
            rhs += [u, v]
        warp = np.append(np.linalg.solve(np.array(rows), np.array(rhs)), 1.0).reshape(3, 3)
    sampling = (eye_with(m02=(x + w / 2) * width, m12=(y + h / 2) * height)
                @ eye_with(m00=math.cos(a), m01=-math.sin(a), m10=math.sin(a), m11=math.cos(a))
                @ eye_with(m00=w * width / size, m11=h * height / size) @ eye_with(m00=-1.0 if p.flip else 1.0)
                @ eye_with(m02=-size / 2, m12=-size / 2) @ warp)
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    t = p.hue * 2 * math.pi
    c, s = math.cos(t) * p.saturation, math.sin(t) * p.saturation
    rotate = np.linalg.inv(to_yiq) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ to_yiq
    if p.saturation == 1 and p.hue == 0:
        rotate = np.eye(3)
    return (sampling, (rotate * (p.brightness * p.contrast)).astype(np.float32),
            (rotate.sum(axis=1) * (p.brightness * (1 - p.contrast))).astype(np.float32))


def test_a_views_numbers_are_its_own_whatever_views_are_made_with_it():
    """view_transforms makes the numbers of all an image's views at once (a reader's work for every view): each
    view's sampling map, colour matrix, shift and blur are bit for bit what it gets alone, and what its factors
    give multiplied out for it alone (crop, rotation, perspective, flip; brightness, contrast, saturation, hue)."""
    from mlprep.sku.augment import view_transforms

    settings = AugmentSettings(flip_prob=0.5, blur_prob=0.5, hue=0.3)
    for width, height, size in ((640, 480, 224), (90, 1200, 64), (1, 1, 16)):
        params = [original_view(width, height), ViewParams(0)]
        params += [sample_view(settings, 3, "s", f"item{k}", k, width, height) for k in range(1, 13)]
        params += [sample_view(AugmentSettings(perspective=0.0, rotation_deg=0.0, saturation=0.0, hue=0.0), 3, "s",
                               "flat", k, width, height) for k in range(1, 3)]
        together = view_transforms(params, width, height, size)
        assert {p.flip for p in params} == {False, True} and not all(any(p.corners) for p in params)
        for k, p in enumerate(params):
            alone = view_transforms([p], width, height, size)
            for name in ("sampling", "colour", "shift", "blur"):
                mine, own = getattr(together, name)[k], getattr(alone, name)[0]
                assert mine.dtype == own.dtype and mine.tobytes() == own.tobytes(), (name, k)
            sampling, colour, shift = _reference_numbers(p, width, height, size)
            assert np.array_equal(together.sampling[k], sampling), k
            assert np.array_equal(together.colour[k], colour) and np.array_equal(together.shift[k], shift), k
            assert together.blur[k] == np.float32(p.blur_sigma)
