"""Shop-floor queries and geometric re-ranking (mlprep.sku.shopfloor, mlprep.sku.geometry) on a fine-grained catalog
of look-alike SKUs cut from the demo's real photos, with the real packaged model (EfficientNet-Lite0, ImageNet)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mlprep.demo import lookalike_product, write_lookalike_catalog
from mlprep.encoders import ModelSpec, build_encoder
from mlprep.sku.geometry import FeatureTable, Geometry, features_of, rerank
from mlprep.sku.index import rank_skus
from mlprep.sku.search import embed_images
from mlprep.sku.shopfloor import ShopFloor, shop_floor_query

CPU = torch.device("cpu")
PACKAGED = {"family": "timm", "pretrained": "packaged:efficientnet-lite0"}


def test_shop_floor_queries_are_seeded_and_not_the_photo():
    photo = lookalike_product("coffee", 1, 4)
    settings = ShopFloor()
    first = shop_floor_query(photo, settings, 3, "coffee-1", 0)
    assert first == shop_floor_query(photo, settings, 3, "coffee-1", 0)  # the same query on every run
    assert first != shop_floor_query(photo, settings, 3, "coffee-1", 1)
    assert first != shop_floor_query(photo, settings, 4, "coffee-1", 0)
    query = Image.open(io.BytesIO(first))
    assert query.format == "JPEG" and 0.39 * photo.width <= query.width <= 0.61 * photo.width  # lower resolution
    with pytest.raises(ValueError, match="unknown keys occlusion_size"):
        ShopFloor.from_config({"occlusion_size": 0.3})
    with pytest.raises(ValueError, match="unknown keys topk"):
        Geometry.from_config({"topk": 3})


def test_a_photos_local_features_fit_the_budget_and_survive_the_table(tmp_path):
    catalog = json.loads(write_lookalike_catalog(tmp_path, ["rocket", "brick"], regions=2, shots=1).read_text())
    settings = Geometry()
    entries = []
    for sku in catalog:
        features = features_of((tmp_path / "images" / sku["images"][0]).read_bytes(), settings)
        assert 50 <= len(features) <= settings.max_features and features.nbytes <= 64 * 1024
        entries.append(({"item_id": sku["images"][0], "sku_id": sku["sku_id"], "image": sku["images"][0]}, features))
    table = FeatureTable.build(entries, "sku.local_features")
    table.write(tmp_path, "photos")
    back = FeatureTable.read(tmp_path, "photos", "sku.local_features")
    assert isinstance(back.descriptors, np.memmap) and back.descriptors.dtype == np.uint8
    both = FeatureTable.concat([back, back.select(np.array([2, 0]))], "sku.local_features")
    assert len(both) == 6 and both.rows["item_id"].tolist()[4:] == [entries[2][0]["item_id"], entries[0][0]["item_id"]]
    for row, (_, features) in enumerate(entries + [entries[2], entries[0]]):
        np.testing.assert_array_equal(both.features(row).descriptors, features.descriptors)
        np.testing.assert_array_equal(both.features(row).points, features.points)


def test_geometry_tells_look_alikes_apart_that_embeddings_confuse(tmp_path):
    """Four real photos (textures, coins) cut into four overlapping SKUs each: neighbouring SKUs share colours, textures and parts.
    Queries are shop-floor photos of the products; embeddings alone put a neighbour first for some of them, the
    re-ranking puts the right one first, and never loses one the embeddings had right."""
    photos = ["brick", "gravel", "grass", "coins"]
    catalog = json.loads(write_lookalike_catalog(tmp_path, photos, regions=4, shots=2).read_text())
    encoder = build_encoder(ModelSpec.from_config(PACKAGED), CPU, torch.float32, 16)
    settings = Geometry()
    shots, sku_of_shot = [], []
    for sku in catalog:
        for name in sku["images"]:
            shots.append((tmp_path / "images" / name).read_bytes())
            sku_of_shot.append(sku["sku_id"])
    vectors, ok, _ = embed_images(encoder, shots)
    assert len(ok) == len(shots)
    features = {}
    for data, sku in zip(shots, sku_of_shot):
        features.setdefault(sku, []).append(features_of(data, settings))
    queries, truth = [], []
    for sku in catalog:
        photo, region, regions = sku["source"]
        for k in range(2):
            queries.append(shop_floor_query(lookalike_product(photo, region, regions), ShopFloor(), 0, sku["sku_id"], k))
            truth.append(sku["sku_id"])
    query_vectors, _, _ = embed_images(encoder, queries)
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    ranked = rank_skus(index, np.array(sku_of_shot, dtype=object), query_vectors, settings.top_k)
    embedding_right = [row[0][0] == t for row, t in zip(ranked, truth)]
    reranked = [rerank(row, features_of(q, settings), lambda s: features[s], settings)
                for row, q in zip(ranked, queries)]
    geometry_right = [row[0][0] == t for row, t in zip(reranked, truth)]
    fixed = [t for t, e, g in zip(truth, embedding_right, geometry_right) if g and not e]
    assert fixed, "no look-alike that embeddings confuse: the test set is too easy"
    assert not [t for t, e, g in zip(truth, embedding_right, geometry_right) if e and not g]
    assert sum(geometry_right) >= sum(embedding_right) + 3, (sum(embedding_right), sum(geometry_right))
    for row, right in zip(reranked, geometry_right):  # what ranked the winner is said: its inliers
        if right:
            assert row[0][3] >= settings.min_inliers and row[0][1] > row[0][2]


def test_a_query_is_the_normalised_mean_of_its_crops_as_one_search_embeds_it():
    from mlprep.sku.augment import query_views

    encoder = build_encoder(ModelSpec.from_config({**PACKAGED, "pooling": "gem"}), CPU, torch.float32, 4)
    wide = io.BytesIO()
    lookalike_product("coffee", 1, 4, size=(480, 240)).save(wide, format="JPEG")
    images = [wide.getvalue(), b"junk"]
    one = {crop: embed_images(encoder, images, crops=(crop,)) for crop in ("centre", "whole")}
    both, ok, failed = embed_images(encoder, images, crops=("centre", "whole"))
    assert ok == [0] and [f[:2] for f in failed] == [(1, "not_an_image")]  # a bad query fails alone, as before
    assert float(one["centre"][0][0] @ one["whole"][0][0]) < 0.99  # a wide photo: the crops see different things
    mean = one["centre"][0][0] + one["whole"][0][0]
    np.testing.assert_allclose(both[0], mean / np.linalg.norm(mean), atol=1e-6)
    with pytest.raises(ValueError, match="sku_index.query_crops"):
        query_views(["middle"], 10, 10)
