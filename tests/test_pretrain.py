"""BERT pretraining in both backends: the losses, the loop, resuming, and `nlibert pretrain` -> `finetune`."""
import dataclasses
import json
import re

import numpy as np
import pytest
from needs import require_backend

require_backend("torch")
import torch  # noqa: E402

from nlibert import cli, jobs  # noqa: E402
from nlibert.backends import BACKENDS, load_backend  # noqa: E402
from nlibert.core.settings import PretrainSettings  # noqa: E402
from nlibert.core.wiki import WikiTextDataset, read_wiki  # noqa: E402

torch.set_num_threads(1)

TINY = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_layers=2)


def write_wiki(folder, num_paragraphs=60, seed=0):
    """Six topics with eight words each; one paragraph per line, 3 to 5 sentences of 3 to 6 words."""
    rng = np.random.default_rng(seed)
    topics = [[f"t{k}w{i}" for i in range(8)] for k in range(6)]
    lines = [" = Title = \n", " \n"]
    for p in range(num_paragraphs):
        sentences = [" ".join(rng.choice(topics[p % 6], rng.integers(3, 7))) for _ in range(rng.integers(3, 6))]
        lines.append(" " + " . ".join(sentences) + " . \n")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wiki.valid.tokens").write_text("".join(lines), encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Tests stay on one torch thread (the CPU is shared by the xdist workers)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_wiki(tmp_path_factory.mktemp("corpus") / "wikitext-tiny")


@pytest.fixture(scope="module")
def dataset(corpus):
    rng = np.random.default_rng(0)
    return WikiTextDataset(read_wiki(corpus, rng), 24, rng=rng)


def backend_and_model(name, vocab_size, dropout=0.0):
    backend = load_backend(name)
    devices = backend.parse_devices("cpu")
    backend.set_seed(0)
    net = backend.BERTModel(vocab_size, dropout=dropout, max_len=24, **TINY)
    backend.initialize_bert(net, devices)
    return backend, net, devices


@pytest.mark.parametrize("name", BACKENDS)
def test_a_few_steps_lower_both_losses(name, dataset, capsys):
    backend, net, devices = backend_and_model(name, len(dataset.vocab))
    batch = dataset[np.arange(32)]  # one fixed batch: a tiny model overfits it in a few steps
    records = backend.train_bert([batch], net, backend.make_loss(), len(dataset.vocab), devices, 30)
    assert [r.step for r in records] == list(range(1, 31)) and all(r.num_pairs == 32 for r in records)
    first, last = records[0], records[-5:]
    assert np.mean([r.mlm_loss for r in last]) < 0.5 * first.mlm_loss
    assert np.mean([r.nsp_loss for r in last]) < 0.4 < first.nsp_loss
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"MLM loss \d+\.\d{3}, NSP loss \d+\.\d{3}", lines[-2])
    assert re.fullmatch(r"\d+\.\d sentence pairs/sec on \[.*\]", lines[-1])
    assert f"{np.mean([r.mlm_loss for r in records]):.3f}" in lines[-2]  # the book prints step means


def _batch_loss(name, backend, net, batch, vocab_size, mlm_loss):
    """One `_get_batch_loss_bert` call, as floats (mlm, nsp)."""
    if name == "torch":
        from nlibert.backends.torch.pretrain import _get_batch_loss_bert
        net.eval()
        X = [torch.as_tensor(a) for a in batch]
        with torch.no_grad():
            mlm_l, nsp_l, _ = _get_batch_loss_bert(net, backend.make_loss(), vocab_size, *X, mlm_loss=mlm_loss)
        return float(mlm_l), float(nsp_l)
    if name == "jax":
        import jax
        from nlibert.backends.jax.pretrain import _batch_loss as jax_batch_loss
        _, (mlm_l, nsp_l) = jax_batch_loss(net.module, net.params, backend.make_loss(), vocab_size, *batch,
                                           np.ones(len(batch[0]), np.float32), jax.random.PRNGKey(0), mlm_loss)
        return float(mlm_l), float(nsp_l)
    from mxnet import np as mnp
    from nlibert.backends.mxnet.pretrain import _get_batch_loss_bert
    shards = [[mnp.array(a, dtype=a.dtype)] for a in batch]
    mlm_ls, nsp_ls, _ = _get_batch_loss_bert(net, backend.make_loss(), vocab_size, *shards, mlm_loss=mlm_loss)
    return float(mlm_ls[0]), float(nsp_ls[0])


@pytest.mark.parametrize("name", BACKENDS)
def test_masked_and_book_mlm_losses(name, dataset):
    backend, net, _ = backend_and_model(name, len(dataset.vocab))
    vocab_size = len(dataset.vocab)
    batch = dataset[np.arange(16)]
    assert batch[4].min() == 0  # padded prediction slots are there
    masked, nsp = _batch_loss(name, backend, net, batch, vocab_size, "masked")
    book, nsp_book = _batch_loss(name, backend, net, batch, vocab_size, "book")
    assert nsp == pytest.approx(nsp_book)
    assert abs(masked - book) > 1e-3
    # masked: the mean over real predictions only; book: over every slot, pads (label 0) included
    _, mlm_Y_hat, _ = backend.bert_outputs(net, *batch[:4], backend.parse_devices("cpu")[0])
    log_p = mlm_Y_hat - np.log(np.exp(mlm_Y_hat - mlm_Y_hat.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - mlm_Y_hat.max(-1, keepdims=True)
    per_slot = -np.take_along_axis(log_p, batch[5][..., None], axis=-1)[..., 0]
    weights = batch[4]
    assert masked == pytest.approx((per_slot * weights).sum() / weights.sum(), rel=1e-4)
    assert book == pytest.approx(per_slot.mean(), rel=1e-4)
    # without padded slots the two agree
    full = tuple(a.copy() for a in batch)
    full[4][:] = 1.0
    assert _batch_loss(name, backend, net, full, vocab_size, "masked")[0] == pytest.approx(
        _batch_loss(name, backend, net, full, vocab_size, "book")[0], rel=1e-5)
    with pytest.raises(ValueError, match="mlm_loss"):
        _batch_loss(name, backend, net, batch, vocab_size, "mean")


def test_torch_book_loss_object_serves_book_mode_only(dataset):
    from nlibert.backends.torch.pretrain import _get_batch_loss_bert
    backend, net, _ = backend_and_model("torch", len(dataset.vocab))
    net.eval()
    X = [torch.as_tensor(a) for a in dataset[np.arange(16)]]
    with torch.no_grad():
        book_object = _get_batch_loss_bert(net, torch.nn.CrossEntropyLoss(), len(dataset.vocab), *X, mlm_loss="book")
        ours = _get_batch_loss_bert(net, backend.make_loss(), len(dataset.vocab), *X, mlm_loss="book")
    torch.testing.assert_close(book_object[0], ours[0])
    with pytest.raises(ValueError, match="reduction='none'"):
        _get_batch_loss_bert(net, torch.nn.CrossEntropyLoss(), len(dataset.vocab), *X, mlm_loss="masked")


@pytest.mark.backends("mxnet")
def test_mxnet_pretrains_and_resumes_across_two_devices(dataset, tmp_path):
    import mxnet as mx
    backend = load_backend("mxnet")
    devices = [mx.cpu(0), mx.cpu(1)]
    backend.set_seed(0)
    net = backend.BERTModel(len(dataset.vocab), dropout=0.0, max_len=24, **TINY)
    backend.initialize_bert(net, devices)
    trainer = backend.make_trainer(net, 0.01)
    records = backend.train_bert([dataset[np.arange(20)]], net, backend.make_loss(), len(dataset.vocab),
                                 devices, 2, trainer=trainer, verbose=False)
    assert len(records) == 2 and all(np.isfinite([r.mlm_loss, r.nsp_loss]).all() for r in records)
    w = net.encoder.token_embedding.weight
    np.testing.assert_array_equal(w.data(mx.cpu(0)).asnumpy(), w.data(mx.cpu(1)).asnumpy())
    # Resuming on two devices: the Adam states live in the kvstore's updater there.
    assert trainer._update_on_kvstore
    from nlibert.backends.mxnet.pretrain import load_training_state, save_training_state
    files = save_training_state(tmp_path, net, trainer, 2)
    backend.set_seed(1)  # another start: everything must come from the files
    resumed = backend.BERTModel(len(dataset.vocab), dropout=0.0, max_len=24, **TINY)
    backend.initialize_bert(resumed, devices)
    resumed_trainer = backend.make_trainer(resumed, 0.01)
    load_training_state(tmp_path, files, resumed, resumed_trainer, devices)
    for model, model_trainer in ((net, trainer), (resumed, resumed_trainer)):
        backend.train_bert([dataset[np.arange(20)]], model, backend.make_loss(), len(dataset.vocab), devices, 3,
                           trainer=model_trainer, start_step=2, seed=0, verbose=False)
    expected, found = _params("mxnet", net), _params("mxnet", resumed)
    for key in expected:
        np.testing.assert_array_equal(found[key], expected[key], err_msg=key)


def pretrain(out_dir, on_step=None, **settings):
    """`jobs.run_pretrain` with settings given as keywords."""
    return jobs.run_pretrain(PretrainSettings(out=out_dir, **settings), on_step=on_step)


def _pretrain_kwargs(name, corpus, **extra):
    return {**dict(backend=name, corpus=str(corpus), steps=8, batch_size=32, max_len=24, device="cpu",
                   checkpoint_every=2, **TINY), **extra}


# Warm-up, linear decay, fused attention and dynamic masking, with a checkpoint in the data's second
# pass (4 batches of 64 per pass), so that resuming must also restore the schedule and the masks.
SCHEDULED = dict(batch_size=64, warmup_steps=3, lr_schedule="linear", mode="fast", remask=True)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, SCHEDULED], ids=["book", "scheduled"])
@pytest.mark.parametrize("name", BACKENDS)
def test_resuming_after_a_crash_ends_where_an_uninterrupted_run_ends(name, options, corpus, tmp_path, capsys):
    crash_step = 7 if options else 5
    whole = pretrain(out_dir=str(tmp_path / "whole"), **_pretrain_kwargs(name, corpus, **options))
    assert whole["completed"] and whole["last_step"] == 8

    class Crash(Exception):
        pass

    def crash(record):
        if record.step == crash_step:
            raise Crash

    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        pretrain(out_dir=str(out), on_step=crash, **_pretrain_kwargs(name, corpus, **options))
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["step"] == crash_step - 1 and not (out / "pretrained.params").exists()
    if options:
        assert state["data"]["epoch"] == 1 and state["data"]["remask"]  # inside the remasked second pass
        # A checkpoint as the release before one schedule vocabulary wrote it (`lr_decay`: none|linear)
        # resumes too.
        signature = state["signature"]
        signature["lr_decay"] = {"constant": "none", "linear": "linear"}[signature.pop("lr_schedule")]
        (out / "resume" / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    resumed = pretrain(out_dir=str(out), **_pretrain_kwargs(name, corpus, **options))
    assert f"resuming from {out / 'resume'} at step {crash_step}" in capsys.readouterr().out
    assert resumed["resumed_from_step"] == crash_step - 1
    assert [h["step"] for h in resumed["history"]] == list(range(1, 9))
    for key in ("mlm_loss", "nsp_loss", "lr"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in whole["history"]], key
    backend = load_backend(name)
    a, b = (backend.read_params(str(d / "pretrained.params")) for d in (tmp_path / "whole", out))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # other settings against the same resume folder are refused; --no-resume starts over
    with pytest.raises(ValueError, match="lr"):
        pretrain(out_dir=str(out), **_pretrain_kwargs(name, corpus, **options, lr=0.001))
    if options:  # a decaying rate depends on the number of steps; a warm-up, a mode, masking on the run
        for changed, key in ((dict(steps=10), "decay_steps"), (dict(warmup_steps=2), "warmup_steps"),
                             (dict(mode="book"), "mode"), (dict(remask=False), "remask")):
            with pytest.raises(ValueError, match=key):
                pretrain(out_dir=str(out), **_pretrain_kwargs(name, corpus, **{**options, **changed}))
    fresh = pretrain(out_dir=str(out), resume=False, **_pretrain_kwargs(name, corpus, steps=2))
    assert fresh["resumed_from_step"] is None and fresh["last_step"] == 2


@pytest.mark.backends("mxnet")
def test_cli_pretrain_stop_resume_then_finetune_in_both_backends(corpus, tmp_path, capsys):
    out = tmp_path / "bert"
    args = ["pretrain", "--backend", "torch", "--corpus", str(corpus), "--steps", "6", "--batch-size", "32",
            "--max-len", "24", "--num-hiddens", "32", "--ffn-num-hiddens", "64", "--device", "cpu",
            "--out", str(out)]
    assert cli.main(args + ["--stop-after", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("read ") and "MLM loss" in printed and "stopped after step 3 of 6" in printed
    assert not (out / "pretrained.params").exists()
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "at step 4" in printed and f"wrote the pretrained checkpoint and metrics.json to {out}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["completed"] and [h["step"] for h in metrics["history"]] == [1, 2, 3, 4, 5, 6]
    assert metrics["hyperparameters"]["mlm_loss"] == "masked"
    config = json.loads((out / "config.json").read_text())
    assert (config["format"], config["kind"], config["num_hiddens"], config["num_heads"]) == ("torch", "pretrained", 32, 2)

    small = ["--train-limit", "64", "--test-limit", "32", "--epochs", "1", "--batch-size", "32",
             "--max-len", "24", "--device", "cpu"]
    assert cli.main(["finetune", "--pretrained", str(out), "--out", str(tmp_path / "ft-torch"), *small]) == 0
    assert cli.main(["convert", str(out), str(tmp_path / "bert-mxnet"), "--to", "mxnet"]) == 0
    assert cli.main(["finetune", "--backend", "mxnet", "--pretrained", str(tmp_path / "bert-mxnet"),
                     "--out", str(tmp_path / "ft-mxnet"), *small]) == 0
    for folder in ("ft-torch", "ft-mxnet"):
        ft = json.loads((tmp_path / folder / "metrics.json").read_text())
        assert ft["pretrained"].endswith(("bert", "bert-mxnet")) and 0 <= ft["test_acc"] <= 1
    capsys.readouterr()
    assert cli.main(["pretrain", "--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere" in capsys.readouterr().err


def _params(name, net):
    """Every parameter of a model as numpy arrays, by structured name."""
    if name == "torch":
        return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}
    if name == "jax":
        from nlibert.backends.jax.checkpoint import _flatten
        return {k: np.asarray(v) for k, v in _flatten(net.params).items()}
    return {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}


@pytest.mark.parametrize("name", BACKENDS)
def test_warm_up_and_decay_set_the_rate_each_step_uses(name, dataset):
    vocab_size, batch = len(dataset.vocab), dataset[np.arange(16)]
    backend, net, devices = backend_and_model(name, vocab_size)
    records = backend.train_bert([batch], net, backend.make_loss(), vocab_size, devices, 8, lr=0.01,
                                 warmup_steps=4, lr_schedule="linear", verbose=False)
    assert [r.lr for r in records] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.0075, 0.005, 0.0025, 0.0])
    backend, net, devices = backend_and_model(name, vocab_size)
    records = backend.train_bert([batch], net, backend.make_loss(), vocab_size, devices, 3, lr=0.01,
                                 warmup_steps=2, verbose=False)
    assert [r.lr for r in records] == pytest.approx([0.005, 0.01, 0.01])  # then constant
    # Without a schedule the trainer's own rate is left alone (the book) and recorded.
    backend, net, devices = backend_and_model(name, vocab_size)
    records = backend.train_bert([batch], net, backend.make_loss(), vocab_size, devices, 2,
                                 trainer=backend.make_trainer(net, 0.003), verbose=False)
    assert [r.lr for r in records] == pytest.approx([0.003, 0.003])
    # The optimizer really uses it: a first warm-up step at lr 0.01 over 4 steps is a plain step at 0.0025.
    after = {}
    for key, kwargs in (("warm-up", dict(lr=0.01, warmup_steps=4)), ("plain", dict(lr=0.0025))):
        backend, net, devices = backend_and_model(name, vocab_size)
        backend.train_bert([batch], net, backend.make_loss(), vocab_size, devices, 1, verbose=False, **kwargs)
        after[key] = _params(name, net)
    for key in after["plain"]:
        np.testing.assert_array_equal(after["warm-up"][key], after["plain"][key], err_msg=key)
    with pytest.raises(ValueError, match="warmup_steps"):
        backend.train_bert([batch], net, backend.make_loss(), vocab_size, devices, 1, warmup_steps=-1)
    with pytest.raises(ValueError, match="schedule 'cosine'"):
        backend.train_bert([batch], net, backend.make_loss(), vocab_size, devices, 1, lr_schedule="cosine")


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_fast_mode_gives_the_book_modes_losses(name, corpus, tmp_path, monkeypatch):
    backend = load_backend(name)
    switched = []
    real = backend.set_fused_attention

    def spy(net, enabled=True):
        switched.append(enabled)
        return real(net, enabled)

    monkeypatch.setattr(backend, "set_fused_attention", spy)
    runs = {mode: pretrain(out_dir=str(tmp_path / mode), **_pretrain_kwargs(
        name, corpus, steps=4, dropout=0.0, mode=mode, warmup_steps=2, checkpoint_every=0)) for mode in ("book", "fast")}
    assert switched == [True]  # only the fast run switches to fused attention
    assert runs["fast"]["hyperparameters"]["mode"] == "fast"
    for key in ("mlm_loss", "nsp_loss"):
        np.testing.assert_allclose([h[key] for h in runs["fast"]["history"]],
                                   [h[key] for h in runs["book"]["history"]], rtol=1e-4, err_msg=key)
    assert runs["fast"]["history"][-1]["mlm_loss"] < runs["fast"]["history"][0]["mlm_loss"]


@pytest.mark.backends("mxnet")
def test_mxnet_trainer_state_is_matched_by_parameter_name(dataset, tmp_path):
    """Gluon's trainer orders parameters by global names such as `dense98_weight`; a model built after
    the name counter passed a power of ten (`dense100_...` sorts before `dense99_...`) orders them
    differently, and `Trainer.load_states` (by index) gave Adam states to the wrong parameters."""
    from mxnet import gluon
    from mxnet.gluon import nn as mxnn

    from nlibert.backends.mxnet.pretrain import _trainer_index_by_name, load_training_state, save_training_state
    vocab_size, batch = len(dataset.vocab), dataset[np.arange(16)]
    backend, first, devices = backend_and_model("mxnet", vocab_size, dropout=0.1)
    trainer = backend.make_trainer(first, 0.01)
    backend.train_bert([batch], first, backend.make_loss(), vocab_size, devices, 2, trainer=trainer, seed=0,
                       verbose=False)
    files = save_training_state(tmp_path, first, trainer, 2)
    backend.train_bert([batch], first, backend.make_loss(), vocab_size, devices, 3, trainer=trainer, seed=0,
                       start_step=2, verbose=False)

    # Push the global Dense counter to just below a power of ten, so the next model straddles it.
    counter = int(mxnn.Dense(1).name[len("dense"):])
    for _ in range(10 ** len(str(counter + 20)) - counter - 5):
        mxnn.Dense(1)
    backend, second, devices = backend_and_model("mxnet", vocab_size, dropout=0.1)
    # `make_trainer` lists parameters in structured-name order (the same in every model); a trainer
    # given `collect_params()` sorts them by Gluon's generated names, an order of its own.
    resumed = gluon.Trainer(second.collect_params(), "adam", {"learning_rate": 0.01})
    assert _trainer_index_by_name(second, backend.make_trainer(second, 0.01)) == _trainer_index_by_name(first, trainer)
    assert _trainer_index_by_name(second, resumed) != _trainer_index_by_name(first, trainer)
    load_training_state(tmp_path, files, second, resumed, devices)
    backend.train_bert([batch], second, backend.make_loss(), vocab_size, devices, 3, trainer=resumed, seed=0,
                       start_step=2, verbose=False)
    expected, found = _params("mxnet", first), _params("mxnet", second)
    for key in expected:
        np.testing.assert_array_equal(found[key], expected[key], err_msg=key)

    # A trainer file that does not fit the model is refused, naming the file and the key.
    path = tmp_path / files["trainer"]
    arrays = dict(np.load(path))
    key = "mean:encoder.blks.0.attention.W_q.bias"
    for broken, message in (({k: v for k, v in arrays.items() if k != key}, f"no key {key}"),
                            ({**arrays, key: np.zeros(3, np.float32)}, f"{key} has shape"),
                            ({**arrays, "mean:nowhere.weight": arrays[key]}, "mean:nowhere.weight names no")):
        with open(path, "wb") as f:
            np.savez(f, **broken)
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            load_training_state(tmp_path, files, second, resumed, devices)
        assert files["trainer"] in str(info.value)
    path.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="no-resume"):
        load_training_state(tmp_path, files, second, resumed, devices)


def test_cli_pretrain_passes_the_schedule_mode_and_masking(monkeypatch, capsys):
    seen = {}

    def fake_run_pretrain(settings, on_step=None):
        seen.update(dataclasses.asdict(settings))
        return {"completed": True}

    real = jobs.run_pretrain
    monkeypatch.setattr(jobs, "run_pretrain", fake_run_pretrain)
    assert cli.main(["pretrain", "--corpus", "c", "--out", "o"]) == 0
    assert (seen["warmup_steps"], seen["lr_schedule"], seen["mode"], seen["remask"], seen["init"]) == (
        0, "constant", "book", False, "book")
    assert cli.main(["pretrain", "--corpus", "c", "--out", "o", "--warmup-steps", "20", "--lr-schedule", "linear",
                     "--mode", "fast", "--remask", "--init", "xavier"]) == 0
    assert (seen["warmup_steps"], seen["lr_schedule"], seen["mode"], seen["remask"], seen["init"]) == (
        20, "linear", "fast", True, "xavier")
    # The option's earlier name and words still run: --lr-decay none|linear.
    for word, schedule in (("linear", "linear"), ("none", "constant")):
        assert cli.main(["pretrain", "--corpus", "c", "--out", "o", "--lr-decay", word]) == 0
        assert seen["lr_schedule"] == schedule
    with pytest.raises(SystemExit) as exit_:  # argparse's error, in nlibert's one form
        cli.main(["pretrain", "--corpus", "c", "--out", "o", "--lr-decay", "cosine"])
    assert exit_.value.code == 2
    assert "invalid choice: 'cosine' (choose from 'constant', 'linear')" in capsys.readouterr().err
    monkeypatch.setattr(jobs, "run_pretrain", real)
    assert cli.main(["pretrain", "--corpus", "c", "--out", "o", "--warmup-steps", "-1"]) == 2
    assert "--warmup-steps must be >= 0" in capsys.readouterr().err


@pytest.mark.backends("mxnet", "jax")
def test_xavier_init_gives_torch_the_distribution_of_mxnets_book_init(tmp_path):
    """`--init xavier` in torch and JAX draws every tensor from the interval MXNet's `init.Xavier()`
    uses (the same fans for Dense weights, embeddings and the 3-d positional embedding), biases 0,
    LayerNorm 1/0; `book` stays torch's own defaults (N(0, 1) positional embedding)."""
    from nlibert.core.names import format_key
    from nlibert.core.vocab import Vocab
    vocab = Vocab([f"w{i}" for i in range(300)] * 5, min_freq=1, reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])
    tensors = {}
    for name, init in (("torch", "xavier"), ("torch", "book"), ("mxnet", "xavier"), ("jax", "xavier")):
        backend = load_backend(name)
        backend.set_seed(0)
        net = backend.BERTModel(len(vocab), dropout=0.0, max_len=64, **TINY)
        backend.initialize_bert(net, backend.parse_devices("cpu"), init)
        backend.save_pretrained(net, vocab, tmp_path / f"{name}-{init}")
        tensors[name, init] = backend.read_params(tmp_path / f"{name}-{init}" / "pretrained.params")
    mxnet = tensors["mxnet", "xavier"]
    for xavier in (tensors["torch", "xavier"], tensors["jax", "xavier"]):
        assert len(xavier) == len(mxnet)
        for key, value in xavier.items():
            other = mxnet[format_key(key, "mxnet")]
            assert value.shape == other.shape, key
            if value.ndim >= 2:  # uniform on the same +-bound: the largest |draw| of each is within a few %
                assert np.abs(value).max() == pytest.approx(np.abs(other).max(), rel=0.1), key
                assert not np.array_equal(value, other), key
            else:  # biases 0, LayerNorm scales 1
                np.testing.assert_array_equal(value, other, err_msg=key)
    xavier = tensors["torch", "xavier"]
    pos = "encoder.pos_embedding"
    assert np.abs(xavier[pos]).max() < 0.2 < np.abs(tensors["torch", "book"][pos]).max()
    with pytest.raises(ValueError, match="unknown init 'normal'"):
        load_backend("torch").initialize_bert(None, [], "normal")
