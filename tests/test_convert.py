"""Checkpoint conversion between the torch and MXNet formats (`jobs.run_convert`, `nlibert convert`)
and the cross-framework parity job (`jobs.run_parity`, `nlibert parity`).

Conversion only renames (the formats name the same tensors, of the same shapes): every tensor must
come back bit for bit, and anything that is not one of the book's names, or has the wrong shape, must
be refused with a message that names it.
"""
from __future__ import annotations

import json
import re

import numpy as onp
import pytest

from needs import require_backend

require_backend("torch")
require_backend("mxnet")
import torch  # noqa: E402
import mxnet as mx  # noqa: E402

import nlibert.backends.mxnet as mb  # noqa: E402
import nlibert.backends.torch as tb  # noqa: E402
from nlibert import cli, jobs  # noqa: E402
from nlibert.core.names import format_key  # noqa: E402
from nlibert.core.sample import write_sample_snli  # noqa: E402
from nlibert.core.snli import read_snli_file  # noqa: E402
from nlibert.core.vocab import RESERVED_TOKENS, Vocab, tokenize  # noqa: E402

SIZES = dict(num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=2, dropout=0.1, max_len=64)
V = 40



def _vocab(size: int = V) -> Vocab:
    return Vocab.from_idx_to_token(["<unk>"] + RESERVED_TOKENS + [f"w{i}" for i in range(size - 5)])


def _torch_pretrained(folder, seed=0, vocab=None):
    vocab = vocab or _vocab()
    torch.manual_seed(seed)
    tb.save_pretrained(tb.BERTModel(len(vocab), **SIZES), vocab, folder)
    return folder


def _torch_classifier(folder, seed=0, vocab=None):
    vocab = vocab or _vocab()
    torch.manual_seed(seed)
    net = tb.BERTClassifier(tb.BERTModel(len(vocab), **SIZES))
    tb.save_classifier(net, vocab, None, folder)
    return folder


def _assert_bit_equal(a: dict, b: dict):
    assert list(a) == list(b)  # same names, same order
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert onp.array_equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize("kind", ["pretrained", "classifier"])
def test_round_trip_torch_mxnet_torch_is_bit_exact(tmp_path, kind):
    make = _torch_pretrained if kind == "pretrained" else _torch_classifier
    src = make(tmp_path / "torch")
    params_file = f"{kind}.params"
    jobs.run_convert(str(src), str(tmp_path / "mxnet"), to="mxnet")
    jobs.run_convert(str(tmp_path / "mxnet"), str(tmp_path / "back"), to="torch")

    original = tb.read_params(src / params_file)
    assert len(original) == (13 + 16 * 2 if kind == "pretrained" else 7 + 16 * 2)  # 13 + 16 per layer / 7 + 16 per layer: 45 / 39
    in_mxnet = mb.read_params(tmp_path / "mxnet" / params_file)
    _assert_bit_equal({format_key(k, "mxnet"): v for k, v in original.items()}, in_mxnet)
    _assert_bit_equal(original, tb.read_params(tmp_path / "back" / params_file))

    # config.json: the same dict with the format switched; vocab.json copied byte for byte.
    config = json.loads((src / "config.json").read_text())
    assert config["format"] == "torch" and config["kind"] == kind
    assert json.loads((tmp_path / "mxnet" / "config.json").read_text()) == dict(config, format="mxnet")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == config
    for folder in ("mxnet", "back"):
        assert (tmp_path / folder / "vocab.json").read_bytes() == (src / "vocab.json").read_bytes()
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == sorted(["config.json", "vocab.json", params_file])

    # The converted folder is what the MXNet loaders read.
    if kind == "pretrained":
        bert, vocab = mb.load_pretrained_model(str(tmp_path / "mxnet"), devices=[mx.cpu()])
        assert bert.config.num_heads == SIZES["num_heads"] and len(vocab) == V
    else:
        _, _, cfg = mb.load_classifier(str(tmp_path / "mxnet"), [mx.cpu()])
        assert cfg.to_dict() == {k: config[k] for k in cfg.to_dict()}


def test_round_trip_mxnet_torch_mxnet_is_bit_exact(tmp_path):
    """The other way round, from a Gluon model with the book's Xavier init."""
    mb.set_seed(0)
    mb.save_pretrained(mb.BERTModel(V, **SIZES), _vocab(), tmp_path / "mxnet")
    jobs.run_convert(str(tmp_path / "mxnet"), str(tmp_path / "torch"), to="torch")
    jobs.run_convert(str(tmp_path / "torch"), str(tmp_path / "back"), to="mxnet")
    _assert_bit_equal(mb.read_params(tmp_path / "mxnet" / "pretrained.params"),
                      mb.read_params(tmp_path / "back" / "pretrained.params"))
    assert json.loads((tmp_path / "torch" / "config.json").read_text())["format"] == "torch"
    tb.load_pretrained_model(str(tmp_path / "torch"), devices=[torch.device("cpu")])


def test_converting_to_the_same_format_copies_the_tensors(tmp_path):
    src = _torch_pretrained(tmp_path / "torch")
    jobs.run_convert(str(src), str(tmp_path / "copy"), to="torch")
    _assert_bit_equal(tb.read_params(src / "pretrained.params"), tb.read_params(tmp_path / "copy" / "pretrained.params"))


def test_an_unknown_torch_key_is_named_by_convert_and_by_the_loader(tmp_path, capsys):
    src = _torch_pretrained(tmp_path / "torch")
    params = tb.read_params(src / "pretrained.params")
    params["encoder.bogus_scale"] = onp.ones(3, dtype=onp.float32)
    tb.write_params(params, src / "pretrained.params")

    with pytest.raises(KeyError, match="encoder.bogus_scale"):
        jobs.run_convert(str(src), str(tmp_path / "mxnet"), to="mxnet")
    assert not (tmp_path / "mxnet" / "pretrained.params").exists()
    assert cli.main(["convert", str(src), str(tmp_path / "mxnet"), "--to", "mxnet"]) == 2
    assert "encoder.bogus_scale" in capsys.readouterr().err
    with pytest.raises(KeyError, match=r"not torch-format BERT names: \['encoder.bogus_scale'\]"):
        tb.load_pretrained_model(str(src), devices=[torch.device("cpu")])


def test_an_unknown_mxnet_key_is_named_by_convert_and_by_the_loader(tmp_path):
    mb.set_seed(0)
    mb.save_pretrained(mb.BERTModel(V, **SIZES), _vocab(), tmp_path / "mxnet")
    params = mb.read_params(tmp_path / "mxnet" / "pretrained.params")
    # A torch-style name in an MXNet file is just as unknown there: the map is a bijection.
    params["hidden.0.weight"] = params["hidden.weight"]
    mb.write_params(params, tmp_path / "mxnet" / "pretrained.params")

    with pytest.raises(KeyError, match=r"hidden\.0\.weight"):
        jobs.run_convert(str(tmp_path / "mxnet"), str(tmp_path / "torch"), to="torch")
    with pytest.raises(KeyError, match=r"not mxnet-format BERT names: \['hidden\.0\.weight'\]"):
        mb.load_pretrained_model(str(tmp_path / "mxnet"), devices=[mx.cpu()])


def test_a_mis_shaped_key_converts_but_each_loader_names_it_with_both_shapes(tmp_path):
    """Conversion copies tensors without judging their shapes; loading is where sizes are checked.
    `hidden.0.weight` is renamed (`hidden.weight` in MXNet), so each message must use its own name."""
    src = _torch_pretrained(tmp_path / "torch")
    params = tb.read_params(src / "pretrained.params")
    params["hidden.0.weight"] = onp.zeros((16, 17), dtype=onp.float32)
    tb.write_params(params, src / "pretrained.params")
    jobs.run_convert(str(src), str(tmp_path / "mxnet"), to="mxnet")
    jobs.run_convert(str(tmp_path / "mxnet"), str(tmp_path / "back"), to="torch")

    expected = r"hidden\.weight: file has \(16, 17\), model expects \(16, 16\)"
    with pytest.raises(ValueError, match=expected):
        mb.load_pretrained_model(str(tmp_path / "mxnet"), devices=[mx.cpu()])
    with pytest.raises(ValueError, match=expected):  # explicit sizes: the same check
        mb.load_pretrained_model(str(tmp_path / "mxnet"), 16, 32, 2, 2, 0.1, 64, [mx.cpu()])
    for folder in (src, tmp_path / "back"):
        with pytest.raises(ValueError, match=r"hidden\.0\.weight: file has \(16, 17\), model expects \(16, 16\)"):
            tb.load_pretrained_model(str(folder), devices=[torch.device("cpu")])


def test_a_mis_shaped_classifier_output_is_named_with_both_shapes(tmp_path):
    src = _torch_classifier(tmp_path / "torch")
    params = tb.read_params(src / "classifier.params")
    params["output.weight"] = onp.zeros((4, 16), dtype=onp.float32)  # a 4-way head where 3 belong
    tb.write_params(params, src / "classifier.params")
    jobs.run_convert(str(src), str(tmp_path / "mxnet"), to="mxnet")
    with pytest.raises(ValueError, match=r"output\.weight: file has \(4, 16\), model expects \(3, 16\)"):
        mb.load_classifier(str(tmp_path / "mxnet"), [mx.cpu()])


# ----------------------------------------------------------------------------------------------
# CLI: convert and parity


@pytest.fixture(scope="module")
def sample_checkpoints(tmp_path_factory):
    """A seeded torch pretrained folder and classifier folder whose vocabulary is the embedded sample's,
    so the parity job's default inputs (the sample's test file) are real tokens, not <unk>."""
    root = tmp_path_factory.mktemp("cli")
    data = write_sample_snli(root / "sample", num_train=200, num_test=50, seed=0)
    premises, hypotheses, _ = read_snli_file(f"{data}/snli_1.0_train.txt")
    vocab = Vocab(tokenize([s.lower() for s in premises + hypotheses]), min_freq=1,
                  reserved_tokens=RESERVED_TOKENS)
    return _torch_pretrained(root / "pretrained", seed=1, vocab=vocab), \
        _torch_classifier(root / "classifier", seed=2, vocab=vocab)


def _printed_diffs(out: str) -> dict[str, float]:
    return {m.group(1).strip(): float(m.group(2))
            for m in re.finditer(r"^  (\S.*?)\s+(\d\.\d{3}e[-+]\d\d)  ", out, re.MULTILINE)}


PARITY_ARGS = ["--num-pairs", "24", "--max-len", "48"]


def test_cli_convert_writes_a_loadable_checkpoint(sample_checkpoints, tmp_path, capsys):
    pretrained, _ = sample_checkpoints
    dst = tmp_path / "mxnet"
    assert cli.main(["convert", str(pretrained), str(dst), "--to", "mxnet"]) == 0
    assert f"wrote mxnet checkpoint to {dst}" in capsys.readouterr().out
    assert json.loads((dst / "config.json").read_text())["format"] == "mxnet"
    _, vocab = mb.load_pretrained_model(str(dst), devices=[mx.cpu()])
    assert vocab.idx_to_token == json.loads((pretrained / "vocab.json").read_text())
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "torch"]) == 2


def test_cli_parity_prints_the_diffs_and_passes_at_the_default_tolerance(sample_checkpoints, capsys):
    pretrained, _ = sample_checkpoints
    assert cli.main(["parity", "--checkpoint", str(pretrained), *PARITY_ARGS]) == 0
    out = capsys.readouterr().out
    assert "pretrained checkpoint (torch format), 24 pairs, max_len 48" in out
    diffs = _printed_diffs(out)
    assert set(diffs) == {"encoded_X", "encoded_X (padding included)", "mlm_Y_hat", "nsp_Y_hat"}
    # Default tolerance 1e-5 of the scale (see test_backend_parity.py for why); these random weights are not
    # bit-equal across frameworks, so every figure is strictly positive: --tolerance 0 below must fail.
    assert all(v > 0 for v in diffs.values()), diffs
    assert "encoded_X (padding included)" in out and "(not judged)" in out
    assert out.rstrip().endswith("PASS at tolerance 0.0001 x scale")


def test_cli_parity_returns_1_when_the_diffs_exceed_the_tolerance(sample_checkpoints, capsys):
    pretrained, _ = sample_checkpoints
    assert cli.main(["parity", "--checkpoint", str(pretrained), "--tolerance", "0", *PARITY_ARGS]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith("FAIL at tolerance 0 x scale")
    assert max(_printed_diffs(out).values()) > 0


def test_cli_parity_on_a_classifier_and_on_an_mxnet_checkpoint(sample_checkpoints, tmp_path, capsys):
    _, classifier = sample_checkpoints
    jobs.run_convert(str(classifier), str(tmp_path / "mxnet"), to="mxnet")
    for folder, fmt in ((classifier, "torch"), (tmp_path / "mxnet", "mxnet")):
        assert cli.main(["parity", "--checkpoint", str(folder), *PARITY_ARGS]) == 0
        out = capsys.readouterr().out
        assert f"classifier checkpoint ({fmt} format)" in out
        assert set(_printed_diffs(out)) == {"logits"}
        assert "predicted labels agree on 100.0%" in out
    assert cli.main(["parity", "--checkpoint", str(tmp_path / "nothing-here")]) == 2


def test_run_parity_report(sample_checkpoints):
    pretrained, classifier = sample_checkpoints
    report = jobs.run_parity(str(pretrained), num_pairs=16, max_len=40, seed=3)
    assert report["kind"] == "pretrained" and report["format"] == "torch" and report["num_pairs"] == 16
    # the checkpoint's own backend is the reference, every other installed backend is compared to it
    assert report["reference"] == "torch" and report["compared"] == ["mxnet", "jax"] == list(report["max_abs_diff"])
    for other in ("mxnet", "jax"):
        diffs = report["max_abs_diff"][other]
        assert {"encoded_X", "mlm_Y_hat", "nsp_Y_hat"} <= set(diffs)
        # Pads are reported but not judged (attention never reads them); the all-position figure bounds
        # the judged valid-position one.
        assert diffs["encoded_X"] <= diffs["encoded_X (padding included)"]
    assert "encoded_X (padding included)" not in report["scale"] and report["scale"]["encoded_X"] >= 1
    assert report["passed"] is True and report["tolerance"] == 1e-4

    report = jobs.run_parity(str(classifier), num_pairs=16, max_len=40, seed=3)
    assert report["kind"] == "classifier" and set(report["max_abs_diff"]["mxnet"]) == {"logits"}
    assert report["label_agreement"] == {"mxnet": 1.0, "jax": 1.0} and report["passed"] is True
    assert 0 < report["max_abs_diff"]["mxnet"]["logits"] <= 1e-5 and 0 < report["max_abs_diff"]["jax"]["logits"] <= 1e-5

    mxnet_copy = jobs.run_convert(str(classifier), str(classifier) + "-mxnet", "mxnet")
    report = jobs.run_parity(mxnet_copy, num_pairs=16, max_len=40, seed=3)
    assert report["format"] == report["reference"] == "mxnet" and report["compared"] == ["torch", "jax"]
    assert report["passed"] is True
    jax_copy = jobs.run_convert(str(classifier), str(classifier) + "-jax", "jax")
    report = jobs.run_parity(jax_copy, num_pairs=16, max_len=40, seed=3)
    assert report["format"] == report["reference"] == "jax" and report["compared"] == ["torch", "mxnet"]
    assert report["passed"] is True
