"""PersonaLitModule: a backbone with a mechanism attached, trained on assistant tokens."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from persona_lit.training.checkpoint import load_trainable
from persona_lit.data.dialogues import IGNORE
from persona_lit.training.distill import fresh_persona_kl
from persona_lit.errors import UserError
from persona_lit.mechanisms.base import Mechanism
from persona_lit.models.backbones import compute_context


def masked_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) of the next-token distributions at positions that carry a label."""
    mask = labels[:, 1:] != IGNORE
    t = F.log_softmax(teacher_logits[:, :-1][mask].float(), dim=-1)
    s = F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def master_weights_fp32(params: list[nn.Parameter]) -> None:
    """Trainable tensors are float32 whatever the base model's dtype: an AdamW update at lr 5e-5 on a bf16 weight
    of size ~1 falls below bf16's resolution (2^-8 relative) and is lost. Cast in place (the same Parameter
    objects, so the optimizer and the model see one tensor); the forward runs under compute_context."""
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


class PersonaLitModule(L.LightningModule):
    """`optimizer` and `scheduler` are partials from config (`_partial_: true`); the module supplies
    the parameters and the number of steps. `run_config` travels inside every checkpoint."""

    flops_per_batch = None  # Lightning's ThroughputMonitor: FLOPs are not counted (tokens and samples are)

    def __init__(self, model: nn.Module, mechanism: Mechanism, optimizer: Callable, scheduler: Callable | None = None,
                 kl_weight: float = 0.0, run_config: dict[str, Any] | None = None, fingerprint: str = "",
                 distill_weight: float = 0.0, pad_id: int = 0, reopen: tuple[int, ...] = (),
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.model, self.mechanism = model, mechanism
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.kl_weight, self.run_config, self.fingerprint = kl_weight, run_config or {}, fingerprint
        self.distill_weight, self.pad_id = distill_weight, pad_id
        self.reopen = tuple(reopen)  # the user header a later Gemma turn opens with (distill.py drops it for the teacher)
        self.strict_loading = False  # checkpoints hold only the trainable tensors; load_trainable checks them
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _extra(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        extra = {"segment_ids": batch["segment_ids"]} if self.mechanism.uses_segments else {}
        if self.mechanism.uses_assistant_mask:  # the tokens the loss is on: the assistant's answers
            extra["assistant_mask"] = batch["labels"] != IGNORE
        return extra

    def _loss(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        with compute_context(self.model):  # a bf16 base with float32 trainable weights: autocast
            return self._loss_in(batch, stage)

    def _loss_in(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], **self._extra(batch))
        loss = out.loss
        n = batch["input_ids"].shape[0]
        if self.kl_weight > 0 and stage == "train":
            # The teacher is the same weights with the mechanism switched off: no second model copy.
            with torch.no_grad(), self.mechanism.disabled():
                teacher = self(batch["input_ids"], batch["attention_mask"]).logits
            kl = masked_kl(teacher, out.logits, batch["labels"])
            self.log(f"{stage}/kl_to_base", kl, batch_size=n)
            loss = loss + self.kl_weight * kl
        if self.distill_weight > 0 and stage == "train":
            kl = fresh_persona_kl(self.model, self.mechanism, batch, out.logits, self.pad_id, self.reopen)
            self.log(f"{stage}/kl_fresh_persona", kl, batch_size=n)
            loss = loss + self.distill_weight * kl
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n, sync_dist=stage != "train")
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._loss(batch, "val")

    def configure_model(self) -> None:
        """Under Lightning's ModelParallelStrategy (trainer=fsdp2): FSDP2 shards every decoder layer, then the rest,
        over the data-parallel mesh; frozen base weights and the mechanism's trainable ones alike. Other
        strategies: nothing to do (the model is built before the trainer)."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or getattr(self, "_fsdp2_done", False):
            return
        from torch.distributed.fsdp import fully_shard

        from persona_lit.models.backbones import decoder_layers

        dp = mesh["data_parallel"]
        for layer in decoder_layers(self.model):
            fully_shard(layer, mesh=dp)
        fully_shard(self.model, mesh=dp)
        self._fsdp2_done = True

    def on_fit_start(self) -> None:
        self.model.train()  # from_pretrained hands models over in eval mode
        if self.gradient_checkpointing:  # each decoder layer's activations recomputed in backward, not kept
            # Non-reentrant: gradients reach adapters and mechanism weights although the embeddings are frozen.
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def configure_optimizers(self) -> Any:
        params = list(self.mechanism.trainable_parameters())  # train.py refuses a mechanism without any
        master_weights_fp32(params)
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, num_training_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Checkpoints: only what trains (a few MB for LoRA on SmolLM2), plus what identifies the run.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["persona_lit"] = {"fingerprint": self.fingerprint, "config": self.run_config}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("persona_lit", {}).get("fingerprint")
        if saved and saved != self.fingerprint:
            raise UserError(f"ckpt_path: checkpoint was trained on another base model (fingerprint {saved}, "
                            f"this model {self.fingerprint})")
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
        load_trainable(self.model, state, "ckpt_path")
