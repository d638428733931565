"""The backend contract: what every backend package exports, in this order, with these signatures.

A backend is a package `nlibert/backends/<name>/` of five files, mirror images of the other
backends' (the same public names, in the same order, file by file), and any private helper
modules of its own (a leading underscore, e.g. the JAX backend's `_layers.py`):

- `model.py`: the book's BERT (`BERTEncoder` ... `BERTClassifier`) and `set_fused_attention`;
- `checkpoint.py`: its params file format, and the book's folder loaders and savers;
- `train.py`: `FinetuneStep` (what core/training.py's epoch loop needs) and the book's `train_ch13`;
- `pretrain.py`: `PretrainStep` (what core/pretraining.py's step loop needs) and the book's `train_bert`;
- `runtime.py`: devices, seeds, the book's loss and optimizer, outputs as numpy arrays.

Everything the backends share lives in core (framework-neutral): the epoch and step loops, the
settings, data, checkpoint folder rules and names. A backend supplies what its framework does
differently. Arrays cross the contract as numpy arrays (`read_params`, `predict_proba`,
`bert_outputs`); batches as numpy arrays or the framework's own; devices as the framework's
device objects, from `parse_devices` / `try_all_gpus` (never empty).

This module is the contract written down: each name below is a stub with the signature every
backend's must have (tests/test_contract.py compares them, parameter by parameter) and a docstring
saying what it returns. `__all__` is every backend's `__all__`.

How to add a backend (JAX, say):
1. `nlibert/backends/jax/` with the five files and an `__init__.py` exporting `__all__` below.
2. One line in `nlibert/backends/__init__.py`'s `REGISTRY` (name, module, framework, label, marker).
3. One rename table in `core/names.py` (`FORMAT_NAMES["jax"]`: canonical -> its names; empty if
   it uses the canonical names).
4. Its extra in setup.cfg and its pins in .ci/constraints.txt (DESIGN.md, "How to add a backend").
The CLI's `--backend`, `convert --to` and `parity` pick it up from the registry; tests/test_contract.py
holds it to this file.
"""
from __future__ import annotations

from typing import Any

from ..core.distributed import JOIN_TIMEOUT_S

__all__ = [
    # model.py
    "masked_softmax", "BERTEncoder", "MaskLM", "NextSentencePred", "BERTModel", "BERTClassifier", "set_fused_attention",
    # checkpoint.py
    "read_params", "write_params", "load_pretrained_model", "save_pretrained", "save_classifier",
    "load_classifier",
    # train.py
    "try_all_gpus", "split_batch_multi_inputs", "evaluate_accuracy", "train_batch_ch13", "FinetuneStep",
    "train_ch13", "train_fast", "predict_proba",
    # pretrain.py
    "initialize_bert", "PretrainStep", "train_bert", "save_training_state", "load_training_state",
    # runtime.py
    "parse_devices", "init_distributed", "launch_processes", "set_seed", "make_loss", "make_trainer",
    "framework_versions", "initialize_classifier_head", "bert_outputs", "classifier_logits",
]

FILES = ("model", "checkpoint", "train", "pretrain", "runtime")


# --- model.py ---------------------------------------------------------------------------------

def masked_softmax(X, valid_lens):
    """The book's: softmax over the last axis of the framework's `X` (B, T_q, T_k), the keys past
    each length (`valid_lens` (B,) or per query (B, T_q), ints or floats) replaced by -1e6 first,
    so a row of length 0 is uniform, never NaN; `valid_lens` None: a plain softmax."""


class BERTEncoder:
    """Token + segment + learned position embeddings, summed (BERT's LayerNorm after them with
    `embedding_norm`), then `num_layers` post-LN Transformer blocks."""

    def __init__(self, vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_layers, dropout, max_len=1000, *,
                 detach_pos_embedding=False, fused_attention=False, hidden_act="relu", layer_norm_eps=1e-5,
                 embedding_norm=False, attention_dropout=None): ...

    @classmethod
    def from_config(cls, cfg, *, detach_pos_embedding=False, fused_attention=False):
        """Built from a `core.config.BERTConfig`."""

    def forward(self, tokens, segments, valid_lens, cls_only=False):
        """(B, T, H) hidden states; (B, 1, H), the <cls> row, with `cls_only`."""


class MaskLM:
    def __init__(self, vocab_size, num_hiddens, hidden_act="relu", layer_norm_eps=1e-5): ...

    def forward(self, X, pred_positions):
        """(B, P, V) logits at the (B, P) positions."""


class NextSentencePred:
    def __init__(self, num_hiddens): ...

    def forward(self, X):
        """(B, 2) logits of the pooled <cls> states."""


class BERTModel:
    """The book's BERT: encoder, pooler (`hidden`), masked-LM (`mlm`) and next-sentence (`nsp`) heads;
    `config` is its `BERTConfig`."""

    def __init__(self, vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_layers, dropout, max_len=1000, *,
                 detach_pos_embedding=False, fused_attention=False, hidden_act="relu", layer_norm_eps=1e-5,
                 embedding_norm=False, attention_dropout=None): ...

    @classmethod
    def from_config(cls, cfg, *, detach_pos_embedding=False, fused_attention=False): ...

    def forward(self, tokens, segments, valid_lens=None, pred_positions=None):
        """(encoded_X (B, T, H), mlm_Y_hat (B, P, V) or None without `pred_positions`, nsp_Y_hat (B, 2))."""


class BERTClassifier:
    """The chapter's NLI model: `bert`'s encoder and pooler plus a new `num_classes`-way `output`
    layer (the MLM and NSP heads are not kept; 3: SNLI's labels, the chapter's `BERTClassifier(bert)`).
    `cls_only`: the last block computes <cls> only (same logits)."""

    def __init__(self, bert, cls_only=False, num_classes=3): ...

    @property
    def num_classes(self) -> int:
        """How many labels the classifier scores: its `output` layer's width."""

    def forward(self, inputs, segments=None, valid_lens=None):
        """(B, num_classes) logits, of `net((tokens, segments, valid_lens))` as the book calls it or
        of `net(tokens, segments, valid_lens)`."""


def set_fused_attention(net, enabled=True):
    """Switch every attention layer of `net` to the fused kernels (or back to the book's); returns `net`."""


# --- checkpoint.py ----------------------------------------------------------------------------

def read_params(path) -> dict:
    """The tensors of a params file in this backend's format: {name in its format: numpy array}."""


def write_params(params, path) -> None:
    """Write {name: array} as a params file of this backend's format, atomically, in order."""


def load_pretrained_model(pretrained_model, num_hiddens=None, ffn_num_hiddens=None, num_heads=None, num_layers=None,
                          dropout=None, max_len=None, devices=None) -> tuple:
    """The book's loader: `(bert, vocab)` from a data-hub name, a packaged checkpoint ('minilm-l6'), a
    folder in the book's layout and this backend's format, or a Hugging Face BERT folder. The book's
    parameters in the book's order; sizes left out (None) are read off the checkpoint, `dropout` too
    (config.json's, else 0.1) and is honoured when given; `devices` None is the CPU. `bert(tokens,
    segments, valid_lens, pred_positions)` returns `(encoded_X, mlm_Y_hat, nsp_Y_hat)`."""


def save_pretrained(bert, vocab, folder) -> None:
    """`vocab.json`, `config.json` and `pretrained.params` (written last: its presence means complete)."""


def save_classifier(net, vocab, config, folder, task=None) -> None:
    """`vocab.json`, `config.json` (kind 'classifier', with `core.folders.classifier_config`: the
    `task`, a `core.folders.TaskRecord` whose labels are as many as the net's outputs; None: SNLI's)
    and `classifier.params` (written last); `config` None: the one the classifier carries."""


def load_classifier(folder, devices) -> tuple:
    """`(net, vocab, config)` of what `save_classifier` wrote: one output per label the folder records."""


# --- train.py ---------------------------------------------------------------------------------

def try_all_gpus() -> list:
    """Every GPU, or [cpu] when there is none (never [])."""


def split_batch_multi_inputs(X, y, devices) -> tuple:
    """`(X_shards, y_shards)`: each input of the batch and its labels split along the batch axis,
    one `(tokens, segments, valid_lens)` tuple and one label array per device."""


def evaluate_accuracy(net, data_iter, devices, split_f=None) -> float:
    """Accuracy over `data_iter` with dropout off (NaN for no examples)."""


def train_batch_ch13(net, X, y, loss, trainer, devices, split_f=None) -> tuple:
    """One optimizer step on a batch, the book's: `(sum of per-example losses, number correct)` as floats."""


class FinetuneStep:
    """What core/training.py's `train_epochs` drives: the net placed on `devices` (wrapped for several
    GPUs, compiled with `graph`), one optimizer step per call. The loss is the book's per-example
    loss (`make_loss`), the gradient its sum (torch) or mean (MXNet's `trainer.step(batch_size)`),
    as each book does. `split_f` is the MXNet book's batch splitter (`split_batch_multi_inputs`);
    `precision` 'bfloat16' autocasts the forward pass where the framework can. `micro_batch` N
    computes each (per-device) batch in chunks of at most N rows (`core.batching.chunk_bounds`) and
    sums their gradients: the same update, with one chunk's activations in memory at a time.
    `max_grad_norm` G clips the global norm of the batch's *mean* gradient to G before the update
    (whatever the backend differentiates). `learning_rate` is read and set before each step (a schedule's).
    `world` (`init_distributed`'s; None: one process) of several processes: the net on this process's
    one device, each call computes this rank's shard of the (global) batch (`World.training_shard`)
    with the whole batch's gradient, and `read` and `evaluate` give the whole job's figures."""

    learning_rate: Any

    def __init__(self, net, loss, trainer, devices, split_f=None, *, precision="float32", graph=False,
                 micro_batch=None, max_grad_norm=None, world=None): ...

    def __call__(self, features, labels):
        """(loss sum, number correct) of the step, left on the device: no host synchronisation."""

    def read(self, sums):
        """Such sums (or sums of them) as two floats, once every queued step has finished; summed
        over the ranks of a distributed job."""

    def evaluate(self, data_iter):
        """Accuracy over `data_iter` with dropout off (of every rank's shards, in a distributed job)."""

    def reseed(self, seed):
        """Seed the framework's RNG (dropout)."""

    def compile_ahead(self, train_batches, eval_batches=()):
        """Make ready what batches like these will need (core/training.py calls it before the first
        step with `core.batching.template_batches`): JAX compiles their programs on a thread of its
        own; torch and MXNet compile nothing per shape ahead, and do nothing."""


def train_ch13(net, train_iter, test_iter, loss, trainer, num_epochs, devices, split_f=None, *, verbose=True,
               on_epoch=None) -> list:
    """The book's loop: the sums read after every batch, the timer over training batches only; the
    book's two printed lines; returns one `core.training.EpochRecord` per epoch."""


def train_fast(net, train_iter, test_iter, loss, trainer, num_epochs, devices, split_f=None, *,
               precision="float32", graph=False, verbose=True, on_epoch=None) -> list:
    """`train_ch13` with the sums read once per epoch (the timer over the whole pass); the same records."""


def predict_proba(net, token_ids, segments, valid_lens, devices, batch_size=512):
    """Class probabilities (N, net.num_classes) as a numpy array, dropout off, `batch_size` rows at a time."""


# --- pretrain.py ------------------------------------------------------------------------------

def initialize_bert(net, devices, init="book") -> None:
    """The model on `devices`, initialised by `init` ('book': the backend's book init; 'xavier':
    MXNet's `init.Xavier()`, the same distribution in every backend)."""


class PretrainStep:
    """What core/pretraining.py's `train_steps` drives: one step of the book's `train_bert`. In a
    `world` of several processes, each rank computes its shard of every batch (`load`), the losses'
    means dividing by the whole batch's totals (`core.pretraining.BatchTotals`), so that the update
    and the losses are those of the whole batch."""

    learning_rate: Any

    def __init__(self, net, loss, vocab_size, trainer, devices, mlm_loss="masked", *, world=None): ...

    def load(self, batch):
        """The book's 7-tuple batch (this rank's shard of it) on the device(s)."""

    def __call__(self, inputs):
        """(MLM loss, NSP loss) of one optimizer step, as floats, the step finished (the whole
        batch's, in a distributed job)."""

    def reseed(self, seed):
        """Seed the framework's RNG (dropout)."""


def train_bert(train_iter, net, loss, vocab_size, devices, num_steps, *, trainer=None, lr=0.01, mlm_loss="masked",
               start_step=0, seed=None, on_step=None, verbose=True, warmup_steps=0, lr_schedule="constant") -> list:
    """The book's pretraining loop up to step `num_steps`; the book's two printed lines; returns
    one `core.pretraining.StepRecord` per step run."""


def save_training_state(folder, net, trainer, step) -> dict:
    """The model and optimizer state of step `step` in `folder`, each file atomic; returns
    {'params': file name, 'trainer': file name} for the resume state."""


def load_training_state(folder, files, net, trainer, devices) -> None:
    """Put back what `save_training_state` wrote."""


# --- runtime.py -------------------------------------------------------------------------------

def parse_devices(spec) -> list:
    """'cpu', 'cuda' (every GPU), or a list like 'cuda:0,cuda:1'; None: every GPU, else the CPU."""


def init_distributed(timeout=JOIN_TIMEOUT_S):
    """Join the data-parallel job the environment describes (torchrun's RANK/WORLD_SIZE, ps-lite's
    DMLC_* variables), the framework's own engine, whose waits give up after `timeout` seconds; a
    `core.distributed.World` with the framework's `all_sum` and `barrier`. Not in a job: `World()`."""


def launch_processes(nproc, port) -> list:
    """The `core.distributed.LaunchProcess`es of an `nproc`-worker job on this machine meeting at
    127.0.0.1:`port` (workers with the environment `init_distributed` reads, and any helper process
    the engine needs, such as MXNet's scheduler and server)."""


def set_seed(seed) -> None:
    """Seed Python's, numpy's and the framework's generators."""


def make_loss():
    """The book's loss: per-example softmax cross-entropy."""


def make_trainer(net, lr, fused=False, optimizer="adam", weight_decay=0.0):
    """The book's Adam at `lr` (`fused`: one kernel per parameter where the framework has it), or
    `optimizer='adamw'`: AdamW, each step first shrinking the weights `core.names.decays` names by
    lr * weight_decay * w (decoupled decay; biases and LayerNorm weights are left alone)."""


def framework_versions() -> dict:
    """{name: version} of the framework and what it runs on, for metrics.json."""


def initialize_classifier_head(net, devices) -> None:
    """As the book: the new `output` layer initialised, the net on `devices`."""


def bert_outputs(bert, token_ids, segments, valid_lens, pred_positions, device) -> tuple:
    """`(encoded_X, mlm_Y_hat, nsp_Y_hat)` of a `BERTModel` with dropout off, as numpy arrays."""


def classifier_logits(net, token_ids, segments, valid_lens, device):
    """A `BERTClassifier`'s logits with dropout off, as a numpy array."""
