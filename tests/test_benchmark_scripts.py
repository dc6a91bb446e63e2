"""The scripts under benchmarks/ write the recorded results; none of them is imported by the
other tests, so a syntax error there would only show when someone re-runs a record."""
import pathlib
import py_compile

import pytest

SCRIPTS = sorted((pathlib.Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def test_benchmark_scripts_found():
    assert SCRIPTS, "no benchmarks/*.py found next to tests/"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
