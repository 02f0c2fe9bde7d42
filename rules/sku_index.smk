# sku_index: product images -> augmented CLIP embeddings -> FAISS index -> retrieval eval (seed 000).
from mlprep.sku.workflow import SkuWorkflow

SKU = config["sku_index"]
SKU_FLOW = SkuWorkflow(config, RESULTS, main_process=workflow.is_main_process)
SKU_DIR = SKU_FLOW.dir

SKU_QUERIES = SKU["eval"].get("queries")
SKU_QUERY_PHOTOS = [f"{SKU_DIR}/query_photos.parquet"] if SKU_QUERIES else []
PIPELINE_OUTPUTS["sku_index"] = [f"{SKU_DIR}/index.faiss", f"{SKU_DIR}/check.json", f"{SKU_DIR}/eval.json"]


localrules:
    sku_manifest,
    sku_check,


rule sku_manifest:
    input:
        sku_data=SKU["sku_data"],
    output:
        manifest=f"{SKU_DIR}/manifest.parquet",
        failures=f"{SKU_DIR}/manifest_failures.parquet",
    log:
        f"{RESULTS}/logs/sku_index/manifest.log",
    conda:
        "../envs/sku_index.yaml"
    params:
        source=SKU_FLOW.source,
        shards=SKU_FLOW.shard_count_param,
        lists=SKU_FLOW.lists_dir,
        catalog=SKU_FLOW.catalog_fingerprint,
        continue_on_error=config["continue_on_error"],
    script:
        "../scripts/sku_manifest.py"


rule sku_encode_shard:
    output:
        directory(f"{SKU_DIR}/shards/{{shard}}"),
    log:
        f"{RESULTS}/logs/sku_index/encode_{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sku_index/encode_{{shard}}.tsv"
    conda:
        "../envs/sku_index.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        gpu=MODEL_GPUS,
    params:
        shard_list=SKU_FLOW.shard_list_pattern,
        fingerprint=SKU_FLOW.shard_fingerprint,
        settings=SKU_FLOW.encode_settings(),
    script:
        "../scripts/sku_encode.py"


rule sku_build_index:
    input:
        shards=SKU_FLOW.shard_dirs,
        manifest=f"{SKU_DIR}/manifest.parquet",
        manifest_failures=f"{SKU_DIR}/manifest_failures.parquet",
    output:
        index=f"{SKU_DIR}/index.faiss",
        embeddings=f"{SKU_DIR}/embeddings.npy",
        embedding_parts=directory(f"{SKU_DIR}/embedding_parts"),
        metadata=f"{SKU_DIR}/metadata.parquet",
        query_embeddings=f"{SKU_DIR}/query_embeddings.npy",
        query_metadata=f"{SKU_DIR}/query_metadata.parquet",
        failures=f"{SKU_DIR}/failures.parquet",
        checks=f"{SKU_DIR}/catalog_checks.parquet",
        local_features=f"{SKU_DIR}/local_features.parquet",
        local_features_points=f"{SKU_DIR}/local_features_points.npy",
        local_features_descriptors=f"{SKU_DIR}/local_features_descriptors.npy",
        shop_floor=f"{SKU_DIR}/shop_floor.parquet",
        shop_floor_points=f"{SKU_DIR}/shop_floor_points.npy",
        shop_floor_descriptors=f"{SKU_DIR}/shop_floor_descriptors.npy",
        shop_floor_embeddings=f"{SKU_DIR}/shop_floor_embeddings.npy",
        checks_html=report(
            f"{SKU_DIR}/catalog_checks.html",
            caption="../report/sku_catalog_checks.rst",
            category="sku_index",
        ),
        info=f"{SKU_DIR}/index_info.json",
    log:
        f"{RESULTS}/logs/sku_index/build_index.log",
    benchmark:
        f"{RESULTS}/benchmarks/sku_index/build_index.tsv"
    conda:
        "../envs/sku_index.yaml"
    threads: 2
    resources:
        mem_mb=4000,
    params:
        settings=SKU_FLOW.build_settings(),
    script:
        "../scripts/sku_build_index.py"


rule sku_check:
    input:
        info=f"{SKU_DIR}/index_info.json",
        failures=f"{SKU_DIR}/failures.parquet",
        checks=f"{SKU_DIR}/catalog_checks.parquet",
    output:
        f"{SKU_DIR}/check.json",
    log:
        f"{RESULTS}/logs/sku_index/check.log",
    conda:
        "../envs/sku_index.yaml"
    params:
        max_failed_fraction=config["max_failed_fraction"],
        duplicate_images=SKU["duplicate_images"],
    script:
        "../scripts/sku_check.py"


if SKU_QUERIES:

    rule sku_query_photos:
        input:
            index=f"{SKU_DIR}/index.faiss",
            info=f"{SKU_DIR}/index_info.json",
            metadata=f"{SKU_DIR}/metadata.parquet",
            local_features=f"{SKU_DIR}/local_features.parquet",
            local_features_points=f"{SKU_DIR}/local_features_points.npy",
            local_features_descriptors=f"{SKU_DIR}/local_features_descriptors.npy",
            truth=SKU_QUERIES["truth"],
            photos=SKU_FLOW.query_photo_paths,
        output:
            SKU_QUERY_PHOTOS,
        log:
            f"{RESULTS}/logs/sku_index/query_photos.log",
        conda:
            "../envs/sku_index.yaml"
        threads: 2
        resources:
            mem_mb=4000,
            gpu=MODEL_GPUS,
        params:
            images_dir=SKU_QUERIES["images_dir"],
            k=max(SKU["eval"]["top_k"]),
        script:
            "../scripts/sku_query_photos.py"


rule sku_evaluate:
    input:
        check=f"{SKU_DIR}/check.json",
        index=f"{SKU_DIR}/index.faiss",
        embeddings=f"{SKU_DIR}/embeddings.npy",
        metadata=f"{SKU_DIR}/metadata.parquet",
        info=f"{SKU_DIR}/index_info.json",
        query_embeddings=f"{SKU_DIR}/query_embeddings.npy",
        query_metadata=f"{SKU_DIR}/query_metadata.parquet",
        local_features=f"{SKU_DIR}/local_features.parquet",
        local_features_points=f"{SKU_DIR}/local_features_points.npy",
        local_features_descriptors=f"{SKU_DIR}/local_features_descriptors.npy",
        shop_floor=f"{SKU_DIR}/shop_floor.parquet",
        shop_floor_points=f"{SKU_DIR}/shop_floor_points.npy",
        shop_floor_descriptors=f"{SKU_DIR}/shop_floor_descriptors.npy",
        shop_floor_embeddings=f"{SKU_DIR}/shop_floor_embeddings.npy",
        query_photos=SKU_QUERY_PHOTOS,
    output:
        json=f"{SKU_DIR}/eval.json",
        plot=report(
            f"{SKU_DIR}/eval.png",
            caption="../report/sku_eval.rst",
            category="sku_index",
        ),
    log:
        f"{RESULTS}/logs/sku_index/evaluate.log",
    conda:
        "../envs/sku_index.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        top_k=SKU["eval"]["top_k"],
        rerank=SKU["rerank"],
        max_queries=SKU["eval"]["max_queries"],
    script:
        "../scripts/sku_evaluate.py"
