"""Every code block of README.md marked ``<!-- readme-test: python -->`` runs as written, and
the command line marked ``<!-- readme-test: cli -->`` fuses the bundled model (through
``python -m onnx_groupnorm``: the venv and install steps before it are the reader's)."""

from __future__ import annotations

import pathlib
import re
import runpy
import shlex
import subprocess
import sys

import onnx
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

#: A marker comment, then the fenced block right after it.
_BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\s*\n```(\w+)\n(.*?)\n```", re.S)


def _blocks(kind: str) -> list[str]:
    return [code for marker, _, code in _BLOCK.findall(README.read_text(encoding="utf-8")) if marker == kind]


@pytest.fixture
def in_repo_copy(tmp_path, monkeypatch):
    """A working directory where ``models/`` is the repository's and outputs go to tmp_path."""
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_marks_its_blocks():
    text = README.read_text(encoding="utf-8")
    python_fences = text.count("```python")
    assert len(_blocks("python")) == python_fences >= 4, "every ```python block must carry the readme-test marker"
    assert len(_blocks("cli")) == 1


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs(index, in_repo_copy, capsys):
    code = _blocks("python")[index]
    script = in_repo_copy / f"readme_block_{index}.py"
    script.write_text(code, encoding="utf-8")
    runpy.run_path(str(script), run_name="__main__")
    # What a block saves is a valid model.
    for saved in in_repo_copy.glob("*.onnx"):
        onnx.checker.check_model(str(saved))


def test_cli_line_runs(in_repo_copy):
    (line,) = _blocks("cli")
    command = next(part for part in line.split("&&") if "onnx-groupnorm fuse" in part)
    argv = shlex.split(command)
    assert argv[0].endswith("onnx-groupnorm")
    done = subprocess.run([sys.executable, "-m", "onnx_groupnorm", *argv[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "verification passed" in done.stdout
    out = in_repo_copy / argv[argv.index("-o") + 1]
    onnx.checker.check_model(str(out))
    assert (in_repo_copy / argv[argv.index("--report") + 1]).is_file()
