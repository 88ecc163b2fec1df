"""The ``camserve`` command itself: sub-commands, ``--log-level``, TensorFlow's native start-up
chatter kept off the terminal, and which errors are the user's (exit 2) and which are bugs."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from camserve import cli
from camserve.cli import main
from camserve.cli.serve import config_from_args
from camserve.errors import InvalidArgument, NotFound

REPO = Path(__file__).resolve().parents[2]

#: Lines TensorFlow's C++ code writes at start-up (absl log prefixes and the known messages).
CHATTER = re.compile(
    r"oneDNN|cuda|cuInit|absl::InitializeLog|cpu_feature_guard|port\.cc|^[IWEF]\d{4} \d\d:\d\d", re.I | re.M
)


def _env_as_a_user_has_it() -> dict[str, str]:
    """The test process's environment without the variables that quiet TensorFlow (conftest
    sets them), as in a user's shell."""
    env = dict(os.environ)
    for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "GLOG_minloglevel", "ABSL_MIN_LOG_LEVEL"):
        env.pop(name, None)
    return env


def _camserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "camserve", *args],
        cwd=REPO,
        env=_env_as_a_user_has_it(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_subcommands_are_the_modules_that_exist() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"explain", "evaluate", "bulk", "dense", "serve", "models", "train-bundled"}


def test_a_missing_subcommand_module_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, "bench"))
    with pytest.raises(ModuleNotFoundError, match="camserve.cli.bench"):
        cli.build_parser()


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["models", "--repository", "r"], "warning"),
        (["--log-level", "debug", "models", "--repository", "r"], "debug"),
        (["models", "--repository", "r", "--log-level", "ERROR"], "error"),
        (["--log-level", "info", "models", "--repository", "r"], "info"),
    ],
)
def test_log_level_before_or_after_the_subcommand(argv: list[str], level: str) -> None:
    assert cli.log_level(cli.build_parser().parse_args(argv)) == level


def test_log_level_refuses_unknown_levels(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["--log-level", "verbose", "models", "--repository", "r"])
    assert info.value.code == 2
    assert "invalid choice: 'verbose'" in capsys.readouterr().err


def test_serve_keeps_its_own_log_level_and_takes_the_global_one() -> None:
    parse = cli.build_parser().parse_args
    assert config_from_args(parse(["serve", "--models", "m", "--log-level", "WARNING"])).log_level == "WARNING"
    assert config_from_args(parse(["--log-level", "debug", "serve", "--models", "m"])).log_level == "DEBUG"
    both = parse(["--log-level", "debug", "serve", "--models", "m", "--log-level", "ERROR"])
    assert config_from_args(both).log_level == "ERROR"  # the one after `serve` wins
    assert config_from_args(parse(["serve", "--models", "m"])).log_level == "INFO"  # the server's default


def test_native_stderr_hidden_keeps_python_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    with cli._native_stderr_hidden():
        os.write(2, b"from C code\n")
        print("from Python", file=sys.stderr)
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "from C code" not in err
    assert "from Python" in err and "after" in err


def test_log_handlers_made_while_hidden_keep_working(capfd: pytest.CaptureFixture[str]) -> None:
    # As TensorFlow's logger is made during its import when no root handler exists (Ray actors).
    import logging

    made = logging.getLogger("camserve-test-made-while-hidden")
    with cli._native_stderr_hidden():
        made.addHandler(logging.StreamHandler())  # takes the sys.stderr of the block
    made.warning("logged afterwards")
    err = capfd.readouterr().err
    assert "logged afterwards" in err and "Logging error" not in err


def test_explain_prints_no_tensorflow_chatter(tmp_path: Path) -> None:
    # Without camserve, this TensorFlow does chatter at import in this environment (else the
    # check below would prove nothing).
    bare = subprocess.run(
        [sys.executable, "-c", "import tensorflow"], env=_env_as_a_user_has_it(), capture_output=True, text=True
    )
    if not CHATTER.search(bare.stderr):
        pytest.skip("this TensorFlow prints nothing at import here")

    out = tmp_path / "out"
    done = _camserve("explain", "samples/star.png", "--model", "models/shapes_gap", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert not CHATTER.search(done.stderr), done.stderr
    report = json.loads((out / "explanations.json").read_text())
    assert [r["image"] for r in report] == ["samples/star.png"]
    assert report[0]["explanations"][0]["label"] == "star"
    assert (out / report[0]["explanations"][0]["overlay"]).is_file()


def test_debug_log_level_is_accepted_and_works(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _camserve(
        "--log-level", "debug", "explain", "samples/star.png", "--model", "models/shapes_gap", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads((out / "explanations.json").read_text())) == 1


def test_user_errors_and_bugs() -> None:
    assert cli._user_error(InvalidArgument("top_k must be >= 1")) == "top_k must be >= 1"
    assert cli._user_error(NotFound("no model 'x'")) == "no model 'x'"
    assert "nope.png" in (cli._user_error(FileNotFoundError(2, "No such file or directory", "nope.png")) or "")
    for bug in (KeyError("x"), ValueError("x"), TypeError("x"), RuntimeError("x")):
        assert cli._user_error(bug) is None, bug


def test_missing_image_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["dense", str(tmp_path / "nope.png"), "--model", str(REPO / "models/shapes_fc"), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("camserve dense: error: ") and "nope.png" in err


def test_server_errors_are_user_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["models", "--server", f"127.0.0.1:{port}", "--timeout", "5"])
    assert code == 2
    assert capsys.readouterr().err.startswith("camserve models: error: UNAVAILABLE: ")
