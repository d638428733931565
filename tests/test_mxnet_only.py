"""What the MXNet backend alone has: Gluon's parameter names and collection (the book's
`save_parameters` names, the trainer built from `collect_params()`), its head layout and how it keeps
attention weights, hybridized graphs (masked softmax, forward and backward, cls_only, the fused
switch dropping stale graphs, train_fast with `graph`), one attention layer's fused kernel and its
gradients, the book's mean gradient (`trainer.step(batch_size)`), split_f placing shards on contexts
and parameters on both, legacy prefixed names, the book's `load_parameters` reading our file,
deferred initialisation, and the engine's asynchrony against the timer. Everything every backend has
is in the shared suite (tests/test_backend_*.py)."""
import json
import re
import os
import time

import numpy as onp
import pytest

from needs import require_backend

require_backend("mxnet")
import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon, init, np, npx  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

from nlibert.backends.mxnet import (BERTClassifier, BERTModel, FinetuneStep, load_pretrained_model,  # noqa: E402
                                    read_params, save_classifier, save_pretrained, set_fused_attention, set_seed,
                                    split_batch_multi_inputs, train_ch13, train_fast, evaluate_accuracy,
                                    write_params)
from nlibert.backends.mxnet.model import MultiHeadAttention, masked_softmax  # noqa: E402
from nlibert.backends.mxnet.train import train_batch_ch13  # noqa: E402
from nlibert.core.batching import BatchIterator, bucket_batch_indices  # noqa: E402
from nlibert.core.config import BERTConfig  # noqa: E402
from nlibert.core.vocab import Vocab  # noqa: E402

from test_backend_fast import packed_batch, separable  # noqa: E402
from test_backend_train import V, batches, task  # noqa: E402  the toy task every backend learns

npx.set_np()
# gluon.utils.split_and_load (the book's splitter) calls MXNet's own deprecated as_in_context.
pytestmark = pytest.mark.filterwarnings("ignore:ndarray.as_in_context:DeprecationWarning",
                                        "ignore:All children of this Sequential:UserWarning")

TWO_CPUS = [mx.cpu(0), mx.cpu(1)]
CPU = [mx.cpu()]
H, HEADS = 32, 4  # test_backend_fast's sizes (V 60, F 64, 2 layers, max_len 40)


def tiny_classifier(dropout=0.0, fused=False, seed=0, cls_only=None):
    """test_backend_fast's model: `fused` alone means fused attention and the last block at <cls> only."""
    mx.random.seed(seed)
    bert = BERTModel(60, H, 64, HEADS, 2, dropout, 40, fused_attention=fused)
    bert.initialize(init.Xavier())
    net = BERTClassifier(bert, cls_only=fused if cls_only is None else cls_only)
    net.output.initialize()
    return net


def params_of(net):
    return {k: p.data(p.list_ctx()[0]).asnumpy() for k, p in net._collect_params_with_prefix().items()}


def copy_params(src, dst):
    for (k, p), (k2, q) in zip(src._collect_params_with_prefix().items(), dst._collect_params_with_prefix().items()):
        assert k == k2
        q.set_data(p.data())


def as_mx(X):
    return (np.array(X[0], dtype="int32"), np.array(X[1], dtype="int32"), np.array(X[2], dtype="float32"))


def _tiny(vocab_size=20, dropout=0.0, seed=0):
    mx.random.seed(seed)
    bert = BERTModel(vocab_size, num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=2, dropout=dropout,
                     max_len=24)
    bert.initialize(init.Xavier())
    return bert


# --- the model -----------------------------------------------------------------------------------

def test_split_heads_is_batch_major_and_merge_inverts_it(rng):
    attn = MultiHeadAttention(num_hiddens=8, num_heads=2, dropout=0.0)
    X = rng.normal(size=(3, 5, 8)).astype("float32")
    split = attn.split_heads(np.array(X)).asnumpy()
    assert split.shape == (6, 5, 4)
    for b in range(3):
        for h in range(2):
            onp.testing.assert_array_equal(split[b * 2 + h], X[b, :, h * 4:(h + 1) * 4])
    onp.testing.assert_array_equal(attn.merge_heads(np.array(split)).asnumpy(), X)


def _expected_bert_small_keys(V):
    """The book's MXNet `save_parameters` names, in its order, for bert.small (H=256, F=512, L=2, max_len=512)."""
    keys = [("encoder.pos_embedding", (1, 512, 256)),
            ("encoder.token_embedding.weight", (V, 256)),
            ("encoder.segment_embedding.weight", (2, 256))]
    for i in (0, 1):
        b = f"encoder.blks.{i}."
        for w in ("W_q", "W_k", "W_v", "W_o"):
            keys += [(b + f"attention.{w}.weight", (256, 256)), (b + f"attention.{w}.bias", (256,))]
        keys += [(b + "addnorm1.ln.gamma", (256,)), (b + "addnorm1.ln.beta", (256,)),
                 (b + "ffn.dense1.weight", (512, 256)), (b + "ffn.dense1.bias", (512,)),
                 (b + "ffn.dense2.weight", (256, 512)), (b + "ffn.dense2.bias", (256,)),
                 (b + "addnorm2.ln.gamma", (256,)), (b + "addnorm2.ln.beta", (256,))]
    keys += [("hidden.weight", (256, 256)), ("hidden.bias", (256,)),
             ("mlm.mlp.0.weight", (256, 256)), ("mlm.mlp.0.bias", (256,)),
             ("mlm.mlp.1.gamma", (256,)), ("mlm.mlp.1.beta", (256,)),
             ("mlm.mlp.2.weight", (V, 256)), ("mlm.mlp.2.bias", (V,)),
             ("nsp.output.weight", (2, 256)), ("nsp.output.bias", (2,))]
    return keys


def test_bert_small_save_parameters_names_shapes_and_count():
    V = 1000
    bert = BERTModel.from_config(BERTConfig(vocab_size=V))  # bert.small sizes are the defaults
    found = [(k, tuple(p.shape)) for k, p in bert._collect_params_with_prefix().items()]
    assert found == _expected_bert_small_keys(V)
    assert len(found) == 45
    assert sum(int(onp.prod(s)) for _, s in found) == 1_318_402 + 513 * V
    assert bert.config == BERTConfig(vocab_size=V)


def test_classifier_has_39_keys_and_no_pretraining_heads():
    V = 1000
    net = BERTClassifier(BERTModel.from_config(BERTConfig(vocab_size=V)))
    params = net._collect_params_with_prefix()
    expected = [kv for kv in _expected_bert_small_keys(V) if not kv[0].startswith(("mlm.", "nsp."))]
    expected += [("output.weight", (3, 256)), ("output.bias", (3,))]
    assert [(k, tuple(p.shape)) for k, p in params.items()] == expected
    assert len(params) == 39
    assert sum(int(onp.prod(p.shape)) for p in params.values()) == 1_252_355 + 256 * V
    # The trainer is built from collect_params(): the MLM/NSP heads must not be in it.
    assert len(list(net.collect_params().values())) == 39


def test_attention_weights_are_kept_only_on_request():
    bert = _tiny()
    attention = bert.encoder.blks[0].attention.attention
    tokens, segments = np.array([[2, 5, 6, 3, 0]], dtype="int32"), np.zeros((1, 5), dtype="int32")
    bert(tokens, segments, np.array([4.0]))
    assert attention.attention_weights is None  # the default: nothing pinned between steps
    attention.keep_attention_weights = True
    bert(tokens, segments, np.array([4.0]))
    weights = attention.attention_weights.asnumpy()
    assert weights.shape == (2, 5, 5)  # (B*h, T_q, T_k)
    onp.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-6)
    assert onp.all(weights[:, :, 4] == 0)  # the pad key gets no weight


# --- graphs and the fused kernel ----------------------------------------------------------------

class _Softmax(nn.HybridBlock):
    def hybrid_forward(self, F, X, valid_lens):
        return masked_softmax(X, valid_lens)


def test_masked_softmax_in_a_graph_is_the_imperative_one(rng):
    X = np.array(rng.normal(size=(4, 3, 6)).astype("float32"))
    lens = np.array([6, 2, 1, 4], dtype="float32")
    block = _Softmax()
    expected = block(X, lens).asnumpy()
    block.hybridize()
    onp.testing.assert_array_equal(block(X, lens).asnumpy(), expected)
    onp.testing.assert_array_equal(expected, masked_softmax(X, lens).asnumpy())


def test_fused_attention_equals_the_book_attention(rng):
    book = MultiHeadAttention(H, HEADS, dropout=0.0)
    book.initialize(init.Xavier())
    fused = MultiHeadAttention(H, HEADS, dropout=0.0, fused_attention=True)
    fused.initialize()
    copy_params(book, fused)
    X = np.array(rng.normal(size=(3, 7, H)).astype("float32"))
    lens = np.array([7, 4, 1], dtype="float32")
    grads = []
    for block in (book, fused):
        X.attach_grad()
        with autograd.record():
            out = block(X, X, X, lens)
            loss = (out * out).sum()
        loss.backward()
        grads.append((out.asnumpy(), X.grad.asnumpy(),
                      {k: p.grad().asnumpy() for k, p in block._collect_params_with_prefix().items()}))
    (out_b, gx_b, gp_b), (out_f, gx_f, gp_f) = grads
    onp.testing.assert_allclose(out_f, out_b, rtol=1e-5, atol=1e-5)
    onp.testing.assert_allclose(gx_f, gx_b, rtol=1e-4, atol=1e-5)
    for k in gp_b:
        onp.testing.assert_allclose(gp_f[k], gp_b[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("fused", [False, True])
def test_hybridized_equals_imperative_forward_and_backward(fused):
    imperative, hybrid = tiny_classifier(fused=fused), tiny_classifier(fused=fused)
    copy_params(imperative, hybrid)
    hybrid.hybridize()
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    for T in (20, 12, 20):  # a second width, then the first again: the graph follows the shape
        (X, y) = packed_batch(T=T, seed=T)
        X, y = as_mx(X), np.array(y)
        out = [logits_and_grads(net, X, y, loss) for net in (imperative, hybrid)]
        onp.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
        for k in out[0][1]:
            onp.testing.assert_allclose(out[1][1][k], out[0][1][k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert hybrid.encoder.blks[0]._cached_op is not None  # it really ran as a graph




def logits_and_grads(net, X, y, loss):
    """One forward and backward of `net` on (X, y) under `loss` summed: the logits and every
    parameter's gradient, as numpy."""
    with autograd.record():
        logits = net(X)
        l = loss(logits, y).sum()
    l.backward()
    return logits.asnumpy(), {k: p.grad().asnumpy() for k, p in net._collect_params_with_prefix().items()}


def test_fused_logits_equal_book_logits_and_the_switch_drops_stale_graphs():
    net = tiny_classifier()
    X = as_mx(packed_batch()[0])
    book = net(X).asnumpy()
    net.hybridize()
    onp.testing.assert_allclose(net(X).asnumpy(), book, rtol=1e-6, atol=1e-6)
    set_fused_attention(net, True)
    assert net.encoder.blks[0]._cached_op is None
    fused = net(X).asnumpy()
    assert onp.abs(fused - book).max() <= 1e-5
    set_fused_attention(net, False)
    onp.testing.assert_allclose(net(X).asnumpy(), book, rtol=1e-6, atol=1e-6)


def test_the_last_block_at_cls_only_hybridized_gives_the_same_logits_and_gradients():
    full, cls = tiny_classifier(fused=True, cls_only=False), tiny_classifier(fused=True, cls_only=True)
    copy_params(full, cls)
    cls.hybridize()
    X, y = packed_batch()
    X, y = as_mx(X), np.array(y)
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    outs = [logits_and_grads(net, X, y, loss) for net in (full, cls)]
    onp.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    for k in outs[0][1]:
        onp.testing.assert_allclose(outs[1][1][k], outs[0][1][k], rtol=1e-4, atol=1e-6, err_msg=k)
    # The shared encoder still gives every position to a caller that wants them all.
    assert cls.encoder(*X).shape == (len(y), X[0].shape[1], H)
    assert cls.encoder(X[0], X[1], X[2], True).shape == (len(y), 1, H)




def test_train_fast_as_a_graph_learns_and_prints_the_book_lines(capsys):
    graph = True  # (graph False: the shared suite)
    (ids, segments, lens), labels = separable(4)
    test_X, test_y = separable(2, seed=1)
    train_iter = BatchIterator((ids, segments, lens), labels, 16, shuffle=True, seed=0,
                               sampler=bucket_batch_indices(lens, 4 if graph else 1), trim=True,
                               pad_multiple=4 if graph else 1)
    test_iter = BatchIterator(test_X, test_y, 16, sampler=bucket_batch_indices(test_X[2]), trim=True)
    net = tiny_classifier(dropout=0.1, fused=True)
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 1e-2})
    seen = []
    records = train_fast(net, train_iter, test_iter, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, 15, CPU,
                         graph=graph, on_epoch=seen.append)
    assert [r.epoch for r in records] == list(range(1, 16)) and seen == records
    assert all(r.num_examples == 64 and r.examples_per_sec > 0 for r in records)
    # (On 4 batches sorted by length this toy learns more slowly than with random batches.)
    assert records[-1].loss < 0.6 * records[0].loss
    assert records[-1].test_acc >= 0.6  # chance is 1/3
    assert records[-1].test_acc == pytest.approx(evaluate_accuracy(net, test_iter, CPU))
    out = capsys.readouterr().out
    assert re.fullmatch(r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}\n"
                        r"\d+\.\d examples/sec on \[cpu\(0\)\]\n", out), out
    if graph:
        assert net.encoder.blks[0]._cached_op is not None




# --- training on contexts ---------------------------------------------------------------------

def _classifier(devices, dropout=0.0, seed=0):
    mx.random.seed(seed)
    bert = BERTModel(V, 16, 32, 2, 2, dropout, 16)
    bert.initialize(init.Xavier(), ctx=devices)
    net = BERTClassifier(bert)
    net.output.initialize(ctx=devices)
    return net


def test_split_batch_multi_inputs_places_each_shard_on_its_context():
    X_shards, y_shards = split_batch_multi_inputs(task(5, seed=1)[:3], task(5, seed=1)[3], TWO_CPUS)
    for shard, y, ctx in zip(X_shards, y_shards, TWO_CPUS):
        assert len(shard) == 3 and all(a.ctx == ctx for a in shard) and y.ctx == ctx


def test_on_two_contexts_both_copies_of_a_parameter_stay_identical():
    """The book's data parallelism keeps a copy of every parameter per context (the shared suite
    checks that two devices train like one)."""
    two = _classifier(TWO_CPUS)
    trainer = gluon.Trainer(two.collect_params(), "sgd", {"learning_rate": 0.5})
    for X, y in batches(task(21, seed=2), 7):  # shards of 4 and 3
        train_batch_ch13(two, X, y, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, TWO_CPUS)
    for p in two.collect_params().values():
        onp.testing.assert_array_equal(p.data(mx.cpu(0)).asnumpy(), p.data(mx.cpu(1)).asnumpy())


def test_a_step_follows_the_mean_gradient_of_the_batch():
    """trainer.step(batch_size) divides the summed per-example gradients by the batch size (the book's MXNet
    `train_batch_ch13` calls `trainer.step(labels.shape[0])`)."""
    net, reference = _classifier([mx.cpu()]), _classifier([mx.cpu()])
    (X, y), = batches(task(8, seed=8), 8)
    Xm = (np.array(X[0]), np.array(X[1]), np.array(X[2], dtype="float32"))
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    with autograd.record():
        mean_loss = loss(reference(Xm), np.array(y)).mean()
    mean_loss.backward()
    lr = 0.5
    expected = {k: p.data().asnumpy() - lr * p.grad().asnumpy()
                for k, p in reference._collect_params_with_prefix().items()}
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": lr})
    train_batch_ch13(net, X, y, loss, trainer, [mx.cpu()])
    for k, value in params_of(net).items():
        onp.testing.assert_allclose(value, expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_training_batch_smaller_than_the_device_count_is_refused():
    net = _classifier(TWO_CPUS)
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 1e-3})
    (X, y), = batches(task(1, seed=4), 1)
    with pytest.raises(ValueError, match="batch of 1 examples cannot be split across 2 devices"):
        train_batch_ch13(net, X, y, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, TWO_CPUS)


def test_a_micro_batched_step_calls_the_net_once_per_chunk():
    """16 rows in chunks of at most 5: forward calls of 5, 5, 5, 1 (the shared suite checks the step)."""
    (X, y) = packed_batch(n=16)
    for micro_batch, expected in ((None, [16]), (5, [5, 5, 5, 1])):
        net = tiny_classifier(fused=True)
        calls = []
        net.register_forward_hook(lambda block, inputs, output: calls.append(len(output)))
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
        step = FinetuneStep(net, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, CPU, micro_batch=micro_batch)
        for _ in range(3):
            step.read(step(X, y))
        assert calls == expected * 3


class _SlowBackward(mx.operator.CustomOp):
    """The identity, whose backward sleeps before noting that it ran: MXNet's engine is still busy
    with the step after its loss has been read."""
    backward_done = False

    def forward(self, is_train, req, in_data, out_data, aux):
        _SlowBackward.backward_done = False  # runs after the previous step's update (it reads its weights)
        self.assign(out_data[0], req[0], in_data[0])

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        time.sleep(0.2)
        _SlowBackward.backward_done = True
        self.assign(in_grad[0], req[0], out_grad[0])


@mx.operator.register("nlibert_test_slow_backward")
class _SlowBackwardProp(mx.operator.CustomOpProp):
    def __init__(self):
        super().__init__(need_top_grad=True)

    def create_operator(self, ctx, shapes, dtypes):
        return _SlowBackward()


class _WithSlowBackward(gluon.Block):
    """The classifier plus 0 x a slow-backward branch from a parameter of its own: the loss does not
    depend on the branch's backward, so reading the loss does not wait for it (at the top of the net,
    MXNet's CPU engine would run it before the loss read anyway)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.w = gluon.Parameter("w", shape=(1,), init=init.One())

    def forward(self, X):
        slow = mx.nd.Custom(self.w.data().as_nd_ndarray(), op_type="nlibert_test_slow_backward").as_np_ndarray()
        return self.net(X) + 0 * slow


@pytest.mark.parametrize("loop", [train_ch13, train_fast])
def test_the_timer_stops_after_the_whole_step_not_the_loss_read(monkeypatch, loop):
    """Reading the loss waits for the forward pass only; the examples/sec must cover backward and the update."""
    from nlibert.core import training as training_module
    from nlibert.core.training import Timer
    seen = []

    class RecordingTimer(Timer):
        def stop(self):
            seen.append(_SlowBackward.backward_done)
            return super().stop()

    monkeypatch.setattr(training_module, "Timer", RecordingTimer)  # the loop driver's timer
    net = _WithSlowBackward(tiny_classifier())
    net.w.initialize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    loop(net, [separable(1, seed=s) for s in range(2)], None, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, 1,
         CPU, verbose=False)
    npx.waitall()  # leave nothing running into the next test, whatever the loop did
    assert seen and all(seen), seen




# --- checkpoints --------------------------------------------------------------------------------

SIZES = dict(num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=2, dropout=0.0, max_len=20)
TOKENS = np.array([[2, 5, 6, 3, 7, 8, 3, 0], [2, 9, 3, 10, 3, 0, 0, 0]], dtype="int32")
SEGMENTS = np.array([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0, 0]], dtype="int32")
VALID_LENS = np.array([7.0, 5.0])


@pytest.fixture
def vocab():
    return Vocab([["a", "b", "c", "d", "e", "f", "g"]], reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])


@pytest.fixture
def pretrained(tmp_path, vocab):
    """A saved, seeded, never-explicitly-initialised tiny BERT (save_pretrained initialises it)."""
    set_seed(0)
    bert = BERTModel(len(vocab), **SIZES)
    folder = tmp_path / "bert"
    save_pretrained(bert, vocab, folder)
    return bert, folder


def _outputs(bert):
    encoded, _, nsp = bert(TOKENS, SEGMENTS, VALID_LENS)
    return encoded.asnumpy(), nsp.asnumpy()


def test_save_pretrained_initialises_with_the_books_xavier_in_the_books_names(pretrained, vocab):
    bert, folder = pretrained
    config = json.loads((folder / "config.json").read_text())
    assert config == {"vocab_size": len(vocab), **SIZES, "hidden_act": "relu", "layer_norm_eps": 1e-5,
                      "embedding_norm": False, "attention_dropout": None, "format": "mxnet", "kind": "pretrained"}
    params = read_params(folder / "pretrained.params")
    assert list(params) == list(bert._collect_params_with_prefix())
    # The book's pretraining init: Xavier (uniform, fan-avg, magnitude 3) for weights and
    # pos_embedding; zeros for Dense biases, ones/zeros for LayerNorm.
    bound = onp.sqrt(3.0 / ((20 * 16 + 16) / 2))  # pos_embedding (1, 20, 16): fan_in 20*16, fan_out 16
    pos = params["encoder.pos_embedding"]
    assert 0.5 * bound < onp.abs(pos).max() <= bound
    assert onp.all(params["hidden.bias"] == 0) and onp.all(params["mlm.mlp.1.gamma"] == 1)


def test_the_books_loader_reads_our_file(pretrained):
    bert, folder = pretrained
    # The book loads with Block.load_parameters; our file must be exactly what it expects.
    book = BERTModel(bert.config.vocab_size, **SIZES)
    book.load_parameters(str(folder / "pretrained.params"), ctx=mx.cpu())
    for a, b in zip(_outputs(bert), _outputs(book)):
        onp.testing.assert_array_equal(a, b)


def test_load_on_two_devices_places_every_parameter_on_both(pretrained):
    _, folder = pretrained
    devices = [mx.cpu(0), mx.cpu(1)]
    bert, _ = load_pretrained_model(folder, 16, 32, 2, 2, 0.1, 20, devices)
    for param in bert.collect_params().values():
        assert param.list_ctx() == devices
        onp.testing.assert_array_equal(param.data(devices[0]).asnumpy(), param.data(devices[1]).asnumpy())


def test_a_torch_file_is_refused_with_the_file_name(tmp_path):
    bad = tmp_path / "torch.params"
    bad.write_bytes(b"PK\x03\x04 this is a zip, as torch.save writes")
    with pytest.raises(ValueError, match="torch.params: not an MXNet parameter file"):
        read_params(bad)


def _legacy_arrays(net):
    """What `collect_params().save` (MXNet's deprecated path) writes: Gluon's global prefixed names."""
    return {p.name: p.data() for p in net.collect_params().values()}


def test_legacy_prefixed_names_are_mapped_and_loaded(pretrained):
    bert, folder = pretrained
    structured = read_params(folder / "pretrained.params")
    arrays = _legacy_arrays(bert)
    assert not any("." in k for k in arrays) and list(arrays)[0].endswith("_pos_embedding")
    os.remove(folder / "pretrained.params")
    npx.save(str(folder / "pretrained.params"), arrays)
    legacy = read_params(folder / "pretrained.params")
    assert list(legacy) == list(structured)
    assert all(onp.array_equal(legacy[k], structured[k]) for k in structured)
    loaded, _ = load_pretrained_model(folder, dropout=0.0, devices=[mx.cpu()])
    for a, b in zip(_outputs(bert), _outputs(loaded)):
        onp.testing.assert_array_equal(a, b)

    # Saved outside numpy semantics (mx.nd.save), under a parent name scope: still mapped.
    with mx.util.np_array(False), mx.util.np_shape(False):
        mx.nd.save(str(folder / "nd.params"), {"bertmodel7_" + k: v.as_nd_ndarray() for k, v in arrays.items()})
    nd_legacy = read_params(folder / "nd.params")
    assert all(onp.array_equal(nd_legacy[k], structured[k]) for k in structured)


def test_legacy_names_that_do_not_fit_are_refused(tmp_path, pretrained):
    bert, _ = pretrained
    arrays = _legacy_arrays(bert)
    names = list(arrays)
    assert names[3].endswith("_weight") and names[4].endswith("_bias")
    names[3], names[4] = names[4], names[3]  # a bias where the book's order has a weight
    npx.save(str(tmp_path / "swapped.params"), {k: arrays[k] for k in names})
    with pytest.raises(ValueError, match=r"swapped\.params: uses Gluon's legacy prefixed names.*tensor 3 is "
                                         r"'dense\d+_bias'.*encoder\.blks\.0\.attention\.W_q\.weight"):
        read_params(tmp_path / "swapped.params")
    npx.save(str(tmp_path / "short.params"), {k: arrays[k] for k in list(arrays)[:-1]})
    with pytest.raises(ValueError, match=r"short\.params: .*44 tensors"):
        read_params(tmp_path / "short.params")


def test_write_params_refuses_a_key_that_is_not_a_string_and_keeps_the_old_file(tmp_path, rng):
    params = {"a.weight": rng.normal(size=(3, 4)).astype("float32"), "b.ids": onp.arange(5, dtype="int32")}
    path = tmp_path / "x.params"
    write_params(params, path)
    with pytest.raises(TypeError):
        write_params({"a.weight": params["a.weight"], 7: params["b.ids"]}, path)  # npx.save refuses
    assert os.listdir(tmp_path) == ["x.params"]  # no temp file left behind, old file kept
    onp.testing.assert_array_equal(read_params(path)["a.weight"], params["a.weight"])


def test_save_classifier_refuses_an_uninitialised_head(tmp_path, pretrained):
    """Gluon's deferred initialisation: a head never initialised is named, and nothing is written."""
    _, folder = pretrained
    bert, vocab = load_pretrained_model(folder, dropout=0.1, devices=[mx.cpu()])
    with pytest.raises(ValueError, match=r"uninitialised parameters \['output\.weight', 'output\.bias'\]"):
        save_classifier(BERTClassifier(bert), vocab, bert.config, tmp_path / "clf")
    assert not os.path.exists(tmp_path / "clf" / "classifier.params")
