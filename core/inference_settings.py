"""The settings of `nlibert predict` and `nlibert evaluate`, which use a fine-tuned model folder: as
`core/settings.py`'s, frozen dataclasses whose fields are the command's options (core/options.py)."""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar, Sequence

from .options import check_positive, only_with, option
from .settings import DEVICE_LIST_HELP, TEXT_COLUMNS_HELP
from .tables import FORMATS

_MODEL_HELP = "the model folder `finetune` wrote (OUT/model)"


def _header_choice(prefix: str) -> dict:
    """--no-header and its opposite --header, for a file a model reads; neither: as the model's training file."""
    return {"help": f"{prefix}the file has no header line; columns are 0-based indices (default: as the model's "
                    "training file, which the model records)",
            "opposite": ("--header", f"{prefix}line 1 of the file is a header, whatever the model's training file had")}


@dataclasses.dataclass(frozen=True)
class PredictSettings:
    """Labelling with a fine-tuned model (`nlibert predict`): one text or pair (`texts`), or every
    row of a CSV/TSV/JSON Lines `file`, written to `output` with the predictions."""

    model: str = option(help=_MODEL_HELP)
    device: str | None = option(None, DEVICE_LIST_HELP)
    texts: Sequence[str] = option((), "the text to label, or two (TEXT TEXT_B) for a model of pairs", metavar="TEXT",
                                  positional=True)
    file: str | None = option(None, "label every row of this .csv, .tsv or .jsonl file instead (with --output)")
    output: str | None = option(None, "with --file: where to write its rows plus predicted_label and prob_<label> per "
                                "label; the extension (.csv, .tsv, .jsonl) sets the format")
    text_columns: str | None = option(None, "with --file: the column holding the text, or two (A,B) for pairs "
                                      "(default: the columns the model was fine-tuned on, when it was fine-tuned on "
                                      "your own files)", metavar="A[,B]")
    no_header: bool | None = option(None, **_header_choice("with --file: "))
    batch_size: int = option(256, "with --file: rows per batch (default %(default)s)")

    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size",)

    def __post_init__(self) -> None:
        check_positive(self)
        if self.file is None:
            only_with(self, ("output", "text_columns", "no_header"), "file")
            if not 1 <= len(self.texts) <= 2:
                raise ValueError(f"give TEXT (and TEXT_B for a model of pairs), or --file FILE --output OUT; "
                                 f"found {len(self.texts)} texts")
            return
        if self.texts:
            raise ValueError("--file labels a whole file: leave out TEXT and TEXT_B")
        if self.output is None:
            raise ValueError("--file needs --output OUT: where to write the rows with their predictions "
                             "(.csv, .tsv, .jsonl or .json)")
        if os.path.splitext(self.output)[1].lower() not in FORMATS:
            raise ValueError(f"--output {self.output}: name it .csv, .tsv, .jsonl or .json (the extension "
                             "sets the format)")


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
    """Measuring a fine-tuned model on a labelled test set (`nlibert evaluate`): the task's own test
    split (`data` None and no `test_file`: the data the model was fine-tuned on), a folder in the
    task's layout (`data`), or the user's `test_file`; reports go to `out`."""

    model: str = option(help=_MODEL_HELP)
    data: str | None = option(None, "a folder in the model's task's layout (as finetune --data) whose test split to "
                              "use (default: the test split of the data the model was fine-tuned on)")
    test_file: str | None = option(None, "your own labelled test file (.csv, .tsv, .jsonl); its labels must be the "
                                   "model's. Columns default to the ones the model was fine-tuned on, if it records "
                                   "them")
    text_columns: str | None = option(None, TEXT_COLUMNS_HELP, metavar="A[,B]")
    label_column: str | None = option(None, "the column holding the label", metavar="L")
    no_header: bool | None = option(None, **_header_choice(""))
    out: str | None = option(None, "folder for evaluation.json and confusion.png (default: the model folder's parent, "
                             "i.e. the finetune run's OUT)")
    batch_size: int = option(256, "test examples per batch (default %(default)s)")
    device: str | None = option(None, DEVICE_LIST_HELP)

    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size",)

    def __post_init__(self) -> None:
        check_positive(self)
        if self.test_file is None:
            only_with(self, ("text_columns", "label_column", "no_header"), "test_file")
        elif self.data is not None:
            raise ValueError("--data and --test-file both name the test data; give one of them")

    def out_dir(self) -> str:
        """Where evaluation.json and confusion.png go: `out`, else the model folder's parent."""
        return self.out if self.out is not None else os.path.dirname(os.path.abspath(self.model))
