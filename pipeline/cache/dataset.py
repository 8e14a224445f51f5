"""CacheDataset: a torch IterableDataset over one cache, or over several teachers' caches joined by id."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.cache.reader import LogitCacheReader, iter_joined


class CacheDataset(IterableDataset):
    """Yields CacheSample (or, with `joined`, tuples of CacheSample: this reader's first).

    Rank and world size come from torch.distributed when it is initialized, the worker split from
    `get_worker_info()`. Call `set_epoch(epoch, skip)` before creating each epoch's DataLoader
    iterator (with persistent_workers the workers keep the values they were started with). Pass
    `worker_block=batch_size` so the DataLoader yields this rank's stream in order and `skip`
    (samples of this rank already consumed) resumes exactly.
    """

    def __init__(
        self,
        reader: LogitCacheReader,
        *,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1024,
        worker_block: int = 1,
        joined: Sequence[LogitCacheReader] = (),
    ):
        self.reader = reader
        self.joined = list(joined)
        self.options = {
            "shuffle": shuffle,
            "seed": seed,
            "shuffle_buffer": shuffle_buffer,
            "worker_block": worker_block,
        }
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        """Samples this rank still yields this epoch (all workers together)."""
        return max(0, self.reader.rank_num_samples(*self._rank_world()) - self.skip)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        rank, world_size = self._rank_world()
        split = {
            "epoch": self.epoch,
            "skip": self.skip,
            "rank": rank,
            "world_size": world_size,
            "worker_id": info.id if info else 0,
            "num_workers": info.num_workers if info else 1,
            **self.options,
        }
        if self.joined:
            return iter_joined([self.reader, *self.joined], **split)
        return self.reader.iter_samples(**split)
