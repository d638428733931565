"""The checkpoints users hold, in every backend: the book's own folders (`vocab.json` +
`pretrained.params`, no config.json) as the book's torch and MXNet code write them, nlibert's
folders of each backend's format, and a Hugging Face folder, each through `parity`, `convert`,
`finetune` and the data hub's `--pretrained bert.small`; and the same command giving the same
model whatever OUT holds.

The book's folders are written here from the parameter tables of the book's models (facts:
d2l-bert-facts.md 1.4, both frameworks' names and shapes), with the book's writers (`torch.save` of
a state_dict; MXNet's `save_parameters` format, `npx.save` of a name -> array dict), never by
nlibert's own savers, so nothing here depends on core/names.py being right.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import numpy as np
import pytest

from nlibert import jobs
from nlibert.backends import BACKENDS, load_backend, read_params_in
from nlibert.core import data_hub
from nlibert.core.folders import read_checkpoint_config
from nlibert.core.settings import FinetuneSettings
from nlibert.core.vocab import RESERVED_TOKENS

from test_data_hub import server  # noqa: F401  the loopback HTTP server fixture

pytestmark = pytest.mark.backends(*BACKENDS)  # each source through every backend (tests/conftest.py)

# A small model of the book's architecture: 64-dimensional heads (what a folder without config.json
# is read with), 2 blocks as bert.small.
H, F, L, MAX_LEN = 64, 128, 2, 64
WORDS = ("a man woman is are playing guitar person making music dog runs outside sleeping the on in "
         "cat child two people sitting standing").split()
TOKENS = ["<unk>"] + RESERVED_TOKENS + WORDS  # the book's vocab.json: idx_to_token


def book_torch_params(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The book's torch `BERTModel` state_dict, names and shapes as d2l-bert-facts.md 1.4 lists them
    (in `state_dict` order), filled with seeded values of a trained model's scale."""
    shapes = {"encoder.pos_embedding": (1, MAX_LEN, H), "encoder.token_embedding.weight": (vocab_size, H),
              "encoder.segment_embedding.weight": (2, H)}
    for i in range(L):
        block = f"encoder.blks.{i}."
        for w in ("W_q", "W_k", "W_v", "W_o"):
            shapes.update({f"{block}attention.{w}.weight": (H, H), f"{block}attention.{w}.bias": (H,)})
        shapes.update({f"{block}addnorm1.ln.weight": (H,), f"{block}addnorm1.ln.bias": (H,),
                       f"{block}ffn.dense1.weight": (F, H), f"{block}ffn.dense1.bias": (F,),
                       f"{block}ffn.dense2.weight": (H, F), f"{block}ffn.dense2.bias": (H,),
                       f"{block}addnorm2.ln.weight": (H,), f"{block}addnorm2.ln.bias": (H,)})
    shapes.update({"hidden.0.weight": (H, H), "hidden.0.bias": (H,), "mlm.mlp.0.weight": (H, H),
                   "mlm.mlp.0.bias": (H,), "mlm.mlp.2.weight": (H,), "mlm.mlp.2.bias": (H,),
                   "mlm.mlp.3.weight": (vocab_size, H), "mlm.mlp.3.bias": (vocab_size,),
                   "nsp.output.weight": (2, H), "nsp.output.bias": (2,)})
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in shapes.items():
        layer_norm_weight = name.endswith("ln.weight") or name == "mlm.mlp.2.weight"
        base = 1.0 if layer_norm_weight else 0.0
        params[name] = (base + rng.normal(0, 0.05, shape)).astype(np.float32)
    return params


def book_mxnet_name(torch_name: str) -> str:
    """The book's MXNet `save_parameters` key of a torch key (d2l-bert-facts.md 1.4's mapping rules)."""
    name = torch_name.replace("hidden.0.", "hidden.")
    if name.startswith("mlm.mlp.2."):  # the MLM LayerNorm: index 1 in Gluon's Sequential
        name = "mlm.mlp.1." + name.rsplit(".", 1)[1]
    elif name.startswith("mlm.mlp.3."):
        name = name.replace("mlm.mlp.3.", "mlm.mlp.2.")
    if ".ln." in name or name.startswith("mlm.mlp.1."):
        name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
    return name


def write_book_torch_folder(folder, params: dict[str, np.ndarray]) -> str:
    """What `bert.small.torch.zip` unpacks to: `torch.save(state_dict)` and `json.dump(idx_to_token)`."""
    import torch
    os.makedirs(folder)
    torch.save({k: torch.from_numpy(v) for k, v in params.items()}, os.path.join(folder, "pretrained.params"))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(TOKENS, f)
    return str(folder)


def write_book_mxnet_folder(folder, params: dict[str, np.ndarray]) -> str:
    """What `bert.small.zip` unpacks to: Gluon's `save_parameters` file (under `npx.set_np()`, the
    book's mode, it is `npx.save` of the structured names) and the same vocab.json."""
    import mxnet as mx
    mx.npx.set_np()  # as the book's MXNet chapter does, globally
    os.makedirs(folder)
    mx.npx.save(os.path.join(folder, "pretrained.params"),
                {book_mxnet_name(k): mx.np.array(v, dtype=np.float32) for k, v in params.items()})
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(TOKENS, f)
    return str(folder)


@pytest.fixture(scope="module")
def book_params() -> dict[str, np.ndarray]:
    return book_torch_params(len(TOKENS))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, book_params) -> dict[str, str]:
    """Every kind of folder a user holds: the book's two, each backend's nlibert folder (the book's
    torch weights loaded and saved by that backend), and a Hugging Face folder saved by transformers."""
    root = tmp_path_factory.mktemp("sources")
    folders = {"book-torch": write_book_torch_folder(root / "book-torch", book_params),
               "book-mxnet": write_book_mxnet_folder(root / "book-mxnet", book_params)}
    for name in BACKENDS:
        backend = load_backend(name)
        bert, vocab = backend.load_pretrained_model(folders["book-torch"], dropout=0.0,
                                                    devices=backend.parse_devices("cpu"))
        backend.save_pretrained(bert, vocab, root / f"nlibert-{name}")
        folders[f"nlibert-{name}"] = str(root / f"nlibert-{name}")
    transformers = pytest.importorskip("transformers")
    from test_hf import write_tiny_hf_bert  # transformers' own writer
    assert transformers
    write_tiny_hf_bert(root / "huggingface")
    folders["huggingface"] = str(root / "huggingface")
    return folders


SOURCES = ["book-torch", "book-mxnet", *(f"nlibert-{name}" for name in BACKENDS), "huggingface"]
BOOK_SOURCES = [s for s in SOURCES if s != "huggingface"]


def test_the_book_folders_hold_the_same_tensors_under_each_frameworks_names(sources, book_params):
    """The fixtures are what they claim: no config.json, the book's names in each framework."""
    for name in ("book-torch", "book-mxnet"):
        assert sorted(os.listdir(sources[name])) == ["pretrained.params", "vocab.json"]
    torch_file = read_params_in(os.path.join(sources["book-torch"], "pretrained.params"), "torch")
    mxnet_file = read_params_in(os.path.join(sources["book-mxnet"], "pretrained.params"), "mxnet")
    assert list(torch_file) == list(book_params)
    assert set(mxnet_file) == {book_mxnet_name(k) for k in book_params}
    for key, value in book_params.items():
        np.testing.assert_array_equal(mxnet_file[book_mxnet_name(key)], value)


@pytest.mark.parametrize("source", SOURCES)
def test_parity_compares_every_backend_on_every_folder(sources, source):
    """`nlibert parity --checkpoint SRC`: every installed backend reads SRC directly and gives the
    reference's outputs within the parity tolerance (the book's folders failed here before)."""
    report = jobs.run_parity(sources[source], num_pairs=16, max_len=32)
    assert report["passed"], report
    assert sorted([report["reference"], *report["compared"]]) == sorted(BACKENDS)
    expected_format = {"book-torch": "torch", "book-mxnet": "mxnet", "huggingface": "huggingface"}.get(
        source, source.removeprefix("nlibert-"))
    assert report["format"] == expected_format
    for diffs in report["max_abs_diff"].values():
        assert diffs["encoded_X"] <= 1e-4 * report["scale"]["encoded_X"]


@pytest.mark.parametrize("to", BACKENDS)
@pytest.mark.parametrize("source", SOURCES)
def test_convert_writes_a_folder_every_backend_reads(sources, source, to, tmp_path, book_params):
    """`nlibert convert SRC DST --to B`: DST always has a config.json naming B and the sizes, its
    params file is recognisable as B's by its bytes, every backend loads it, and its outputs are
    the source's (parity passes); tensors of a book folder come through bit for bit."""
    dst = jobs.run_convert(sources[source], str(tmp_path / "dst"), to)
    config = read_checkpoint_config(dst)
    assert config["format"] == to and config["kind"] == "pretrained"
    assert (config["num_hiddens"], config["num_layers"]) == ((H, L) if source != "huggingface" else (32, 2))
    from nlibert.core.folders import sniff_params_format
    assert sniff_params_format(os.path.join(dst, "pretrained.params")) == to
    report = jobs.run_parity(dst, num_pairs=16, max_len=32)
    assert report["passed"], report
    if source in BOOK_SOURCES:
        from nlibert.core.names import to_canonical
        converted = to_canonical(read_params_in(os.path.join(dst, "pretrained.params"), to), to)
        assert list(converted) == list(book_params)
        for key, value in book_params.items():
            np.testing.assert_array_equal(converted[key], value)


def _finetune(backend: str, pretrained: str, out, **extra) -> dict:
    settings = dict(backend=backend, pretrained=pretrained, out=str(out), train_limit=32, test_limit=16,
                    max_len=32, batch_size=16, epochs=1, lr=1e-3, dropout=0.0, seed=5, device="cpu",
                    checkpoint_every=0)
    return jobs.run_finetune(FinetuneSettings(**{**settings, **extra}))


def _classifier_params(folder, backend: str) -> dict[str, np.ndarray]:
    from nlibert.core.names import to_canonical
    fmt = read_checkpoint_config(folder)["format"]
    assert fmt == backend
    return to_canonical(read_params_in(os.path.join(folder, "classifier.params"), fmt), fmt)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_finetune_starts_from_every_folder_in_every_backend(sources, backend, tmp_path):
    """`nlibert finetune --backend B --pretrained SRC` for every kind of folder, no convert step; the
    book's torch and MXNet folders hold the same weights, so they give the same fine-tuned model, and
    so does B's own nlibert folder of them."""
    trained = {}
    for source in SOURCES:
        metrics = _finetune(backend, sources[source], tmp_path / source)
        assert len(metrics["epochs"]) == 1
        trained[source] = _classifier_params(tmp_path / source / "model", backend)
    reference = trained["book-torch"]
    for source in ("book-mxnet", *(f"nlibert-{name}" for name in BACKENDS)):
        assert list(trained[source]) == list(reference)
        worst = max(float(np.abs(trained[source][k] - reference[k]).max()) for k in reference)
        assert worst <= 1e-5, (source, worst)


def _zip_folder(folder: str) -> bytes:
    """The folder as the data hub's archive: one top-level folder named as the archive."""
    buffer = io.BytesIO()
    name = os.path.basename(folder)
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in sorted(os.listdir(folder)):
            archive.write(os.path.join(folder, file), f"{name}/{file}")
    return buffer.getvalue()


def test_bert_small_from_the_data_hub_in_every_backend(sources, server, monkeypatch, tmp_path):  # noqa: F811
    """`--pretrained bert.small` downloads the book's archive for the backend's format (JAX, for
    which the book publishes none, the torch one) from the hub, checks its sha1 and loads it; every
    backend gives the same outputs."""
    archives = {}
    for archive, source in (("bert.small.torch", "book-torch"), ("bert.small", "book-mxnet")):
        staged = tmp_path / "staged" / archive
        staged.mkdir(parents=True)
        for file in os.listdir(sources[source]):
            (staged / file).write_bytes(open(os.path.join(sources[source], file), "rb").read())
        body = _zip_folder(str(staged))
        server.files[f"/{archive}.zip"] = body
        archives[archive] = (f"{server.url}/{archive}.zip", hashlib.sha1(body).hexdigest())
    monkeypatch.setattr(data_hub, "DATA_HUB", {**data_hub.DATA_HUB, **archives})
    monkeypatch.setenv("NLIBERT_DATA", str(tmp_path / "cache"))
    ids = np.array([[2, 5, 6, 3, 7, 8, 3, 1]], dtype=np.int32)
    segments = np.array([[0, 0, 0, 0, 1, 1, 1, 0]], dtype=np.int32)
    valid_lens, positions = np.array([7], dtype=np.int32), np.array([[1, 2, 5]], dtype=np.int32)
    outputs = {}
    for name in BACKENDS:
        backend = load_backend(name)
        device = backend.parse_devices("cpu")[0]
        bert, vocab = backend.load_pretrained_model("bert.small", dropout=0.0, devices=[device])
        assert len(vocab) == len(TOKENS)
        outputs[name] = backend.bert_outputs(bert, ids, segments, valid_lens, positions, device)
    assert sorted(server.requests) == ["/bert.small.torch.zip", "/bert.small.zip"]  # each archive once
    valid = slice(0, int(valid_lens[0]))  # padded positions are never read: not compared
    for name in BACKENDS[1:]:
        (encoded, mlm, nsp), (encoded_0, mlm_0, nsp_0) = outputs[name], outputs[BACKENDS[0]]
        np.testing.assert_allclose(encoded[:, valid], encoded_0[:, valid], atol=1e-4)
        np.testing.assert_allclose(mlm, mlm_0, atol=1e-4)
        np.testing.assert_allclose(nsp, nsp_0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_command_gives_the_same_model_whatever_out_holds(backend, tmp_path):
    """Rerun of one command: into a fresh OUT, then again into it (--no-resume: the seeded checkpoint
    is found built, not built), then into another fresh OUT. All three models are identical: every
    draw (seeded checkpoint, classifier head, dropout, data order) has its own seed."""
    models = []
    for out in (tmp_path / "a", tmp_path / "a", tmp_path / "b"):
        _finetune(backend, "random", out, dropout=0.1, seed=3, resume=False)
        models.append(_classifier_params(out / "model", backend))
    for other in models[1:]:
        assert list(other) == list(models[0])
        for key in models[0]:
            np.testing.assert_array_equal(other[key], models[0][key])


def test_a_format_whose_framework_is_missing_is_one_line_naming_the_install(sources, monkeypatch):
    """A torch-only user given the book's MXNet folder: the error names the file and what to install."""
    import nlibert.backends as registry
    monkeypatch.setattr(registry, "is_installed", lambda name: name != "mxnet")
    path = os.path.join(sources["book-mxnet"], "pretrained.params")
    with pytest.raises(ModuleNotFoundError) as error:
        load_backend("torch").load_pretrained_model(sources["book-mxnet"], dropout=0.0, devices=["cpu"])
    assert str(error.value) == (f"{path}: a mxnet-format parameter file; reading it needs the mxnet backend "
                                "(MXNet 1.9.1): pip install 'nlibert[mxnet]' (or convert the folder where mxnet "
                                "is installed)")
    assert read_params_in(os.path.join(sources["book-torch"], "pretrained.params"), "torch")
