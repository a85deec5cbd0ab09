"""Test-only Lightning callbacks, added to a run through config (`+callbacks.kill._target_=...`)."""

import os

import lightning as L


class KillAtStep(L.Callback):
    """Ends the process abruptly (no cleanup, like kill -9) once `step` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os._exit(9)
