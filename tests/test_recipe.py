"""BERT's fine-tuning recipe as options (AdamW's decoupled decay, warm-up and linear decay, gradient
clipping, gradient accumulation, keeping the best epoch), each checked by its effect, in every backend."""
import math

import numpy as np
import pytest

from nlibert import jobs
from nlibert.backends import BACKENDS, installed_backends, load_backend
from nlibert.core.names import decays, to_canonical
from nlibert.core.schedule import LRSchedule
from nlibert.core.sample import write_sample_snli
from nlibert.core.settings import FinetuneSettings
from nlibert.core.training import train_epochs
from nlibert.core.vocab import RESERVED_TOKENS, Vocab

VOCAB = Vocab.from_idx_to_token(["<unk>"] + RESERVED_TOKENS + [f"w{i}" for i in range(20)])
SIZES = dict(num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=1, dropout=0.0, max_len=16)
IDS = np.array([[2, 5, 6, 3, 8, 9, 3, 0], [2, 7, 18, 3, 10, 11, 19, 3], [2, 11, 12, 13, 3, 14, 3, 0],
                [2, 15, 3, 16, 17, 3, 0, 0]], dtype=np.int32)
SEGMENTS = np.array([[0, 0, 0, 0, 1, 1, 1, 0]] * 4, dtype=np.int32)
VALID_LENS = np.array([7, 8, 7, 6], dtype=np.int32)
LABELS = np.array([0, 2, 1, 2], dtype=np.int32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One torch classifier with dropout 0, converted to every installed backend's format: {backend: folder}."""
    root = tmp_path_factory.mktemp("recipe")
    torch_backend = load_backend("torch")
    torch_backend.set_seed(0)
    net = torch_backend.BERTClassifier(torch_backend.BERTModel(len(VOCAB), **SIZES))
    torch_backend.save_classifier(net, VOCAB, None, root / "torch")
    for name in installed_backends():
        if name != "torch":
            jobs.run_convert(str(root / "torch"), str(root / name), to=name)
    return {name: root / name for name in installed_backends()}


def _params(backend, name, net, folder) -> dict:
    """The net's parameters under canonical names, as numpy arrays (saved and read back)."""
    backend.save_classifier(net, VOCAB, None, folder)
    return to_canonical(backend.read_params(folder / "classifier.params"), name)


def _one_step(name, folders, tmp_path, rows=slice(None), lr=1e-3, optimizer="adam", weight_decay=0.0,
              max_grad_norm=None, micro_batch=None) -> tuple[dict, dict]:
    """The classifier's parameters before and after one optimizer step on the rows `rows` of the batch."""
    backend = load_backend(name)
    devices = backend.parse_devices("cpu")
    net, _, _ = backend.load_classifier(str(folders[name]), devices)
    before = _params(backend, name, net, tmp_path / "before")
    trainer = backend.make_trainer(net, lr, optimizer=optimizer, weight_decay=weight_decay)
    step = backend.FinetuneStep(net, backend.make_loss(), trainer, devices, micro_batch=micro_batch,
                                max_grad_norm=max_grad_norm)
    step.read(step((IDS[rows], SEGMENTS[rows], VALID_LENS[rows]), LABELS[rows]))
    return before, _params(backend, name, net, tmp_path / "after")


def _assert_same_step(params, expected, atol):
    """The same parameters but the attention key biases: their true gradient is exactly 0 (softmax
    ignores a shift shared by every key), float noise Adam normalises into steps of up to lr either
    way (tests/test_torch_mxnet_gradient_parity.py's one-Adam-step test)."""
    for key, value in expected.items():
        if not key.endswith("W_k.bias"):
            np.testing.assert_allclose(params[key], value, atol=atol, err_msg=key)


def test_decay_spares_biases_and_layer_norm_weights():
    assert decays("encoder.blks.0.attention.W_q.weight") and decays("output.weight")
    assert decays("encoder.token_embedding.weight") and decays("encoder.pos_embedding")
    for name in ("output.bias", "encoder.blks.0.addnorm1.ln.weight", "encoder.blks.3.addnorm2.ln.bias",
                 "encoder.embedding_ln.weight", "mlm.mlp.2.weight", "hidden.0.bias"):
        assert not decays(name), name


@pytest.mark.parametrize("name", BACKENDS)
def test_adamw_shrinks_decayed_weights_by_lr_wd_w_and_leaves_the_rest_to_adam(name, folders, tmp_path):
    """AdamW's step is Adam's (same gradient) minus lr * wd * w on the decayed weights only."""
    lr, wd = 1e-3, 0.5
    before, adam = _one_step(name, folders, tmp_path / "adam", lr=lr)
    _, adamw = _one_step(name, folders, tmp_path / "adamw", lr=lr, optimizer="adamw", weight_decay=wd)
    for key, w in before.items():
        expected = -lr * wd * w if decays(key) else np.zeros_like(w)
        np.testing.assert_allclose(adamw[key] - adam[key], expected, atol=1e-6, err_msg=key)
    assert any(not decays(key) for key in before) and any(decays(key) for key in before)


@pytest.mark.parametrize("name", BACKENDS)
def test_clipping_bounds_the_update_of_a_huge_rate_step(name, folders, tmp_path):
    """A gradient clipped to a norm G far below Adam's eps moves the weights by about lr * g / eps
    (MXNet's Adam puts eps before its bias correction: less), so the whole update's norm is at most
    lr * G / eps and doubles with G; unclipped, Adam's first step moves weights by about lr. One
    example: the mean and sum gradients are the same."""
    lr, norm, eps = 10.0, 1e-10, 1e-8

    def moved(max_grad_norm, folder):
        before, after = _one_step(name, folders, tmp_path / folder, rows=slice(0, 1), lr=lr,
                                  max_grad_norm=max_grad_norm)
        return math.sqrt(sum(float(((after[k] - before[k]).astype(np.float64) ** 2).sum()) for k in before)), \
            max(np.abs(after[k] - before[k]).max() for k in before)

    clipped, twice = moved(norm, "clipped")[0], moved(2 * norm, "twice")[0]
    assert 0 < clipped <= lr * norm / eps * 1.01 and twice == pytest.approx(2 * clipped, rel=0.03)
    assert moved(None, "unclipped")[1] > 1.0


@pytest.mark.backends("mxnet", "jax")
def test_the_backends_take_the_same_recipe_step(folders, tmp_path):
    """AdamW with decay and clipping, one example (mean and sum gradients agree): torch and JAX give
    the same parameters. MXNet's Adam adds eps before its bias correction (tests/test_torch_mxnet_gradient_parity.py's
    one-Adam-step test), which moves an entry whose gradient is near eps by up to lr more or less
    (measured here: 1.1% of entries, as many as with the book's Adam alone); the rest agree as closely."""
    lr = 1e-3
    steps = {name: _one_step(name, folders, tmp_path / name, rows=slice(1, 2), lr=lr, optimizer="adamw",
                             weight_decay=0.1, max_grad_norm=1.0)[1] for name in BACKENDS}  # |g| 1..3
    if "jax" in steps:
        _assert_same_step(steps["jax"], steps["torch"], atol=2e-5)
    if "mxnet" in steps:
        diffs = np.concatenate([np.abs(steps["mxnet"][k] - v).ravel() for k, v in steps["torch"].items()])
        assert diffs.max() <= lr and np.mean(diffs <= 2e-5) >= 0.98, (diffs.max(), np.mean(diffs <= 2e-5))


@pytest.mark.parametrize("name", BACKENDS)
def test_grad_accum_gives_the_whole_batch_update(name, folders, tmp_path):
    settings = FinetuneSettings(batch_size=4, grad_accum=3)
    assert settings.chunk_rows() == 2 and FinetuneSettings(batch_size=16, grad_accum=4).chunk_rows() == 4
    _, whole = _one_step(name, folders, tmp_path / "whole")
    _, chunked = _one_step(name, folders, tmp_path / "chunked", micro_batch=settings.chunk_rows())
    _assert_same_step(chunked, whole, atol=1e-6)


def test_the_schedule_warms_up_then_decays_to_zero():
    settings = FinetuneSettings(lr=1.0, epochs=2, warmup_ratio=0.25, lr_schedule="linear")
    assert settings.schedule(4) == LRSchedule(1.0, 8, 2, "linear")
    lr_at = settings.schedule(4).lr_at()
    assert [lr_at(s) for s in range(1, 9)] == pytest.approx([0.5, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    assert FinetuneSettings().schedule(4).lr_at() is None  # the book's constant rate
    assert FinetuneSettings(warmup_steps=3, epochs=1).schedule(10) == LRSchedule(1e-4, 10, 3, "constant")
    assert "schedule_epochs" in settings.signature() and "schedule_epochs" not in FinetuneSettings().signature()


@pytest.mark.parametrize("name", BACKENDS)
def test_each_step_runs_at_its_scheduled_rate(name, folders, tmp_path):
    """The epoch loop sets every step's rate before it: the trainer's rate during each step is the
    schedule's, and a step at rate 0 leaves the weights alone."""
    backend = load_backend(name)
    devices = backend.parse_devices("cpu")
    net, _, _ = backend.load_classifier(str(folders[name]), devices)
    step = backend.FinetuneStep(net, backend.make_loss(), backend.make_trainer(net, 1.0), devices)
    used = []

    class Recording:
        """The step, noting the rate the trainer has when each step runs."""
        learning_rate = property(lambda self: step.learning_rate,
                                 lambda self, lr: setattr(step, "learning_rate", lr))

        def __call__(self, features, labels):
            used.append(step.learning_rate)
            return step(features, labels)

        def __getattr__(self, attr):
            return getattr(step, attr)

    batches = [((IDS[i:i + 2], SEGMENTS[i:i + 2], VALID_LENS[i:i + 2]), LABELS[i:i + 2]) for i in (0, 2)]
    lr_at = LRSchedule(1e-3, 4, 2, "linear").lr_at()
    train_epochs(Recording(), batches, None, 2, verbose=False, lr_at=lr_at)
    assert used == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])
    before = _params(backend, name, net, tmp_path / "before")
    step.learning_rate = 0.0
    step.read(step(*batches[0]))
    after = _params(backend, name, net, tmp_path / "after")
    assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_snli(tmp_path_factory.mktemp("data") / "snli", num_train=48, num_test=16, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_save_best_keeps_the_best_epochs_model(name, sample, tmp_path):
    """A run with a rate high enough to get worse: OUT/model is the model of its epoch of best
    validation accuracy, the same as a run stopped after that epoch; metrics.json says which."""
    def run(out, epochs, save_best):
        return jobs.run_finetune(FinetuneSettings(
            backend=name, pretrained="random", data=str(sample), max_len=24, batch_size=16, epochs=epochs,
            lr=0.05, dropout=0.0, device="cpu", mode="book", out=str(tmp_path / out), save_best=save_best,
            validation_split=0.25))

    best = run("best", 4, True)
    accuracies = [r["validation_acc"] for r in best["epochs"]]
    assert best["best_epoch"] == 1 + accuracies.index(max(accuracies))
    assert best["hyperparameters"]["save_best"] is True
    short = run("short", best["best_epoch"], False)
    assert short["best_epoch"] is None
    backend = load_backend(name)
    kept, last = (backend.read_params(tmp_path / out / "model" / "classifier.params") for out in ("best", "short"))
    assert all(np.array_equal(kept[k], last[k]) for k in kept)


@pytest.mark.parametrize("changes, message", [
    (dict(weight_decay=-0.1, optimizer="adamw"), "--weight-decay must be >= 0"),
    (dict(weight_decay=0.01), "--weight-decay: only with --optimizer adamw"),
    (dict(optimizer="sgd"), "--optimizer 'sgd'"),
    (dict(lr_schedule="cosine"), "--lr-schedule 'cosine'"),
    (dict(warmup_ratio=1.0), r"--warmup-ratio must be in \[0, 1\)"),
    (dict(warmup_steps=-1), "--warmup-steps must be >= 0"),
    (dict(warmup_ratio=0.1, warmup_steps=5), "give one of them"),
    (dict(max_grad_norm=0.0), "--max-grad-norm must be a positive number"),
    (dict(grad_accum=0), "--grad-accum must be a positive integer"),
    (dict(grad_accum=2, micro_batch=8), "--grad-accum K is --micro-batch"),
    (dict(grad_accum=600), "more chunks than"),
])
def test_bad_recipe_options_are_refused_naming_the_option(changes, message):
    with pytest.raises(ValueError, match=message):
        FinetuneSettings(**changes)


def test_the_cli_refuses_a_negative_weight_decay_and_writes_nothing(tmp_path, capsys):
    from nlibert.cli import main
    out = tmp_path / "out"
    assert main(["finetune", "--optimizer", "adamw", "--weight-decay", "-1", "--out", str(out)]) == 2
    assert "nlibert: error: --weight-decay must be >= 0" in capsys.readouterr().err
    assert not out.exists()
