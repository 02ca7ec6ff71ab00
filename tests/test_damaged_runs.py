"""A run directory whose newest checkpoint is damaged, through the command line: `resume`
and `run` fall back to the newest intact checkpoint (and set the damaged one aside),
`inspect` says which steps are damaged, `export` and `[init] from` read the newest intact
one; with none intact every command refuses in one line and nothing changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shardstep.checkpoints import committed_steps
from shardstep.service import cli
from shardstep.service.run_dir import INIT_FILE
from tests.runs import DIGITS_JOB, assert_same, digits_reference, final_params, snapshot

SHARD = "shard-00001-of-00002.ckpt"


def flip_a_data_byte(step_dir: Path) -> None:
    path = step_dir / SHARD
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the first weight matrix, past the header
    path.write_bytes(bytes(data))


def truncate(step_dir: Path) -> None:
    path = step_dir / SHARD
    os.truncate(path, path.stat().st_size // 2)


def delete_shard(step_dir: Path) -> None:
    (step_dir / SHARD).unlink()


def delete_manifest(step_dir: Path) -> None:
    (step_dir / "manifest.ckpt").unlink()


DAMAGES = {"flipped byte": flip_a_data_byte, "truncated shard file": truncate, "missing shard file": delete_shard,
           "missing manifest": delete_manifest}


def trained_run(tmp_path: Path, capsys) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    job = tmp_path / "job.toml"
    job.write_text(DIGITS_JOB.format(run_dir=run_dir, task="digits", steps=20, backend="inline", every=10))
    assert cli.main(["run", str(job), "--quiet"]) == 0
    capsys.readouterr()
    return run_dir, job


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:010d}"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys, damage):
    run_dir, _ = trained_run(tmp_path, capsys)
    DAMAGES[damage](step_dir(run_dir, 20))
    code, out, err = run_cli(capsys, "resume", str(run_dir), "--quiet")
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("shardstep: warning: step 20 is damaged")]
    assert len(warning) == 1, err
    assert ", resuming from step 10" in warning[0] and "set aside as step-0000000020.damaged-" in warning[0]
    assert "done: 20 steps" in out
    assert committed_steps(run_dir / "checkpoints") == [10, 20]
    aside = [p for p in (run_dir / "checkpoints").iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and (aside[0] / "set-aside-reason.txt").is_file()
    assert_same(final_params(run_dir), digits_reference(20))


@pytest.mark.parametrize("damage", DAMAGES)
def test_inspect_export_and_init_from_read_the_newest_intact_checkpoint(tmp_path, capsys, damage):
    run_dir, _ = trained_run(tmp_path, capsys)
    DAMAGES[damage](step_dir(run_dir, 20))
    before = snapshot(run_dir)

    code, out, err = run_cli(capsys, "inspect", str(run_dir))
    assert code == 0, err
    assert "step        10\n" in out and "verified    every chunk of its 2 shard file(s)" in out
    assert [line for line in out.splitlines() if line.startswith("damaged     step 20: ")], out

    exported = tmp_path / "model.ckpt"
    code, out, err = run_cli(capsys, "export", str(run_dir), "--out", str(exported))
    assert code == 0, err
    assert err.startswith("shardstep export: warning: step 20 is damaged (") and "exported step 10" in err
    assert "of step 10" in out and exported.is_file()

    tuned = tmp_path / "tuned"
    job = tmp_path / "tune.toml"
    job.write_text(DIGITS_JOB.format(run_dir=tuned, task="digits", steps=2, backend="inline", every=10)
                   + f'\n[init]\nfrom = "{run_dir}"\n')
    code, out, err = run_cli(capsys, "run", str(job), "--quiet")
    assert code == 0, err
    assert "warning: init.from: step 20 of " in err and "fine-tuning from step 10, the newest intact one" in err
    assert json.loads((tuned / INIT_FILE).read_text())["step"] == 10
    assert snapshot(run_dir) == before  # readers never change the source


@pytest.mark.parametrize("command", ["resume", "inspect", "export", "init"])
def test_with_no_intact_checkpoint_every_command_refuses_in_one_line(tmp_path, capsys, command):
    run_dir, job = trained_run(tmp_path, capsys)
    flip_a_data_byte(step_dir(run_dir, 20))
    truncate(step_dir(run_dir, 10))
    before = snapshot(run_dir)
    argv = {"resume": ["resume", str(run_dir)], "inspect": ["inspect", str(run_dir)],
            "export": ["export", str(run_dir), "--out", str(tmp_path / "model.ckpt")]}.get(command)
    if argv is None:
        tune = tmp_path / "tune.toml"
        tune.write_text(DIGITS_JOB.format(run_dir=tmp_path / "tuned", task="digits", steps=2, backend="inline",
                                          every=10) + f'\n[init]\nfrom = "{run_dir}"\n')
        argv = ["run", str(tune)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"no committed checkpoint in {run_dir / 'checkpoints'} is intact: step 20: " in err
    assert "; step 10: " in err and "Traceback" not in err
    assert snapshot(run_dir) == before
    assert not (tmp_path / "model.ckpt").exists() and not (tmp_path / "tuned" / "checkpoints").exists()


def test_inspect_of_a_damaged_step_directory_names_the_damage(tmp_path, capsys):
    run_dir, _ = trained_run(tmp_path, capsys)
    flip_a_data_byte(step_dir(run_dir, 20))
    code, out, err = run_cli(capsys, "inspect", str(step_dir(run_dir, 20)))
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("shardstep inspect: error: ") and SHARD in err
