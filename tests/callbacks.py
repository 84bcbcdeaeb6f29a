"""Callbacks used by tests through ``+callbacks.NAME._target_=tests.callbacks.CLASS``."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback, LightningModule, Trainer


class SignalAfterEpoch(Callback):
    """Send this process a real signal (default SIGTERM) at the end of training epoch ``epoch``."""

    def __init__(self, epoch: int = 0, signum: int = int(signal.SIGTERM)) -> None:
        self.epoch = int(epoch)
        self.signum = int(signum)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signum)
