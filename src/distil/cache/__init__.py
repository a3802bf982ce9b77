"""Offline teacher caches: run a teacher once, store sparse targets per sample id, train many students from them."""

from distil.cache.build import BuildResult, build_cache, default_collate, finalize_cache
from distil.cache.format import CacheManifest, dataset_fingerprint, tokenizer_hash, weights_hash
from distil.cache.info import cache_info, render_cache_info
from distil.cache.reader import TeacherCache

__all__ = [
    "BuildResult", "CacheManifest", "TeacherCache", "build_cache", "cache_info", "dataset_fingerprint",
    "default_collate", "finalize_cache", "render_cache_info", "tokenizer_hash", "weights_hash",
]
