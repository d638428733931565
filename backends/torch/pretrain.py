"""BERT pretraining in PyTorch: the step core/pretraining.py's loop drives, the book's `train_bert`
(bert-pretraining.md), and the resumable state.

Semantics kept from d2l: Adam with lr 0.01, the loss `mlm + nsp` per batch, `nn.DataParallel`
across GPUs, the timer covering forward, backward and update only, and the two lines printed at
the end (`MLM loss ..., NSP loss ...` and `... sentence pairs/sec on [...]`, means over the steps).
Changed: no Animator (per-step figures are returned as `StepRecord`s), the MLM loss is by default
the mean over real predictions only (`mlm_loss='masked'`, what the book's MXNet code computes);
`mlm_loss='book'` keeps the book's PyTorch formula, `CrossEntropyLoss()`'s mean (over every
prediction slot, padded ones included) times the weights over their sum, in which the weights
cancel. `start_step`, `seed` and `on_step` let a job checkpoint and resume.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nlibert.core import book
from nlibert.core.book import bind
from nlibert.core.distributed import World
from nlibert.core.io import atomic_write
from nlibert.core.pretraining import (BatchTotals, check_init, check_mlm_loss, share_of)
from nlibert.core.resume import step_file
from nlibert.core.training import require_devices

from .checkpoint import _load_state_dict, write_params
from .runtime import make_trainer
from .train import _learning_rate


def initialize_bert(net: nn.Module, devices: Sequence[torch.device], init: str = "book") -> None:
    """The model on devices[0], initialised as `init` says (`core.pretraining.INIT_SCHEMES`).

    'book': torch's layer defaults, done when the model is built, as the book's pretraining.
    'xavier': as MXNet's `init.Xavier()`: every parameter of 2 or more dimensions (Linear weights,
    embeddings, the (1, max_len, H) positional embedding) Xavier-uniform with the same fans MXNet
    computes, every bias 0, LayerNorm scales left at 1."""
    check_init(init)
    if init == "xavier":
        with torch.no_grad():
            for name, param in net.named_parameters():
                if param.dim() >= 2:
                    nn.init.xavier_uniform_(param)
                elif name.endswith("bias"):
                    param.zero_()
    net.to(devices[0])


def _get_batch_loss_bert(net: nn.Module, loss: nn.Module, vocab_size: int, tokens_X: torch.Tensor,
                         segments_X: torch.Tensor, valid_lens_x: torch.Tensor, pred_positions_X: torch.Tensor,
                         mlm_weights_X: torch.Tensor, mlm_Y: torch.Tensor, nsp_y: torch.Tensor,
                         mlm_loss: str = "masked", totals: BatchTotals | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(mlm_l, nsp_l, mlm_l + nsp_l)` of one batch, each a 0-d tensor.

    `loss` is per-example cross-entropy (`reduction='none'`, `runtime.make_loss()`). The book's
    `nn.CrossEntropyLoss()` (mean) also works with `mlm_loss='book'`, the only mode it can serve.
    `totals`: the rows are a rank's shard of a batch whose means divide by these totals (so that
    the ranks' losses add up to the whole batch's).
    """
    check_mlm_loss(mlm_loss)
    _, mlm_Y_hat, nsp_Y_hat = net(tokens_X, segments_X, valid_lens_x.reshape(-1), pred_positions_X)
    mlm_l = loss(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y.reshape(-1))  # (B*P,), or 0-d if reduced
    weights = mlm_weights_X.reshape(-1)  # (B*P,): 1 for a real prediction, 0 for a padded slot
    nsp_l = loss(nsp_Y_hat, nsp_y)
    if totals is not None:
        if mlm_l.dim() == 0:
            raise ValueError("a shard's losses need a per-example loss: nn.CrossEntropyLoss(reduction='none')")
        mlm_sum = mlm_l.sum() if mlm_loss == "book" else (mlm_l * weights).sum()
        return totals.losses(mlm_sum, nsp_l.sum(), mlm_loss)
    if mlm_loss == "masked":
        if mlm_l.dim() == 0:
            raise ValueError("mlm_loss='masked' needs a per-example loss: nn.CrossEntropyLoss(reduction='none')")
        mlm_l = (mlm_l * weights).sum() / (weights.sum() + 1e-8)
    else:
        # The book: mean(loss over all slots) * weights, summed, over sum(weights): the weights cancel.
        mlm_l = mlm_l.mean() * weights.sum() / (weights.sum() + 1e-8)
    nsp_l = nsp_l.mean()
    return mlm_l, nsp_l, mlm_l + nsp_l


class PretrainStep:
    """core/pretraining.py's step: the net on devices[0] (in `nn.DataParallel` across several GPUs,
    as the book), in training mode; each call is one step of the book's `train_bert`: the batch's
    `mlm + nsp` loss, `backward`, `trainer.step()`, both losses read back (one host sync, which
    waits for the step)."""

    def __init__(self, net: nn.Module, loss: nn.Module, vocab_size: int, trainer: torch.optim.Optimizer,
                 devices: Sequence[torch.device], mlm_loss: str = "masked", *, world: World | None = None) -> None:
        self.devices = require_devices(devices)
        self.loss, self.vocab_size, self.trainer, self.mlm_loss = loss, vocab_size, trainer, check_mlm_loss(mlm_loss)
        self.world = world or World()
        net.to(self.devices[0])
        self.model = net
        if self.world.size > 1:
            if self.devices[0].type == "cuda":
                torch.cuda.set_device(self.devices[0])
            self.model = DDP(net, device_ids=[self.devices[0]] if self.devices[0].type == "cuda" else None)
        elif len(self.devices) > 1 and all(d.type == "cuda" for d in self.devices):
            self.model = nn.DataParallel(net, device_ids=self.devices).to(self.devices[0])
        self.model.train()
        self._totals: BatchTotals | None = None

    learning_rate = _learning_rate

    def load(self, batch: Sequence) -> list[torch.Tensor]:
        batch, self._totals = share_of(batch, self.world)  # in a job: this rank's rows, the batch's totals
        return [torch.as_tensor(x).to(self.devices[0], non_blocking=True) for x in batch]

    def __call__(self, inputs: list[torch.Tensor]) -> tuple[float, float]:
        tokens_X, segments_X, valid_lens_x, pred_positions_X, mlm_weights_X, mlm_Y, nsp_y = inputs
        self.trainer.zero_grad()
        mlm_l, nsp_l, l = _get_batch_loss_bert(self.model, self.loss, self.vocab_size, tokens_X, segments_X,
                                               valid_lens_x, pred_positions_X, mlm_weights_X, mlm_Y.long(),
                                               nsp_y.long(), self.mlm_loss, self._totals)
        (l * self.world.size).backward()  # DDP averages the ranks' gradients: their sum is the batch's
        self.trainer.step()
        mlm_value, nsp_value = torch.stack([mlm_l.detach(), nsp_l.detach()]).tolist()  # one host sync
        if self.world.size > 1:
            mlm_value, nsp_value = (float(v) for v in self.world.all_sum(np.array([mlm_value, nsp_value])))
        return mlm_value, nsp_value

    def reseed(self, seed: int) -> None:
        torch.manual_seed(seed)


train_bert = bind(book.train_bert, PretrainStep, make_trainer)


def save_training_state(folder: str | os.PathLike, net: nn.Module, trainer: torch.optim.Optimizer,
                        step: int) -> dict[str, str]:
    """Write the model parameters and the optimizer state (with torch's RNG states) of step `step`
    into `folder`, each atomically; returns the file names for the resume `state.json`."""
    net = net.module if isinstance(net, nn.DataParallel) else net
    os.makedirs(folder, exist_ok=True)
    files = {"params": step_file(step, "params"), "trainer": step_file(step, "trainer")}
    write_params(net.state_dict(), os.path.join(folder, files["params"]))
    state = {"optimizer": trainer.state_dict(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    with atomic_write(os.path.join(folder, files["trainer"]), "wb") as f:
        torch.save(state, f)
    return files


def load_training_state(folder: str | os.PathLike, files: dict[str, str], net: nn.Module,
                        trainer: torch.optim.Optimizer, devices: Sequence[torch.device]) -> None:
    """Put back what `save_training_state` wrote: parameters, optimizer state and RNG states."""
    net.load_state_dict(_load_state_dict(os.path.join(folder, files["params"])), strict=True)
    net.to(devices[0])
    state = torch.load(os.path.join(folder, files["trainer"]), map_location="cpu", weights_only=True)
    trainer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
