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


class RecordLosses(L.Callback):
    """Appends each training batch's (step, example indices, loss) to `path`/losses_rank<R>.jsonl. Lightning hands
    over the loss divided by accumulate_grad_batches; the batch's own loss is written."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import json

        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {"step": trainer.global_step, "index": batch["index"].tolist(), "loss": float(loss) * trainer.accumulate_grad_batches}
        with open(os.path.join(self.path, f"losses_rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
