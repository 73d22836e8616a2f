"""Where the drift aggregator's faust app keeps its local data: never the working directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from workers.cli import build_parser
from workers.drift_aggregator import default_data_dir


def test_default_is_under_xdg_state_home_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_data_dir("agg-1") == tmp_path / "sluice" / "drift-aggregator" / "agg-1"


def test_default_is_under_the_system_temp_dir_otherwise(monkeypatch):
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    d = default_data_dir("agg-1")
    assert d == Path(tempfile.gettempdir()) / f"sluice-{os.getuid()}" / "drift-aggregator" / "agg-1"
    assert d.is_absolute()  # whatever the working directory


def test_the_command_takes_a_data_dir():
    args = build_parser().parse_args(["drift-aggregator", "--config", "c.toml", "--data-dir", "/var/lib/agg"])
    assert args.data_dir == Path("/var/lib/agg")
    assert build_parser().parse_args(["drift-aggregator"]).data_dir is None


@pytest.mark.parametrize("group", ["agg-{conf}", "plain"])
def test_the_app_gets_the_directory_as_given(tmp_path, group):
    faust = pytest.importorskip("faust")
    data_dir = tmp_path / group
    app = faust.App(group, datadir=str(data_dir).replace("{", "{{").replace("}", "}}"))
    assert Path(app.conf.datadir) == data_dir  # (build_app escapes faust's {conf} formatting likewise)
