"""The distillation loop: `transformers.Trainer` with our loss, our normalization and our data stream.

- Loss: pipeline.student.distill.distillation_loss, run inside the output head's forward (pipeline.student.head_loss) so
  that FSDP2 / ZeRO-3 gather the head's weight for it; each term a sum over response tokens divided ONCE by the
  response-token count of the whole optimizer step: all gradient-accumulation micro-batches of all
  ranks, counted before the step (`get_batch_samples` sees every micro-batch of the step up front).
- Data: `CacheStream` yields this rank's collated micro-batches, epoch after epoch, in a deterministic
  order. The Trainer runs for `max_steps` and never re-shards or fast-forwards it: on resume the stream
  starts at the checkpoint's micro-batch through the reader's `skip`, which does not decode what it skips.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import Trainer, TrainerCallback

from pipeline.cache import LogitCacheReader, iter_joined
from pipeline.errors import UserError
from pipeline.records import CacheSample
from pipeline.student.distill import distillation_loss, output_head
from pipeline.student.head_loss import install_distillation_head
from pipeline.student.losses import KDLossSpec


class CacheStream(IterableDataset):
    """This rank's collated micro-batches, epoch after epoch without end, from micro-batch `start` on.

    Epoch e is the reader's stream for (seed, e, rank) cut into micro-batches of `batch_size` samples
    (the last one of an epoch may be short), so micro-batch m of the stream is a fixed set of samples
    and resuming at m costs one `skip`. With DataLoader workers, micro-batch m is collated by worker
    m % num_workers (counted from `start`), which is the order the DataLoader's round robin yields.
    """

    def __init__(
        self,
        readers: Sequence[LogitCacheReader],
        *,
        seed: int,
        rank: int,
        world_size: int,
        batch_size: int,
        collate_fn: Callable[[Sequence[Sequence[CacheSample]]], dict[str, Any]],
        shuffle_buffer: int = 1024,
    ):
        self.readers = list(readers)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = self.readers[0].rank_num_samples(rank, world_size)
        if self.samples_per_epoch < 1:
            raise UserError(
                f"The cache holds {self.readers[0].num_samples} samples, fewer than the {world_size} ranks."
            )
        self.start = 0  # micro-batches already trained on (resume)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, first = divmod(self.start, self.batches_per_epoch)
        before = 0  # micro-batches of the stream ahead of this epoch's first one
        for epoch in itertools.count(epoch):  # noqa: B020 - resumes counting from the start epoch
            samples = iter_joined(
                self.readers,
                shuffle=True,
                seed=self.seed,
                epoch=epoch,
                rank=self.rank,
                world_size=self.world_size,
                worker_id=(worker - before) % workers,
                num_workers=workers,
                shuffle_buffer=self.shuffle_buffer,
                skip=first * self.batch_size,
                worker_block=self.batch_size,
            )
            while chunk := list(itertools.islice(samples, self.batch_size)):
                yield self.collate_fn(chunk)
            before += self.batches_per_epoch - first
            first = 0


class KDTrainer(Trainer):
    """Trainer whose loss is the sparse distillation loss over the step's response tokens."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's token count itself

    def __init__(
        self, *args: Any, loss_spec: KDLossSpec, chunk_size: int, stream: CacheStream, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.loss_spec = loss_spec
        self.chunk_size = chunk_size
        self.stream = stream
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        output_head(base)  # refuses heads we cannot apply ourselves
        # Before accelerate wraps the model: the loss then runs inside the head's forward, which FSDP2 and
        # ZeRO-3 gather (pipeline.student.head_loss); under DDP or one process it changes nothing.
        self.head = install_distillation_head(base)
        self._sums = torch.zeros(3, device=self.args.device)  # CE sum, KD sum, tokens since the last log
        self.add_callback(_StreamEpoch(stream, self.args.gradient_accumulation_steps))

    def get_train_dataloader(self) -> DataLoader:
        # The stream is already this rank's slice in resumable order: not for accelerate to re-shard.
        workers = self.args.dataloader_num_workers
        return DataLoader(
            self.stream,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
            persistent_workers=False,
            # Its own generator: creating the iterator must not draw from the global RNG, which a resume
            # restores just before (dropout masks would shift).
            generator=torch.Generator().manual_seed(self.args.seed),
        )

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = torch.tensor(sum(int(batch["targets"].numel()) for batch in batches), device=device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return batches, count.clamp(min=1)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        tokens = num_items_in_batch if num_items_in_batch is not None else max(inputs["targets"].numel(), 1)
        parts = distillation_loss(model, self.head, inputs, self.loss_spec, tokens, self.chunk_size)
        self._sums += torch.stack([parts.ce_sum, parts.kd_sum, parts.ce_sum.new_tensor(parts.tokens)])
        # DDP, FSDP and ZeRO average gradients over ranks, while each rank's loss is its share of the global
        # token sum.
        loss = parts.loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add per-token CE and KD since the previous one
            sums = self._sums
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            tokens = max(sums[2].item(), 1.0)
            logs["ce"] = sums[0].item() / tokens
            logs["kd"] = sums[1].item() / tokens
            logs["response_tokens"] = int(sums[2].item())
            self._sums.zero_()
        super().log(logs, start_time)


class _StreamEpoch(TrainerCallback):
    """Report epochs of the cache: the Trainer sees an endless stream and counts fractions of max_steps."""

    def __init__(self, stream: CacheStream, accumulation: int):
        self.stream, self.accumulation = stream, accumulation

    def on_step_end(self, args, state, control, **kwargs):
        state.epoch = state.global_step * self.accumulation / self.stream.batches_per_epoch


class JsonlLogger(TrainerCallback):
    """Every training log as one JSON line (step, epoch, loss, ce, kd, learning rate, ...)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as out:
                out.write(json.dumps({"step": state.global_step, **logs}) + "\n")
