"""The ``fgpo`` command as a user meets it: help for users, shipped configs by name from any
directory, one-line errors for a missing config or a missing extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fgpo.cli import main
from fgpo.train.config import TrainConfig, config_names, resolve_config


def test_help_speaks_to_users(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("prepare", "train", "eval", "demo", "example"):
        assert f"fgpo {command}" in out
    assert "module" not in out  # no developer talk


def test_shipped_config_by_name_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "tiny" in config_names()
    for name in ("tiny", "tiny.yaml"):
        cfg = TrainConfig.from_yaml(name)
        assert cfg.model == "tiny-llava"
    (tmp_path / "tiny.yaml").write_text("model: tiny-qwen2-vl\n")
    assert TrainConfig.from_yaml("tiny.yaml").model == "tiny-qwen2-vl"  # a file wins


def test_missing_config_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"config 'nope\.yaml' not found.*shipped: .*\btiny"
    ):
        resolve_config("nope.yaml")
    with pytest.raises(SystemExit, match=r"fgpo train: config 'configs/x\.yaml' not found"):
        main(["train", "--config", "configs/x.yaml"])


def test_a_missing_extra_names_the_extra():
    # transformers made unimportable: the command says which extra to install
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from fgpo.cli import main\n"
        "raise SystemExit(main(['demo', '--quick', '--out', 'unused']))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert 'pip install "fgpo[train]"' in res.stderr
    assert "Traceback" not in res.stderr
