"""Training: the LightningModule, its callbacks, distillation, checkpoints and loggers; run.py is what train.py runs."""
