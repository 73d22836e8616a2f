"""The command line: --version, help on every option, closed choices checked at parse time."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from workers import __version__
from workers.cli import BACKENDS, TELEMETRY_KINDS, build_parser

ROOT = Path(__file__).resolve().parents[2]


def _parsers(p: argparse.ArgumentParser):
    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _parsers(sub)


def test_version():
    run = subprocess.run([sys.executable, "-m", "workers", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == f"sluice {__version__}"


def test_every_option_has_help():
    missing = [f"{p.prog} {'/'.join(a.option_strings) or a.dest}" for p in _parsers(build_parser())
               for a in p._actions if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert not missing, missing


def test_choices_match_what_the_code_knows():
    from workers.inference import known_backends
    from workers.telemetry import KINDS

    assert TELEMETRY_KINDS == tuple(sorted(KINDS))
    assert BACKENDS == tuple(known_backends())


@pytest.mark.parametrize("argv", [
    ["produce", "--bootstrap-servers", "k:9092", "--topic", "t", "--count", "1", "--kind", "dns"],
    ["score", "--model", "models/x", "--backend", "onnx"],
    ["score", "--model", "models/x", "--device", "gpu"],
    ["produce", "--bootstrap-servers", "k:9092", "--topic", "t", "--count", "1", "--bad-fraction", "2"],
    ["demo", "--duration", "0"],
])
def test_bad_choices_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_open_ended_choices_are_accepted():
    p = build_parser()
    args = p.parse_args(["bench-inference", "--model", "m", "--backend", "tests.backends:SlowOnnxRuntime",
                         "--device", "cuda:1"])
    assert (args.backend, args.device) == ("tests.backends:SlowOnnxRuntime", "cuda:1")
    assert p.parse_args(["produce", "--bootstrap-servers", "k", "--topic", "t", "--count", "1",
                         "--kind", "auth"]).kind == "auth"
