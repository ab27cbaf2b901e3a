"""MNIST as a LightningDataModule: normalised once, held as tensors, batched by index slices.

Training draws from the selected digits only (optionally mixing in a fraction of other digits:
``replay``); validation holds out a seeded, fixed-size split of the training set; testing always
uses the full 10,000-image test set so forgetting on the other digits stays visible.
"""

from __future__ import annotations

import functools
import logging
import math

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from loralab.mnist import TRAIN_MEAN, TRAIN_STD, ensure_mnist, read_idx

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def load_tensors(data_dir: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y), images flattened and normalised; cached per process so
    the jobs of a sweep read and normalise the files once."""
    train_x, train_y, test_x, test_y = (torch.from_numpy(a.copy()) for a in read_idx(data_dir))

    def normalise(images: torch.Tensor) -> torch.Tensor:
        # In place: the same values as ((x / 255) - mean) / std, without two 188 MB temporaries.
        return images.reshape(len(images), -1).float().div_(255.0).sub_(TRAIN_MEAN).div_(TRAIN_STD)

    return normalise(train_x), train_y.long(), normalise(test_x), test_y.long()


class DigitBatchSampler(Sampler):
    """Shuffled batches from ``pool``; with ``replay > 0`` each batch also carries
    ``round(replay * batch_size)`` indices drawn from ``replay_pool`` (the other digits).

    Reseeded from ``seed + epoch`` so every epoch sees the same order, and a run resumed mid-epoch
    (``skip`` batches already trained on) draws the same random numbers and yields what follows.
    Under DDP every rank draws the same batches and keeps its share (``batch[rank::world_size]``):
    averaged over ranks, the gradient is the one-process gradient of the same batch.
    """

    def __init__(self, pool: torch.Tensor, batch_size: int, seed: int, replay_pool: torch.Tensor | None = None,
                 replay: float = 0.0, rank: int = 0, world_size: int = 1):
        self.pool, self.batch_size, self.seed = pool, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.replay_pool = replay_pool
        self.n_replay = round(replay * batch_size) if replay_pool is not None and len(replay_pool) else 0
        self.n_own = batch_size - self.n_replay
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.pool) / self.n_own)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = self.pool[torch.randperm(len(self.pool), generator=gen)]
        skip, self.skip = self.skip, 0  # only the first pass after a resume starts part-way
        for i, start in enumerate(range(0, len(order), self.n_own)):
            batch = order[start : start + self.n_own]
            if self.n_replay:
                pick = torch.randint(len(self.replay_pool), (self.n_replay,), generator=gen)
                batch = torch.cat([batch, self.replay_pool[pick]])
            if i >= skip:
                yield batch[self.rank :: self.world_size]


class MNISTDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "data",
        digits: list[int] | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        replay: float = 0.0,
        seed: int = 0,
        split_seed: int | None = None,
    ):
        super().__init__()
        self.data_dir = str(data_dir)
        self.digits = sorted(digits) if digits is not None else list(range(10))
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.replay, self.seed = val_size, replay, seed
        self.split_seed = seed if split_seed is None else split_seed  # which images validation holds out
        self.source: str | None = None

    def prepare_data(self) -> None:
        # Lightning calls this before every fit and test (four times in a fine-tune): say it once.
        source = ensure_mnist(self.data_dir)
        if source != self.source:
            log.info("MNIST source: %s", source)
        self.source = source

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "test_set"):
            return
        train_x, train_y, test_x, test_y = load_tensors(self.data_dir)
        perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, fit_idx = perm[: self.val_size].sort().values, perm[self.val_size :].sort().values
        # Indexed by a whole batch of indices at once (the samplers yield index tensors, and
        # batch_size=None): one gather per batch, no per-sample work.
        self.train_set = TensorDataset(train_x, train_y)
        self.val_set = TensorDataset(train_x[val_idx], train_y[val_idx])
        self.test_set = TensorDataset(test_x, test_y)
        selected = torch.isin(train_y[fit_idx], torch.tensor(self.digits))
        self.train_pool, self.other_pool = fit_idx[selected], fit_idx[~selected]

    @functools.cached_property
    def test_counts(self) -> tuple[int, ...]:
        """Images per digit in the test set."""
        return tuple(torch.bincount(self.test_set.tensors[1], minlength=10).tolist())

    @functools.cached_property
    def val_counts(self) -> tuple[int, ...]:
        """Images per digit in the validation split."""
        return tuple(torch.bincount(self.val_set.tensors[1], minlength=10).tolist())

    def shard(self) -> tuple[int, int]:
        """(rank, world size) of this process: each rank reads only its share of the data."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self.shard()
        sampler = DigitBatchSampler(self.train_pool, self.batch_size, self.seed, self.other_pool, self.replay, rank, world_size)
        trainer = self.trainer
        if trainer is not None and trainer.fit_loop.restarting:
            # Resuming from a mid-epoch checkpoint: Lightning has restored how many batches of this
            # epoch were trained on; without skipping them they would be trained on twice.
            sampler.skip = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return DataLoader(self.train_set, sampler=sampler, batch_size=None)

    def _sequential(self, dataset: TensorDataset, shard: tuple[int, int] | None = None) -> DataLoader:
        # Whole batches per rank, none repeated: torchmetrics then sums each image exactly once
        # (a DistributedSampler would pad the last rank with duplicates).
        rank, world_size = shard or self.shard()
        batches = [torch.arange(i, min(i + self.eval_batch_size, len(dataset))) for i in range(0, len(dataset), self.eval_batch_size)]
        return DataLoader(dataset, sampler=batches[rank::world_size], batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._sequential(self.val_set)

    def whole_val_dataloader(self) -> DataLoader:
        """The whole validation split in one process (a test pass on it, after or outside fit)."""
        return self._sequential(self.val_set, (0, 1))

    def test_dataloader(self) -> DataLoader:
        return self._sequential(self.test_set)
