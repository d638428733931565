import numpy as np
import pytest

from nlibert.core.names import (FORMAT_NAMES, HF_NAMES, canonical_key, check_shapes, convert_params, expected_shapes,
                                format_key, infer_config, is_canonical)
from nlibert.core.config import BERTConfig

SMALL = BERTConfig(vocab_size=1000, num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_layers=2, max_len=512)


def test_expected_shapes_match_facts_counts():
    shapes = expected_shapes(SMALL)
    assert len(shapes) == 45 and list(shapes)[0] == "encoder.pos_embedding"
    assert sum(int(np.prod(s)) for s in shapes.values()) == 1_318_402 + 513 * 1000
    classifier = expected_shapes(SMALL, "classifier")
    assert len(classifier) == 39
    assert sum(int(np.prod(s)) for s in classifier.values()) == 1_252_355 + 256 * 1000


@pytest.mark.parametrize("torch_key,mxnet_key", [
    ("encoder.blks.1.addnorm2.ln.weight", "encoder.blks.1.addnorm2.ln.gamma"),
    ("encoder.blks.0.addnorm1.ln.bias", "encoder.blks.0.addnorm1.ln.beta"),
    ("hidden.0.weight", "hidden.weight"),
    ("mlm.mlp.0.bias", "mlm.mlp.0.bias"),
    ("mlm.mlp.2.weight", "mlm.mlp.1.gamma"),
    ("mlm.mlp.2.bias", "mlm.mlp.1.beta"),
    ("mlm.mlp.3.weight", "mlm.mlp.2.weight"),
    ("encoder.pos_embedding", "encoder.pos_embedding"),
    ("encoder.blks.0.attention.W_q.weight", "encoder.blks.0.attention.W_q.weight"),
    ("output.bias", "output.bias"),
    ("encoder.embedding_ln.weight", "encoder.embedding_ln.gamma"),  # BERT's embedding LayerNorm (HF checkpoints)
    ("encoder.embedding_ln.bias", "encoder.embedding_ln.beta"),
])
def test_key_map_both_ways(torch_key, mxnet_key):
    assert format_key(torch_key, "mxnet") == mxnet_key
    assert canonical_key(mxnet_key, "mxnet") == torch_key
    assert format_key(torch_key, "torch") == canonical_key(torch_key, "torch") == torch_key  # the hub's own names


@pytest.mark.parametrize("fmt", sorted(FORMAT_NAMES) + ["huggingface"])
def test_every_rename_table_round_trips_every_canonical_name(fmt):
    table = HF_NAMES if fmt == "huggingface" else fmt
    names = list(expected_shapes(BERTConfig(10, 8, 16, 2, 2, max_len=4, embedding_norm=True), "pretrained"))
    names += [] if fmt == "huggingface" else ["output.weight", "output.bias"]  # HF has no NLI head
    renamed = [format_key(k, table) for k in names]
    assert len(set(renamed)) == len(names)  # one-to-one
    assert [canonical_key(k, table) for k in renamed] == names
    assert all(is_canonical(k) for k in names)


def test_unknown_keys_are_errors_naming_them():
    with pytest.raises(KeyError, match="encoder.extra"):
        format_key("encoder.extra.weight", "mxnet")
    with pytest.raises(KeyError, match="hidden.0.weight"):
        canonical_key("hidden.0.weight", "mxnet")  # a torch name is not an MXNet one
    with pytest.raises(ValueError, match="unknown checkpoint format 'tensorflow'"):
        format_key("output.bias", "tensorflow")
    params = {k: np.zeros(s, np.float32) for k, s in expected_shapes(BERTConfig(10, 8, 16, 2, 1, max_len=4)).items()}
    params["bogus"] = np.zeros(1)
    with pytest.raises(KeyError, match="bogus"):
        convert_params(params, "torch", "mxnet")


def test_convert_round_trip_is_bit_exact():
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32)
              for k, s in expected_shapes(BERTConfig(10, 8, 16, 2, 2, max_len=4)).items()}
    mx = convert_params(params, "torch", "mxnet")
    assert list(mx) != list(params) and list(convert_params(params, "torch", "torch")) == list(params)
    with pytest.raises(KeyError):  # MXNet names are not torch names
        convert_params(mx, "torch", "mxnet")
    back = convert_params(mx, "mxnet", "torch")
    assert list(back) == list(params)
    assert all(np.array_equal(back[k], params[k]) for k in params)


def test_infer_config_and_check_shapes():
    cfg = BERTConfig(vocab_size=37, num_hiddens=128, ffn_num_hiddens=64, num_heads=2, num_layers=3, max_len=20)
    shapes = expected_shapes(cfg)
    params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    inferred = infer_config(params, num_heads=2)
    assert inferred == cfg
    assert infer_config(params).num_heads == 2  # 128 / 64-dimensional heads
    found = dict(shapes, **{"encoder.blks.0.ffn.dense1.weight": (99, 128)})
    with pytest.raises(ValueError, match=r"encoder.blks.0.ffn.dense1.weight: file has \(99, 128\), model expects \(64, 128\)"):
        check_shapes(shapes, found, "x/pretrained.params")
    with pytest.raises(ValueError, match=r"missing keys: \['nsp.output.bias'\]"):
        check_shapes(shapes, {k: v for k, v in shapes.items() if k != "nsp.output.bias"}, "f")


def test_embedding_norm_adds_two_tensors_and_is_read_off_them():
    cfg = BERTConfig(vocab_size=10, num_hiddens=8, ffn_num_hiddens=16, num_heads=2, num_layers=1, max_len=4,
                     embedding_norm=True)
    shapes = expected_shapes(cfg)
    assert shapes["encoder.embedding_ln.weight"] == (8,) and len(shapes) == len(expected_shapes(
        BERTConfig(vocab_size=10, num_hiddens=8, ffn_num_hiddens=16, num_heads=2, num_layers=1, max_len=4))) + 2
    params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    assert infer_config(params, num_heads=2).embedding_norm
