"""Embeddings of every image by a frozen backbone, and their cache on disk (embeddings)."""
