"""Command-line options generated from a settings dataclass's fields, as Hugging Face's
`HfArgumentParser` does: each field of a settings class (core/settings.py, core/inference_settings.py)
is the option of its name (`batch_size` is `--batch-size`), and its default, type, choices and help
text are read off the field, so that they are written once; the checks that refuse a value name that
option (`check_positive`, `only_with`). A field's `metadata` (`option(...)`) holds what an annotation
cannot say:

    help        the help text (argparse's `%(default)s` and `%(choices)s` work in it)
    metavar     the name argparse shows for its value (default: the field's name, upper case)
    aliases     more option names for the same field, shown with it in --help
    hidden_aliases  option names it also answers to, left out of --help (e.g. an old name kept working)
    type        the function that reads its value, when the annotation's type is not the one
    opposite    for a `bool | None` field: `(option, help)` of the option that sets it False
                (`--no-header` / `--header`); without it, `--name` / `--no-name`
    positional  the field is the command's positional arguments (`nargs="*"`)

The rules: `int`, `float` and `str` fields (optional or not) take a value of that type, an `int` of
the class's POSITIVE tuple through `positive_int`; a field of the class's CHOICES takes one of them;
a `bool` defaulting to False is a switch (`--graph`), one defaulting to True or None has its
negation too (`--bucketing` / `--no-bucketing`; None: neither given); a field without a default
is a required option.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Mapping, Sequence


def option(default: Any = dataclasses.MISSING, help: str | None = None, **cli: Any) -> Any:
    """A settings field with its command-line option's help text and the other `metadata` keys
    this module reads (`metavar`, `aliases`, `hidden_aliases`, `type`, `opposite`, `positional`)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def option_name(name: str) -> str:
    """The CLI option of a settings field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def positive_int(text: str) -> int:
    """argparse's type for a positive integer: its error names what is wanted and what was given."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def check_positive(settings: Any) -> None:
    """Refuse a field of `settings.POSITIVE` that is not a positive integer (None: not set), naming its option."""
    for name in settings.POSITIVE:
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{option_name(name)} must be a positive integer, got {value!r}")


def only_with(settings: Any, names: Sequence[str], needed: str) -> None:
    """Refuse options of `names` that are set while the option `needed` is not."""
    given = [option_name(name) for name in names if getattr(settings, name) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)}: only with {option_name(needed)}; add {option_name(needed)} or leave "
                         f"{'them' if len(given) > 1 else 'it'} out")


def add_options(parser: argparse.ArgumentParser, cls: type,
                after: Mapping[str, Callable[[argparse.ArgumentParser], None]] | None = None,
                **overrides: dict) -> None:
    """An option for every field of the settings dataclass `cls`, in field order. `after[name]`
    adds options that are no field right after field `name`'s; `overrides[name]` replaces
    `add_argument` keywords of one field's option (e.g. a default computed when the CLI starts)."""
    hints = typing.get_type_hints(cls)
    positive, choices = getattr(cls, "POSITIVE", ()), getattr(cls, "CHOICES", {})
    for field in dataclasses.fields(cls):
        meta = field.metadata
        kwargs: dict[str, Any] = {"help": meta.get("help")}
        if "metavar" in meta:
            kwargs["metavar"] = meta["metavar"]
        if field.default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default
        kind = _value_type(hints[field.name])
        if kind is bool:
            kwargs["action"] = ("store_true" if field.default is False
                                else "store_const" if "opposite" in meta else argparse.BooleanOptionalAction)
            if "opposite" in meta:
                kwargs["const"] = True
        elif field.name in choices:
            kwargs["choices"] = choices[field.name]
        elif kind is int:
            kwargs["type"] = positive_int if field.name in positive else int
        elif kind is float:
            kwargs["type"] = float
        if "type" in meta:
            kwargs["type"] = meta["type"]
        kwargs.update(overrides.get(field.name, {}))
        if meta.get("positional"):
            parser.add_argument(field.name, nargs="*", **kwargs)
        else:
            parser.add_argument(option_name(field.name), *meta.get("aliases", ()), dest=field.name, **kwargs)
        if meta.get("hidden_aliases"):  # the same option under other names; its default is the field's above
            hidden = {**kwargs, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS, "required": False}
            parser.add_argument(*meta["hidden_aliases"], dest=field.name, **hidden)
        if "opposite" in meta:
            name, help_text = meta["opposite"]
            parser.add_argument(name, dest=field.name, action="store_const", const=False, help=help_text)
        if after and field.name in after:
            after[field.name](parser)


def _value_type(hint: Any) -> Any:
    """`int` of `int | None`, and the like: the type a value given on the command line has."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is not None and len(args) == 1 else hint
