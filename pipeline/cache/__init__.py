"""The logit cache: codec (pure encode/decode), writer + manifest, streaming reader, torch dataset."""

from pipeline.cache.codec import TopKCodec, decode_row, read_id_table
from pipeline.cache.dataset import CacheDataset
from pipeline.cache.manifest import FORMAT_VERSION, Manifest, load_manifest
from pipeline.cache.reader import LogitCacheReader, iter_joined
from pipeline.cache.writer import LogitCacheWriter

__all__ = [
    "FORMAT_VERSION",
    "CacheDataset",
    "LogitCacheReader",
    "LogitCacheWriter",
    "Manifest",
    "TopKCodec",
    "decode_row",
    "iter_joined",
    "load_manifest",
    "read_id_table",
]
