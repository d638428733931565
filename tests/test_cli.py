"""The `nlibert` command end to end, on small data the tests make; its options against the settings."""
import argparse
import dataclasses
import json
import math
import shutil
from typing import ClassVar

import pytest

from nlibert import cli
from nlibert.backends import BACKENDS, default_backend
from nlibert.core.inference_settings import EvaluateSettings, PredictSettings
from nlibert.core.options import add_options, option, option_name
from nlibert.core.settings import FinetuneSettings, PretrainSettings
from nlibert.core.sample import write_sample_snli

SMALL = ["--pretrained", "random", "--train-limit", "96", "--test-limit", "48", "--epochs", "2", "--batch-size", "32", "--max-len", "32"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_finetune_then_predict_end_to_end(tmp_path, capsys, backend):
    out = tmp_path / "out"
    assert cli.main(["finetune", "--backend", backend, "--out", str(out), "--device", "cpu", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "read 96 training and 48 test examples: embedded NLI sample" in printed
    assert "loss " in printed and "examples/sec on [" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == backend and metrics["num_train"] == 96 and metrics["num_test"] == 48
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all(math.isfinite(e["loss"]) and 0 <= e["test_acc"] <= 1 and e["examples_per_sec"] > 0
               for e in metrics["epochs"])
    assert metrics["hyperparameters"]["seed"] == 0 and backend in metrics["versions"]
    assert json.loads((out / "model" / "config.json").read_text())["kind"] == "classifier"

    assert cli.main(["predict", "--model", str(out / "model"), "a man is sleeping", "a person is sleeping"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] in ("entailment", "contradiction", "neutral")
    probabilities = json.loads("\n".join(lines[1:]))
    assert sorted(probabilities) == ["contradiction", "entailment", "neutral"]
    assert abs(sum(probabilities.values()) - 1) < 1e-5
    assert max(probabilities, key=probabilities.get) == lines[0]


def test_finetune_splits_a_dev_only_folder_and_reuses_the_seeded_checkpoint(tmp_path, capsys):
    sample = write_sample_snli(tmp_path / "sample", num_train=200, num_test=10, seed=1)
    data = tmp_path / "devonly"
    data.mkdir()
    shutil.copy(f"{sample}/snli_1.0_train.txt", data / "snli_1.0_dev.txt")
    out = tmp_path / "out"
    args = ["finetune", "--pretrained", "random", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "64", "--max-len", "32"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "dev file split 90/10, seed 0" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    total = metrics["num_train"] + metrics["num_test"]
    assert metrics["num_train"] == round(0.9 * total)
    (params,) = out.glob("seeded-bert-torch-*/pretrained.params")
    stamp = params.stat().st_mtime_ns
    assert cli.main(args) == 0  # a complete checkpoint folder is reused, not rebuilt
    assert params.stat().st_mtime_ns == stamp
    # it is keyed by what it was built from: another seed (or other data) gets its own
    assert cli.main(args + ["--seed", "1", "--no-resume"]) == 0
    assert len(list(out.glob("seeded-bert-torch-*/pretrained.params"))) == 2
    assert params.stat().st_mtime_ns == stamp


def test_clear_errors(tmp_path, capsys):
    assert cli.main(["finetune", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(["predict", "--model", str(tmp_path), "a", "b"]) == 2
    assert "not a fine-tuned model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--train-limit", "0"])


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    import os
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cli.main(["predict", "--model", str(tmp_path), "a", "b"]) == 2  # fails fast, after the setting
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli.main(["predict", "--model", str(tmp_path), "a", "b"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


# The options of finetune, pretrain, predict and evaluate are generated from their settings' fields
# (core/options.py): what a user sees is held here against the dataclasses, not a copy of --help.
COMMANDS = {"finetune": FinetuneSettings, "pretrain": PretrainSettings, "predict": PredictSettings,
            "evaluate": EvaluateSettings}
# What a command needs given, and the fields it sets.
GIVEN = {"predict": (["--model", "m", "a text"], {"model": "m", "texts": ["a text"]}),
         "evaluate": (["--model", "m"], {"model": "m"})}
# Options that are no field (besides --help and --debug), after the field they follow.
AFTER = {("finetune", "nproc"): ["--oversubscribe"], ("pretrain", "nproc"): ["--oversubscribe"],
         ("predict", "no_header"): ["--header"], ("evaluate", "no_header"): ["--header"]}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in cli.build_parser()._actions if a.dest == "command").choices


def _defaults(cls: type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_settings_field_is_an_option_with_the_dataclass_default(command):
    cls = COMMANDS[command]
    argv, given = GIVEN.get(command, ([], {}))
    args = cli.build_parser().parse_args([command, *argv])
    expected = {**_defaults(cls), **given}
    if "backend" in expected:
        expected["backend"] = default_backend()  # the registry's first installed, known when the CLI starts
    assert {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)} == expected
    assert cli.settings_from_args(cls, args) == cls(**expected)


@pytest.mark.parametrize("command", COMMANDS)
def test_the_options_are_the_fields_in_field_order_plus_the_few_that_are_no_field(command):
    """--help lists the options in the dataclass's field order, each named after its field, with the
    options that are no field where they were: --oversubscribe after --nproc, --header after --no-header."""
    cls, parser = COMMANDS[command], _subparsers()[command]
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "texts"]
    expected = ["--help", "--debug"]
    for name in fields:
        expected += [option_name(name), *AFTER.get((command, name), [])]
    hidden = [a for a in parser._actions if a.help == argparse.SUPPRESS]  # old names kept working
    assert [a.option_strings for a in hidden] == ([["--lr-decay"]] if command == "pretrain" else [])
    actions = [a for a in parser._actions if a.option_strings and a not in hidden]
    assert [next(s for s in a.option_strings if s.startswith("--")) for a in actions] == expected
    assert [a.dest for a in actions if a.dest in fields and a.option_strings[0] != "--header"] == fields
    positional = [(a.dest, a.nargs, a.metavar) for a in parser._actions if not a.option_strings]
    assert positional == ([("texts", "*", "TEXT")] if command == "predict" else [])


@pytest.mark.parametrize("command", COMMANDS)
def test_choices_come_from_the_settings_class_and_positive_integers_are_checked_when_parsed(command, capsys):
    cls, parser = COMMANDS[command], _subparsers()[command]
    actions = {a.dest: a for a in parser._actions}
    for name, choices in getattr(cls, "CHOICES", {}).items():
        assert tuple(actions[name].choices) == choices, name
    if "backend" in actions:
        assert tuple(actions["backend"].choices) == BACKENDS
    for name, value in zip(cls.POSITIVE, ["0", "-2", "abc", "1.5"] * 3):
        flag = option_name(name)
        with pytest.raises(SystemExit) as stop:
            cli.main([command, *GIVEN.get(command, ([], {}))[0], flag, value])
        assert stop.value.code == 2
        assert capsys.readouterr().err == (f"nlibert: error: argument {flag}: must be a positive integer, got "
                                           f"{value}; see `nlibert {command} --help`\n")


def test_every_option_of_every_command_has_a_help_text():
    for command, parser in _subparsers().items():
        for action in parser._actions:
            assert action.help and action.help.strip(), f"nlibert {command} {action.option_strings or action.dest}"
        assert "%(" not in parser.format_help()  # every %(default)s and %(choices)s filled in


def test_bool_fields_become_switches_by_their_default():
    parse = cli.build_parser().parse_args
    assert parse(["finetune"]).bucketing is True and parse(["finetune", "--no-bucketing"]).bucketing is False
    assert parse(["finetune"]).graph is False and parse(["finetune", "--graph"]).graph is True
    assert [parse(["pretrain", *flag]).resume for flag in ([], ["--resume"], ["--no-resume"])] == [None, True, False]
    for command in ("predict", "evaluate"):
        base = [command, *GIVEN[command][0]]
        assert [parse(base + flag).no_header for flag in ([], ["--no-header"], ["--header"])] == [None, True, False]
    with pytest.raises(SystemExit):
        parse(["finetune", "--header"])  # finetune's --no-header is a plain switch


def test_a_field_may_carry_aliases_a_hidden_option_and_a_required_one():
    """What a renamed option needs: its old name kept working, shown (`aliases`) or not
    (`hidden_aliases`), a value read its own way (`type`), an option hidden from --help
    (argparse.SUPPRESS); and the generator's rules on a class of its own."""
    @dataclasses.dataclass(frozen=True)
    class Toy:
        name: str = option(help="required: no default")
        lr_schedule: str = option("constant", "the schedule", aliases=("--schedule",), hidden_aliases=("--lr-decay",),
                                  type=lambda text: {"none": "constant"}.get(text, text))
        steps: int = option(3, "steps")
        secret: float | None = option(None, argparse.SUPPRESS)
        POSITIVE: ClassVar[tuple[str, ...]] = ("steps",)
        CHOICES: ClassVar[dict] = {"lr_schedule": ("constant", "linear")}

    parser = cli._Parser(prog="toy")
    add_options(parser, Toy)
    args = parser.parse_args(["--name", "n", "--lr-decay", "linear", "--secret", "0.5"])
    assert cli.settings_from_args(Toy, args) == Toy("n", "linear", 3, 0.5)
    assert cli.settings_from_args(Toy, parser.parse_args(["--name", "n"])) == Toy("n")
    for argv in (["--lr-schedule", "linear"], ["--schedule", "linear"], ["--lr-decay", "linear"]):
        assert parser.parse_args(["--name", "n", *argv]).lr_schedule == "linear"
    assert parser.parse_args(["--name", "n", "--lr-decay", "none"]).lr_schedule == "constant"
    text = parser.format_help()
    assert "--lr-schedule {constant,linear}, --schedule {constant,linear}" in text
    assert "--lr-decay" not in text and "--secret" not in text
    for argv in (["--steps", "2"], ["--name", "n", "--steps", "-1"], ["--name", "n", "--lr-decay", "cosine"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
