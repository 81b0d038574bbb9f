"""User errors against bugs (qkv/cli.py main): a UserError or an OS error about the user's files is one
`qkv: error:` line and exit 2; any other exception is one `qkv: internal error` line naming the exception
and the file holding its traceback (the run directory when the command has one), exit 1."""
from __future__ import annotations

import errno
import tempfile
from pathlib import Path

import pytest

from qkv.cli import main
from qkv.errors import UserError


def _raiser(err: BaseException):
    def fail(*args, **kwargs):
        raise err
    return fail


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _traceback_file(line: str) -> Path:
    return Path(line.split("the traceback is in ", 1)[1].split("; ", 1)[0])


@pytest.mark.parametrize("err", [ValueError("library said no"), KeyError("n_layers"), TypeError("bad operand"),
                                 OSError("no filename")], ids=lambda e: type(e).__name__)
def test_a_bug_is_one_line_with_its_traceback_in_a_file(err, tmp_path, monkeypatch, capsys):
    import qkv.train.config
    monkeypatch.setattr(qkv.train.config, "load_config", _raiser(err))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no command run directory: a temporary file
    monkeypatch.delenv("QKV_DEBUG", raising=False)
    assert main(["config", "tiny"]) == 1
    line = _one_line(capsys)
    assert line.startswith("qkv: internal error (a bug in qkv")
    assert f"{type(err).__name__}: " in line and str(err).strip("'") in line and "QKV_DEBUG=1" in line
    path = _traceback_file(line)
    assert path.parent == tmp_path
    text = path.read_text()
    assert "Traceback (most recent call last)" in text and "load_config" in text


def test_a_bug_in_a_run_writes_its_traceback_into_the_run_directory(tmp_path, monkeypatch, capsys):
    import qkv.train.loop
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setattr(qkv.train.loop, "pretrain", _raiser(KeyError("spike_history")))
    monkeypatch.delenv("QKV_DEBUG", raising=False)
    assert main(["pretrain", "tiny", f"train.run_dir={run_dir}"]) == 1
    path = _traceback_file(_one_line(capsys))
    assert path.parent == run_dir and "KeyError: 'spike_history'" in path.read_text()


@pytest.mark.parametrize("err", [UserError("model.d_model=3 is odd: use an even size"),
                                 FileNotFoundError("checkpoint directory 'x' does not exist"),
                                 PermissionError(errno.EACCES, "Permission denied", "/data/x"),
                                 OSError(errno.ENOSPC, "No space left on device"),
                                 OSError(errno.EIO, "Input/output error", "/data/corpus.txt"),
                                 ConnectionError("could not join the distributed run")],
                         ids=lambda e: type(e).__name__ + str(getattr(e, "errno", "") or ""))
def test_user_errors_stay_one_error_line_and_exit_2(err, tmp_path, monkeypatch, capsys):
    import qkv.train.config
    monkeypatch.setattr(qkv.train.config, "load_config", _raiser(err))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("QKV_DEBUG", raising=False)
    assert main(["config", "tiny"]) == 2
    assert _one_line(capsys).startswith("qkv: error: ")
    assert not list(tmp_path.iterdir())  # no traceback file for a user's mistake


def test_exit_codes_carried_by_errors_and_qkv_debug_are_kept(monkeypatch, capsys):
    import qkv.train.config
    from qkv.train.loop import TrainingDiverged
    monkeypatch.delenv("QKV_DEBUG", raising=False)
    monkeypatch.setattr(qkv.train.config, "load_config", _raiser(TrainingDiverged("loss became nan at step 3")))
    assert main(["config", "tiny"]) == 3
    assert _one_line(capsys) == "qkv: error: loss became nan at step 3"
    monkeypatch.setenv("QKV_DEBUG", "1")
    monkeypatch.setattr(qkv.train.config, "load_config", _raiser(ValueError("library said no")))
    with pytest.raises(ValueError, match="library said no"):
        main(["config", "tiny"])
