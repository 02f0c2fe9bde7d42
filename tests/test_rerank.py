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


def test_past_max_queries_a_seeded_sample_of_the_photos_gets_shop_floor_queries(tmp_path):
    """Making a shop-floor query and its features costs a reader ~50 ms of CPU a photo, and the eval re-ranks each:
    past eval.shop_floor.max_queries catalog photos only a power-of-two share of them gets queries, drawn per photo
    (the same photos whatever the shard split or order; a smaller share a subset). The readers say where their time
    went, and the workflow draws the share from the catalog's size."""
    import yaml

    from mlprep.config import load_schema, only, validate
    from mlprep.sku.encode import ShardImages, readers_do_extras, view_plan
    from mlprep.sku.shopfloor import sample_share, takes_queries
    from mlprep.sku.workflow import SkuWorkflow
    from mlprep.workers import resolve_workers

    assert [sample_share(n, 2000) for n in (10, 2000, 2001, 4000, 4001, 20_000)] == [1, 1, 0.5, 0.5, 0.25, 1 / 16]
    assert sample_share(10**6, None) == 1
    ids = [f"sku{k // 2}-{k % 2}" for k in range(4000)]
    quarter = {i for i in ids if takes_queries(7, i, 0.25)}
    eighth = {i for i in ids if takes_queries(7, i, 0.125)}
    assert 850 <= len(quarter) <= 1150 and eighth < quarter and 0.4 < len(eighth) / len(quarter) < 0.6
    assert {i for i in reversed(ids) if takes_queries(7, i, 0.25)} == quarter
    assert {i for i in ids if takes_queries(8, i, 0.25)} != quarter  # the seed draws them

    shipped = yaml.safe_load(open("config/config.yaml"))
    cfg = shipped["sku_index"]
    rng = np.random.default_rng(0)
    paths = []
    for k in range(12):
        path = tmp_path / f"photo{k}.jpg"
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    ids = [f"p{k}" for k in range(12)]
    plan = view_plan(cfg, 7, 32, shop_floor_share=0.5)
    chosen = {i for i in ids if takes_queries(7, i, 0.5)}
    assert 0 < len(chosen) < 12
    for order in (range(12), [11, 3, 0, 7, 5, 9, 1, 2, 4, 6, 8, 10]):  # another shard split or order: the same
        listed = [paths[k] for k in order]
        dataset = ShardImages(listed, [ids[k] for k in order], plan, 4, False)
        extras = {ids[k]: item.extra[2] for chunk in (dataset[c] for c in range(len(dataset)))
                  for item, k in zip(chunk.items, [order[i.tag] for i in chunk.items])}
        assert {i for i, e in extras.items() if "shop_floor" in e} == chosen
        assert all("features" in e for e in extras.values())
        for item_id, e in extras.items():
            parts = {"read", "views", "local_features"} | ({"shop_floor"} if item_id in chosen else set())
            assert set(e["seconds"]) == parts and all(s >= 0 for s in e["seconds"].values())
    # heavy readers get every thread of a GPU job but one; without extras, as before
    assert readers_do_extras(cfg)
    assert not readers_do_extras({**cfg, "rerank": {**cfg["rerank"], "enabled": False},
                                  "eval": {**cfg["eval"], "shop_floor": {"queries_per_image": 0}}})
    gpu = torch.device("cuda")
    assert [resolve_workers("auto", gpu, t, heavy=True) for t in (1, 2, 16)] == [1, 1, 15]
    assert resolve_workers("auto", CPU, 16, heavy=True) == 1 and resolve_workers(2, gpu, 16, heavy=True) == 2
    # the workflow's share, from the catalog's size (a parameter of every shard job: it reruns them when it changes)
    catalog = tmp_path / "sku_data.json"
    catalog.write_text(json.dumps([{"sku_id": f"s{k}", "images": [f"s{k}_a.jpg", f"s{k}_b.jpg"]} for k in range(9)]))
    config = {**shipped, **only("sku_index"),
              "sku_index": {**cfg, "sku_data": str(catalog), "eval": {**cfg["eval"], "shop_floor": {
                  **cfg["eval"]["shop_floor"], "max_queries": 5}}}}
    validate(config, load_schema("config/schema.yaml"))  # the schema's defaults filled in, as the workflow's are
    flow = SkuWorkflow(config, str(tmp_path / "results"))
    assert flow.shop_floor_share() == 0.25 and flow.encode_settings()["shop_floor_share"] == 0.25
    config["sku_index"]["eval"]["shop_floor"]["max_queries"] = 6  # the same share: the shard jobs' settings unchanged
    assert SkuWorkflow(config, str(tmp_path / "results")).encode_settings() == flow.encode_settings()
    # a job on a cluster node takes the count the main process made, not the catalog as it is now
    catalog.write_text("{ not json")
    assert SkuWorkflow(config, str(tmp_path / "results"), main_process=False).shop_floor_share() == 0.25
    catalog.write_text("[]")
    assert SkuWorkflow({**config, "sku_index": {**config["sku_index"], "enabled": False}},
                       str(tmp_path / "results3")).shop_floor_share() == 1  # a pipeline switched off counts nothing
    assert not (tmp_path / "results3").exists()
    config["sku_index"]["eval"]["shop_floor"]["max_queries"] = None
    assert SkuWorkflow(config, str(tmp_path / "results2")).shop_floor_share() == 1


def test_readers_in_the_jobs_process_prepare_a_chunk_side_by_side_as_one_thread_would(tmp_path):
    """With no reader processes (`decode_workers: 0`, what `auto` gives a 2-core CPU job) the job's own process
    prepares each chunk while the model waits, so its items are prepared side by side on the job's threads
    (mlprep.workers.each_in_threads): in order, and the chunk (pixels, JPEG bytes, view numbers, local features,
    shop-floor queries, failures) is the one a single thread makes."""
    import pickle
    import threading

    import yaml

    from mlprep.sku.encode import ShardImages, view_plan
    from mlprep.workers import each_in_threads

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        barrier = threading.Barrier(3, timeout=30)  # broken (an error) unless three calls run at once

        def meet(k: int) -> tuple[int, str]:
            barrier.wait()
            return k * k, threading.current_thread().name

        side_by_side = each_in_threads(meet, range(6))
        assert [v for v, _ in side_by_side] == [k * k for k in range(6)]
        assert len({name for _, name in side_by_side}) == 3
        assert threading.current_thread().name not in {name for _, name in side_by_side}
        torch.set_num_threads(1)  # a reader process: one after the other, in its own thread
        assert each_in_threads(lambda k: (k, threading.current_thread().name), range(3)) == [
            (k, threading.current_thread().name) for k in range(3)]

        rng = np.random.default_rng(3)
        paths = []
        for k, (h, w, mode, fmt) in enumerate([(96, 128, "RGB", "JPEG"), (160, 90, "RGB", "JPEG"),
                                               (64, 64, "L", "JPEG"), (120, 100, "RGB", "PNG"),
                                               (200, 150, "RGB", "JPEG"), (48, 300, "RGB", "JPEG"),
                                               (90, 90, "CMYK", "JPEG"), (128, 96, "RGB", "JPEG")]):
            path = tmp_path / f"photo{k}.{fmt.lower()}"
            pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
            Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path, format=fmt)
            paths.append(str(path))
        (tmp_path / "notes.jpg").write_text("not an image")
        paths[3:3] = [str(tmp_path / "notes.jpg"), str(tmp_path / "gone.jpg")]  # unreadable, missing
        ids = [f"p{k}" for k in range(len(paths))]
        plan = view_plan(yaml.safe_load(open("config/config.yaml"))["sku_index"], 7, 32)
        assert plan.geometry is not None and plan.shop_floor is not None

        def chunks(n_threads: int, device_decode: bool) -> list:
            torch.set_num_threads(n_threads)
            dataset = ShardImages(paths, ids, plan, 4, device_decode)
            out = []
            for chunk in (dataset[c] for c in range(len(dataset))):
                for item in chunk.items:  # how long each part took differs from run to run; nothing else may
                    if item.extra is not None:  # None: the file could not be read
                        assert {"read", "views"} <= set(item.extra[2].pop("seconds"))
                out.append((chunk.data.numpy().tobytes(), chunk.offsets, chunk.canvases,
                            [pickle.dumps(item) for item in chunk.items]))
            return out

        for device_decode in (False, True):
            one = chunks(1, device_decode)
            assert chunks(3, device_decode) == one
        errors = [pickle.loads(item).error for chunk in one for item in chunk[3]]
        assert [e[0] if e else None for e in errors] == [None] * 3 + ["not_an_image", "missing"] + [None] * 5
    finally:
        torch.set_num_threads(threads)
