"""`mmprolong --help` and every verb's `--help` print, byte for byte, what the recorded snapshot
(tests/fixtures/record_cli_help.py) holds."""

import argparse
import contextlib
import io
import json
import os
from pathlib import Path

SNAPSHOT = Path(__file__).parent / "fixtures" / "cli_help.json"
WIDTH = "100"  # argparse wraps help to the terminal's COLUMNS


def _verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser: (), ("convert",), ("convert", "verify"), ..."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _verbs(sub, prefix + (name,))
    return paths


def _help(argv: list[str]) -> str:
    from megatron_mmprolong.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit:
            pass
    return out.getvalue()


def all_help() -> dict[str, str]:
    from megatron_mmprolong.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        return {" ".join(path): _help([*path, "--help"]) for path in _verbs(build_parser())}
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def test_help_texts_equal_the_snapshot():
    recorded = json.loads(SNAPSHOT.read_text())
    now = all_help()
    assert sorted(now) == sorted(recorded)
    assert "train" in now and "eval mmlongbench" in now and "convert verify" in now
    for verb, text in recorded.items():
        assert now[verb] == text, f"`mmprolong {verb} --help` changed"
