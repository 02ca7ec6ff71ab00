"""Every exit code docs/cli.md documents is the one the command returns: each example of its
table runs as a real `shardstep` process, in the table's order, in a copy of examples/; a
code-2 example prints its error without a traceback and writes nothing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (\d+) \| (.+?) \| `(shardstep [^`]+)`(, then Ctrl-C)? \|$", re.MULTILINE)
RUN_SECONDS = 180


def documented() -> list[tuple[int, str, str, bool]]:
    rows = [(int(code), when, command, bool(ctrl_c))
            for code, when, command, ctrl_c in ROW.findall((REPOSITORY / "docs" / "cli.md").read_text())]
    assert {code for code, *_ in rows} == {0, 1, 2, 130}, rows
    return rows


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in root.rglob("*") if path.is_file()}


def command_line(command: str) -> list[str]:
    words = command.split()
    assert words[0] == "shardstep"
    return [sys.executable, "-m", "shardstep.service.cli", *words[1:]]


def test_every_documented_exit_code_is_the_one_returned(tmp_path):
    shutil.copytree(REPOSITORY / "examples", tmp_path / "examples")
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    for code, when, command, ctrl_c in documented():
        before = tree(tmp_path)
        if ctrl_c:
            process = subprocess.Popen(command_line(command), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
            log = tmp_path / "runs" / "interrupted" / "metrics.jsonl"
            deadline = time.monotonic() + RUN_SECONDS
            while not (log.exists() and log.stat().st_size) and process.poll() is None:
                assert time.monotonic() < deadline, f"{command}: no step within {RUN_SECONDS} s"
                time.sleep(0.1)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=RUN_SECONDS)
            returned = process.returncode
        else:
            done = subprocess.run(command_line(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=RUN_SECONDS, stdin=subprocess.DEVNULL)
            out, err, returned = done.stdout, done.stderr, done.returncode
        assert returned == code, f"{command} ({when}): exit {returned}, documented {code}\n{out}\n{err}"
        assert "Traceback" not in err, f"{command}: {err}"
        if code == 2:
            lines = err.strip().splitlines()
            assert re.match(r"shardstep( \w+)*: error: ", lines[-1]), f"{command}: {err}"
            assert tree(tmp_path) == before, f"{command} wrote files"
        if code == 130:
            resumed = tmp_path / "runs" / "interrupted"
            assert f"interrupted; committed checkpoints are kept (continue with `shardstep resume {resumed}`)" in err, err
