"""Callbacks used by tests through ``+callbacks.NAME._target_=tests.callbacks.CLASS``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class SignalAfterEpoch(Callback):
    """Send this process a real signal (default SIGTERM) at the end of training epoch ``epoch``."""

    def __init__(self, epoch: int = 0, signum: int = int(signal.SIGTERM)) -> None:
        self.epoch = int(epoch)
        self.signum = int(signum)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signum)


class SignalAfterBatch(Callback):
    """Send this process a real signal (default SIGTERM) after training batch ``batch`` of epoch
    ``epoch`` (both 0-based): a stop in the middle of an epoch.

    With ``once_file`` the signal is sent only if that file does not exist yet (it is created
    first), so the jobs of a sweep and a resumed run do not stop again at the same batch; with
    ``only_dir`` only in the run whose ``trainer.default_root_dir`` it is (one job of a sweep).
    """

    def __init__(
        self,
        epoch: int = 1,
        batch: int = 1,
        signum: int = int(signal.SIGTERM),
        once_file: str | None = None,
        only_dir: str | None = None,
    ) -> None:
        self.epoch = int(epoch)
        self.batch = int(batch)
        self.signum = int(signum)
        self.once_file = once_file
        self.only_dir = only_dir

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != self.batch:
            return
        if self.only_dir is not None and Path(trainer.default_root_dir) != Path(self.only_dir):
            return
        if self.once_file is not None:
            marker = Path(self.once_file)
            if marker.exists():
                return
            marker.write_text(f"signal {self.signum} sent by pid {os.getpid()}\n")
        os.kill(os.getpid(), self.signum)
