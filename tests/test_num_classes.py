"""Classifiers of any number of classes through the backend contract: built, saved with their task's
labels, loaded back with as many outputs, converted, compared by `parity`; old folders are SNLI's."""
import json

import numpy as np
import pytest

from nlibert import jobs
from nlibert.backends import BACKENDS, load_backend
from nlibert.core.folders import SNLI_TASK, TaskRecord
from nlibert.core.names import expected_shapes
from nlibert.core.vocab import RESERVED_TOKENS, Vocab

SIZES = dict(num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=1, dropout=0.1, max_len=16)
NEWS = TaskRecord("ag_news", ("World", "Sports", "Business", "Sci/Tech"), paired=False, max_len=16)
VOCAB = Vocab.from_idx_to_token(["<unk>"] + RESERVED_TOKENS + [f"w{i}" for i in range(20)])
IDS = np.array([[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]], dtype=np.int32)
SEGMENTS, VALID_LENS = np.zeros_like(IDS), np.array([4, 3], dtype=np.int32)


def _classifier(backend, folder, num_classes: int):
    """A tiny seeded classifier with `num_classes` outputs, its head initialised as the jobs do."""
    backend.set_seed(0)
    backend.save_pretrained(backend.BERTModel(len(VOCAB), **SIZES), VOCAB, folder)
    devices = backend.parse_devices("cpu")
    bert, _ = backend.load_pretrained_model(str(folder), dropout=0.1, devices=devices)
    net = backend.BERTClassifier(bert, num_classes=num_classes)
    backend.initialize_classifier_head(net, devices)
    return net, devices


@pytest.mark.parametrize("name", BACKENDS)
def test_a_four_class_classifier_saves_its_labels_and_loads_back_with_four_outputs(tmp_path, name):
    backend = load_backend(name)
    net, devices = _classifier(backend, tmp_path / "bert", 4)
    assert net.num_classes == 4
    probs = backend.predict_proba(net, IDS, SEGMENTS, VALID_LENS, devices)
    assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert backend.predict_proba(net, IDS[:0], SEGMENTS[:0], VALID_LENS[:0], devices).shape == (0, 4)

    backend.save_classifier(net, VOCAB, None, tmp_path / "clf", task=NEWS)
    written = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert written["labels"] == list(NEWS.label_names)
    assert written["task"] == {"name": "ag_news", "paired": False, "max_len": 16, "data": None}
    loaded, _, _ = backend.load_classifier(tmp_path / "clf", devices)
    assert loaded.num_classes == 4
    np.testing.assert_allclose(backend.predict_proba(loaded, IDS, SEGMENTS, VALID_LENS, devices), probs, atol=1e-6)

    with pytest.raises(ValueError, match="4 outputs but its task names 3 labels"):
        backend.save_classifier(net, VOCAB, None, tmp_path / "wrong", task=SNLI_TASK)


@pytest.mark.parametrize("name", BACKENDS)
def test_the_chapters_classifier_stays_three_way_and_a_folder_without_labels_is_snlis(tmp_path, name):
    backend = load_backend(name)
    net, devices = _classifier(backend, tmp_path / "bert", 3)
    assert backend.BERTClassifier(backend.load_pretrained_model(
        str(tmp_path / "bert"), dropout=0.1, devices=devices)[0]).num_classes == 3
    backend.save_classifier(net, VOCAB, None, tmp_path / "clf")  # no task: the chapter's
    config_path = tmp_path / "clf" / "config.json"
    written = json.loads(config_path.read_text())
    assert written["labels"] == ["entailment", "contradiction", "neutral"] and written["task"]["paired"]
    # A folder written before tasks were recorded has neither key: read as SNLI's three labels.
    del written["labels"], written["task"]
    config_path.write_text(json.dumps(written))
    assert TaskRecord.from_config(written) == SNLI_TASK
    assert backend.load_classifier(tmp_path / "clf", devices)[0].num_classes == 3


def test_a_malformed_task_record_is_an_error_naming_the_file():
    with pytest.raises(ValueError, match="config.json: 'task' must be"):
        TaskRecord.from_config({"task": {"name": "x", "paired": True}, "labels": ["only one"]})


def test_expected_shapes_size_the_output_layer_by_the_number_of_classes():
    from nlibert.core.config import BERTConfig
    cfg = BERTConfig(vocab_size=10, **SIZES)
    assert expected_shapes(cfg, "classifier")["output.weight"] == (3, 16)
    shapes = expected_shapes(cfg, "classifier", num_classes=5)
    assert shapes["output.weight"] == (5, 16) and shapes["output.bias"] == (5,)


@pytest.mark.backends("mxnet", "jax")
def test_parity_compares_a_four_class_classifier_across_every_backend(tmp_path):
    backend = load_backend(BACKENDS[0])
    net, _ = _classifier(backend, tmp_path / "bert", 4)
    backend.save_classifier(net, VOCAB, None, tmp_path / "clf", task=NEWS)
    report = jobs.run_parity(str(tmp_path / "clf"), num_pairs=8, max_len=16)
    assert report["kind"] == "classifier" and report["passed"], report
    assert set(report["label_agreement"]) == set(BACKENDS[1:])
