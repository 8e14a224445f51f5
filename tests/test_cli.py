import json
import subprocess
import sys

import pytest

from pipeline import cli
from pipeline.errors import MissingDependencyError, require


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("gen-logits", "train-student", "merge", "inspect", "eval"):
        assert command in result.stdout


def test_bad_config_exits_2_with_one_message_and_no_traceback(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"lora": {"rank": 8}}))
    result = run_cli("train-student", "--config", str(config))
    assert result.returncode == 2
    assert "`lora.rank` is not a setting; did you mean `lora.r`?" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_and_bad_override_exit_2(tmp_path):
    result = run_cli("gen-logits", "--config", str(tmp_path / "none.json"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    config = tmp_path / "run.json"
    config.write_text("{}")
    result = run_cli("gen-logits", "--config", str(config), "--set", "lora.r")
    assert result.returncode == 2 and "section.key=value" in result.stderr


def test_bad_part_arguments_exit_2(tmp_path):
    config = tmp_path / "run.json"
    config.write_text("{}")
    result = run_cli("gen-logits", "--config", str(config), "--part", "3", "--num-parts", "3")
    assert result.returncode == 2 and "0 <= part < num-parts" in result.stderr


def test_usage_error_exits_2():
    assert run_cli("merge").returncode == 2  # argparse: missing required arguments


def test_internal_error_exits_1_with_traceback(monkeypatch, capsys, tmp_path):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_run_inspect", broken)
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err


def test_missing_optional_dependency_names_the_extra(monkeypatch, tmp_path):
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[cpu\]'"):
        require("surely_not_installed_pkg", "cpu", "The vLLM engine")
    # a package that is present but fails inside is a bug to show, not a missing extra
    (tmp_path / "half_broken_pkg.py").write_text("import surely_not_installed_inner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as info:
        require("half_broken_pkg", "cpu", "x")
    assert not isinstance(info.value, MissingDependencyError)
