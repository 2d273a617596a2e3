"""The ``resilient`` command line: help, and the demo run as CI runs it (no terminal)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from resilient.cli import main


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "bench", "availability"):
        assert command in out


def test_an_unknown_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["juggle"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--duration", "0", "--duration must be a finite number > 0, got 0"),
        ("--duration", "nan", "--duration must be a finite number > 0, got nan"),  # ran forever
        ("--rate", "nan", "--rate must be a finite number > 0, got nan"),  # no throttle at all
        ("--base-port", "65534", "--base-port must be in 1..65533"),  # was a traceback
        ("--base-port", "0", "--base-port must be in 1..65533"),
    ],
)
def test_demo_bad_options_are_clear_errors(
    capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    assert main(["demo", option, value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_demo_without_a_terminal_prints_the_story_and_a_summary() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "resilient.cli", "demo", "--duration", "20", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for event in ("crashes (SIGKILL)", "turns gray", "freezes (SIGSTOP)", "all recover"):
        assert event in out
    rows = {
        m.group(1).strip(): float(m.group(2))
        for m in re.finditer(
            r"^(plain httpx \(round-robin\)|httpx \+ rs\.ResilientTransport)"
            r"\s+\d+\s+([\d.]+)",
            out,
            re.MULTILINE,
        )
    }
    assert rows["httpx + rs.ResilientTransport"] >= 99.9
    assert rows["plain httpx (round-robin)"] < 99.0  # visibly lower
    assert "requests the replicas saw" in out


def test_demo_names_a_taken_port(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["demo", "--duration", "1", "--base-port", str(port)]) == 2
    err = capsys.readouterr().err
    assert str(port) in err
    assert "--base-port" in err
