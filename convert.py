"""The checkpoint jobs: `convert` (a checkpoint from one backend's format to another's) and `parity`
(one checkpoint through every installed backend, outputs compared). Framework-neutral, as jobs.py:
backends come from the registry, checkpoint folders from core/folders.py, names from core/names.py.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from types import ModuleType
from typing import Callable

import numpy as np

from .backends import BACKENDS, install_hint, installed_backends, load_backend, read_params_in
from .core.folders import CONFIG_FILE, HUGGING_FACE, VOCAB_FILE, folder_config, resolve_checkpoint
from .core.io import check_output, remove_leftovers, write_folder_whole, write_json
from .core.names import from_canonical, to_canonical
from .core.packing import pack_pairs
from .core.sample import write_sample_snli
from .core.settings import PARITY_TOLERANCE
from .core.snli import read_snli_file
from .core.sources import subset_indices, take


def run_convert(src: str, dst: str, to: str, overwrite: bool = False) -> str:
    """Write checkpoint `src` (a pretrained `BERTModel` or a fine-tuned classifier, in any backend's
    format) in backend `to`'s format into `dst`. Tensors are copied bit for bit, only names change
    (core/names.py: each format's names to the canonical ones and on). A Hugging Face BERT folder (or
    'minilm-l6') is loaded by the `to` backend and written in its book format (heads the file lacks
    are saved as that backend initialised them).

    The copy is written into a temporary folder beside `dst` and renamed into place, so `dst` is
    never half written. `dst` may not be `src`, nor a folder that holds anything unless `overwrite`."""
    target = load_backend(to)
    source = resolve_checkpoint(src, to)
    dst = os.path.abspath(dst)
    if os.path.exists(dst):
        if os.path.realpath(dst) == os.path.realpath(source.folder):
            raise ValueError(f"{dst}: is the source checkpoint itself; convert into another folder")
        if not os.path.isdir(dst):
            raise ValueError(f"{dst}: is a file; convert into a folder")
        if os.listdir(dst) and not overwrite:
            raise ValueError(f"{dst}: already holds files (a model?); choose another folder, or pass "
                             "--overwrite to replace it")
    check_output("DST", dst, folder=True, models={"SRC": source.folder})
    if os.path.realpath(source.folder).startswith(os.path.realpath(dst) + os.sep):
        raise ValueError(f"{dst}: holds the source checkpoint {source.folder}, which replacing it would delete; "
                         "convert into another folder")
    remove_leftovers(dst)  # of a convert killed while it replaced dst
    # Whole: a kill at any instant leaves the old dst or the new one.
    write_folder_whole(lambda folder: _convert_into(source, target, to, src, folder), dst)
    return dst


def _convert_into(source, target: ModuleType, to: str, src: str, folder: str) -> None:
    if source.format == HUGGING_FACE:
        bert, vocab = target.load_pretrained_model(src, devices=target.parse_devices("cpu"))
        target.save_pretrained(bert, vocab, folder)
        return
    params = to_canonical(read_params_in(source.params_path, source.format), source.format, source.params_path)
    shutil.copyfile(os.path.join(source.folder, VOCAB_FILE), os.path.join(folder, VOCAB_FILE))
    # Always a config.json, also for the book's folders (none): the copy says its format and sizes.
    write_json(os.path.join(folder, CONFIG_FILE), dict(folder_config(source, params), format=to))
    target.write_params(from_canonical(params, to, source.params_path),
                        os.path.join(folder, os.path.basename(source.params_path)))  # last


def _parity_inputs(vocab, data_file: str | None, num_pairs: int, max_len: int, seed: int, tmp: str) -> tuple:
    """`num_pairs` seeded pairs of `data_file` (default: the embedded sample), packed, and three MLM
    prediction positions per pair inside its valid length."""
    if data_file is None:
        data_file = os.path.join(write_sample_snli(os.path.join(tmp, "sample-snli"), seed=0), "snli_1.0_test.txt")
    data = read_snli_file(data_file)
    premises, hypotheses, _ = take(data, subset_indices(len(data[2]), num_pairs, seed))
    ids, segments, valid_lens = pack_pairs(premises, hypotheses, vocab, max_len)
    pred_positions = (np.random.default_rng(seed).random((len(valid_lens), 3)) * valid_lens[:, None]).astype(np.int32)
    return ids, segments, valid_lens, pred_positions


def _outputs(backend: ModuleType, folder: str, kind: str, hugging_face: bool, make_inputs: Callable) -> dict:
    """{output name: numpy array} of the checkpoint in `folder` run by `backend` on the CPU, dropout off."""
    device = backend.parse_devices("cpu")[0]
    if kind == "classifier":
        model, vocab, config = backend.load_classifier(folder, [device])
        ids, segments, valid_lens, _ = make_inputs(vocab, config.max_len)
        return {"logits": backend.classifier_logits(model, ids, segments, valid_lens, device)}
    model, vocab = backend.load_pretrained_model(folder, dropout=0.0, devices=[device])
    outputs = dict(zip(("encoded_X", "mlm_Y_hat", "nsp_Y_hat"),
                       backend.bert_outputs(model, *make_inputs(vocab, model.config.max_len), device)))
    # A Hugging Face file may lack the heads, which each backend then initialises its own way.
    return {"encoded_X": outputs["encoded_X"]} if hugging_face else outputs


def run_parity(checkpoint: str, data_file: str | None = None, tolerance: float = PARITY_TOLERANCE,
               num_pairs: int = 256, max_len: int = 128, seed: int = 0) -> dict:
    """Run one checkpoint through every installed backend on the same packed batch, in evaluation
    mode, and report the largest absolute difference of every output between the reference backend
    (the checkpoint's own format; for a Hugging Face folder, the first installed) and each other one:
    `encoded_X` at the valid positions (the padded ones are reported too), the MLM and NSP logits or
    the classifier's. It passes when each is within `tolerance` times the output's scale,
    max(1, max |value|): float32 rounding grows with the size of the values compared.
    Every backend reads the folder directly, whatever its format (the book's folders without
    config.json too); a Hugging Face folder (or 'minilm-l6') is compared on the encoder output only."""
    names = installed_backends()
    if len(names) < 2:
        missing = [name for name in BACKENDS if name not in names]
        raise ValueError(f"parity needs two installed backends; installed: {', '.join(names) or 'none'}; "
                         f"add one: {'; '.join(install_hint(name) for name in missing)}")
    source = resolve_checkpoint(checkpoint, names[0])
    hugging_face = source.format == HUGGING_FACE
    reference = names[0] if hugging_face else source.format
    others = [name for name in names if name != reference]
    report = {"checkpoint": checkpoint, "format": source.format, "kind": source.kind, "reference": reference,
              "compared": others, "max_len": max_len, "tolerance": tolerance}
    inputs: list[tuple] = []

    def make_inputs(vocab, model_max_len: int) -> tuple:  # once, from the reference backend's vocabulary
        if not inputs:  # no longer than the model's positions (the book's bert.small has 512; ours may have fewer)
            report["max_len"] = min(max_len, model_max_len)
            inputs.append(_parity_inputs(vocab, data_file, num_pairs, report["max_len"], seed, tmp))
        return inputs[0]

    with tempfile.TemporaryDirectory() as tmp:
        expected = _outputs(load_backend(reference), source.folder, source.kind, hugging_face, make_inputs)
        found = {name: _outputs(load_backend(name), source.folder, source.kind, hugging_face, make_inputs)
                 for name in others}
    ids, _, valid_lens, _ = inputs[0]
    valid = np.arange(ids.shape[1])[None, :] < valid_lens[:, None]
    report.update(num_pairs=int(len(valid_lens)), max_abs_diff={}, scale={}, label_agreement={})
    for name, outputs in found.items():
        diffs = report["max_abs_diff"][name] = {}
        for key, value in outputs.items():
            diff, reference_values = np.abs(value - expected[key]), np.abs(expected[key])
            if key == "encoded_X":
                # Padded positions are masked out of attention and never read: reported, not judged.
                diffs["encoded_X (padding included)"] = float(diff.max())
                diff, reference_values = diff[valid], reference_values[valid]
            diffs[key] = float(diff.max())
            report["scale"][key] = max(1.0, float(reference_values.max()))
        if source.kind == "classifier":
            report["label_agreement"][name] = float(np.mean(outputs["logits"].argmax(1)
                                                            == expected["logits"].argmax(1)))
    # The tolerance is relative to the outputs' size: max |difference| <= tolerance * max(1, max |value|).
    report["passed"] = all(v <= tolerance * report["scale"][key] for diffs in report["max_abs_diff"].values()
                           for key, v in diffs.items() if key in report["scale"])
    return report
