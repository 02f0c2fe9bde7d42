"""The sku_index pipeline: product images -> augmented CLIP embeddings -> FAISS index -> retrieval eval."""
