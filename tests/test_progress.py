"""The progress bar: tqdm on a terminal, nothing in logs; every pass yields every item."""
import io

from nlibert.core.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_silent_when_the_stream_is_not_a_terminal():
    log = io.StringIO()
    bar = Progress([1, 2, 3], "train", stream=log)
    assert not bar.enabled and list(bar) == [1, 2, 3] and log.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar_on_every_pass():
    terminal = Terminal()
    bar = Progress(range(4), "train", stream=terminal)
    assert bar.enabled and len(bar) == 4
    assert list(bar) == [0, 1, 2, 3] and list(bar) == [0, 1, 2, 3]  # one pass per epoch
    drawn = terminal.getvalue()
    assert drawn.count("train:") >= 2 and "/4 [" in drawn and "batch/s" in drawn  # tqdm redraws at most 10/s
    assert drawn.endswith("\r")  # each bar is cleared when its pass ends


def test_enabled_overrides_the_terminal_check():
    assert Progress([], stream=Terminal(), enabled=False).enabled is False
    log = io.StringIO()
    assert list(Progress(iter("ab"), "x", stream=log, enabled=True)) == ["a", "b"]  # no length: no total
    assert "x:" in log.getvalue()
