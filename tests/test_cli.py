"""The command line, in-process."""

from __future__ import annotations

import pytest

from onnx_groupnorm import __version__, cli


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"onnx-groupnorm {__version__}"


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: onnx-groupnorm" in capsys.readouterr().out
