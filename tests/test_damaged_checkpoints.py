"""Damaged run checkpoints on disk, with real files: every kind of damage (a flipped byte in a
data chunk or in a header, a truncated or deleted shard file, a deleted manifest, a re-signed
manifest naming `..` as a shard file or claiming a huge shape) met by verify, newest_intact,
set_aside then a new commit of the same step, load_shard and export, each with its exact
error kind and a message naming the file; hostile manifests refused before anything they
claim is allocated; and verify's memory staying at one checksum chunk whatever the
checkpoint's size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from shardstep.checkpoints import (
    CheckpointError,
    CheckpointStore,
    CorruptCheckpointError,
    ParamSpec,
    RunCheckpoint,
    ShardLayout,
    committed_steps,
    dump,
    load,
    newest_intact,
    open_checkpoint,
    write_shard,
)
from shardstep.checkpoints.format import CHUNK_SIZE, FileReader, checksum
from shardstep.checkpoints.run import DAMAGED, SET_ASIDE_NOTE
from tests.checkpoints import assert_identical, build_file, split_file
from tests.checkpoints.processes import commit_expected, expected_full

# "w" is 2.4 MB, so each shard's slice spans two 1 MiB checksum chunks
LAYOUT = ShardLayout((ParamSpec("w", (600_003,), "float32"), ParamSpec("b", (7, 5), "float64")), 2)
RUN = "damage"
INTACT, DAMAGED_STEP = 10, 20

pytestmark = pytest.mark.timeout(120)


def _save(root: Path, step: int, layout: ShardLayout = LAYOUT, store: CheckpointStore | None = None) -> Path:
    return commit_expected(root, step, layout, run_id=RUN, store=store)


def _step_dir(root: Path, step: int = DAMAGED_STEP) -> Path:
    return root / f"step-{step:010d}"


def _shard(root: Path, shard: int, step: int = DAMAGED_STEP) -> Path:
    return _step_dir(root, step) / f"shard-{shard:05d}-of-00002.ckpt"


def _manifest(root: Path, step: int = DAMAGED_STEP) -> Path:
    return _step_dir(root, step) / "manifest.ckpt"


def _flip(path: Path, position: int) -> None:
    """Invert one byte of a file in place."""
    with open(path, "r+b") as file:
        file.seek(position)
        byte = file.read(1)
        file.seek(position)
        file.write(bytes([byte[0] ^ 0xFF]))


def _resign(path: Path, change) -> None:
    """Edit a manifest's value and write it back as a valid file (correct checksums), so
    only the reader's consistency checks can refuse it."""
    manifest = load(path)
    change(manifest)
    dump(manifest, path)


@pytest.fixture
def run(tmp_path):
    """A run directory with an intact step 10 and a step 20 for the test to damage."""
    root = tmp_path / "run"
    _save(root, INTACT)
    _save(root, DAMAGED_STEP)
    return root


def _tile(manifest, name, bounds):
    """Give shard s the slice [bounds[s], bounds[s + 1]) of parameter ``name``."""
    for shard, record in enumerate(manifest["shards"]):
        record["slices"][name] = [bounds[shard], bounds[shard + 1]]


def _huge_shape(manifest):
    manifest["params"][0]["shape"] = [2**31, 64]  # 512 GiB of float32


def _huge_shape_and_slices(manifest):
    _huge_shape(manifest)
    _tile(manifest, "w", [0, 2**36, 2**37])


# -- the damage matrix ---------------------------------------------------------------------
# each damage: what it does to step 20, and the exact error kind and message (a regex) that
# opening and reading step 20 through RunCheckpoint must raise; newest_intact's reason is the
# same message except where a step without manifest is no checkpoint to open at all


def _flip_data(root):
    with FileReader(_shard(root, 1)) as reader:
        entry = reader.entries[0]  # param/w: 300002 float32, chunks [0, 1 MiB) and [1 MiB, end)
        assert entry.key == "param/w" and entry.length > CHUNK_SIZE
        position = entry.offset + CHUNK_SIZE + 12_345
    _flip(_shard(root, 1), position)
    return CorruptCheckpointError, (re.escape(f"{_shard(root, 1)}: checksum mismatch in tensor 'param/w', bytes "
                                              f"{CHUNK_SIZE}..{300_002 * 4}; the data is damaged"))


def _flip_header(root):
    _flip(_shard(root, 0), 24 + 40)  # inside the msgpack header, past the 24-byte preamble
    return CorruptCheckpointError, re.escape(f"{_shard(root, 0)}: header checksum mismatch; the header is damaged")


def _truncate(root):
    path = _shard(root, 1)
    os.truncate(path, path.stat().st_size - 1000)
    return CorruptCheckpointError, (re.escape(f"{path}: tensor ") + r"'state/w/exp_avg_sq': bytes \d+\.\.\d+ run past "
                                    r"the end of the \d+-byte file; truncated or damaged")


def _delete_shard(root):
    path = _shard(root, 1)
    size = path.stat().st_size
    path.unlink()
    return CorruptCheckpointError, re.escape(f"{path}: missing; the manifest lists it as shard 1 of 2, {size} bytes")


def _delete_manifest(root):
    _manifest(root).unlink()
    return CheckpointError, re.escape(f"cannot open checkpoint {_manifest(root)}: No such file or directory")


def _name_parent_directory(root):
    _resign(_manifest(root), lambda m: m["shards"][1].update(file=".."))
    return CorruptCheckpointError, re.escape(
        f"{_manifest(root)}: shard 1's file is '..'; the only names allowed are 'shard-00001-of-00002.ckpt' "
        "and attempt-<12 hex digits>/shard-00001-of-00002.ckpt")


def _claim_huge_shape(root):
    """shape [2**31, 64] (512 GiB of float32) with slices re-tiled to match it, checksums valid."""
    size = _shard(root, 0).stat().st_size
    _resign(_manifest(root), _huge_shape_and_slices)
    return CorruptCheckpointError, re.escape(
        f"{_manifest(root)}: parameter 'w' (shape [2147483648, 64], float32) needs {2**38} bytes for shard 0's "
        f"elements [0, {2**36}), {2**38} with the shard's arrays before it; the manifest records its file "
        f"shard-00000-of-00002.ckpt as {size} bytes")


DAMAGES = {
    "flipped data byte": _flip_data,
    "flipped header byte": _flip_header,
    "truncated shard file": _truncate,
    "missing shard file": _delete_shard,
    "missing manifest": _delete_manifest,
    "manifest naming ..": _name_parent_directory,
    "huge claimed shape": _claim_huge_shape,
}
COMMITTED_DAMAGES = [name for name in DAMAGES if name != "missing manifest"]


def _verify(directory):
    with RunCheckpoint(directory) as checkpoint:
        checkpoint.verify()


def _load_shard(directory):
    with RunCheckpoint(directory) as checkpoint:
        checkpoint.load_shard(0, 1)  # one shard holding everything: every chunk is read


def _export(directory):
    with RunCheckpoint(directory) as checkpoint:
        checkpoint.export()


@pytest.mark.parametrize("operation", [_verify, _load_shard, _export], ids=["verify", "load_shard", "export"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_each_damage_is_refused_with_its_kind_and_a_message_naming_the_file(run, damage, operation):
    error_type, message = DAMAGES[damage](run)
    with pytest.raises(CheckpointError) as caught:
        operation(_step_dir(run))
    assert type(caught.value) is error_type, f"{type(caught.value).__name__}: {caught.value}"
    text = str(caught.value)
    assert re.fullmatch(message, text), text
    assert "\n" not in text
    # the intact step is untouched by its neighbour's damage
    operation(_step_dir(run, INTACT))


@pytest.mark.parametrize("damage", DAMAGES)
def test_newest_intact_passes_over_the_damaged_step_and_says_why(run, damage):
    assert newest_intact(run) == (DAMAGED_STEP, [])
    _, message = DAMAGES[damage](run)
    if damage == "missing manifest":
        message = re.escape(f"{_step_dir(run)}: no manifest.ckpt, so not a committed checkpoint "
                            "(its manifest was deleted or never written)")
    step, damaged = newest_intact(run)
    assert step == INTACT
    assert [s for s, _ in damaged] == [DAMAGED_STEP]
    reason = damaged[0][1]
    assert re.fullmatch(message, reason) and "\n" not in reason, reason


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_set_aside_step_is_kept_ignored_and_committed_again(run, damage):
    DAMAGES[damage](run)
    damaged_dir = _step_dir(run)
    before = {path.name: path.read_bytes() for path in damaged_dir.iterdir()}
    _, reasons = newest_intact(run)
    with CheckpointStore(run, run_id=RUN) as store:
        if damage in COMMITTED_DAMAGES:
            # a damaged manifest-holding step is still a commit: only set_aside frees the step
            with pytest.raises(CheckpointError, match=f"step {DAMAGED_STEP} is already committed in "):
                store.begin(DAMAGED_STEP, LAYOUT)
        aside = store.set_aside(DAMAGED_STEP, reasons[0][1])
        assert aside.parent == run and DAMAGED.fullmatch(aside.name), aside
        assert aside.name.startswith(f"{damaged_dir.name}.damaged-")
        assert not os.path.lexists(damaged_dir)
        assert committed_steps(run) == [INTACT] and newest_intact(run) == (INTACT, [])
        _save(run, DAMAGED_STEP, store=store)
    # a new store (whose cleanup removes pending and deleting leftovers) keeps it, unchanged
    with CheckpointStore(run, run_id=RUN) as store:
        assert store.cleanup() == []
    kept = {path.name: path.read_bytes() for path in aside.iterdir()}
    note = kept.pop(SET_ASIDE_NOTE).decode()
    assert kept == before
    assert re.fullmatch(rf"{damaged_dir.name} set aside at \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ: .+\n", note), note
    assert reasons[0][1] in note
    assert committed_steps(run) == [INTACT, DAMAGED_STEP]
    assert newest_intact(run) == (DAMAGED_STEP, [])
    with open_checkpoint(run) as checkpoint:
        checkpoint.verify()
        params, state_dict = checkpoint.export()
    full_params, full_state = expected_full(LAYOUT, DAMAGED_STEP)
    assert_identical(full_params, params)
    assert_identical({i: full_state[s.name] for i, s in enumerate(LAYOUT.params)}, state_dict["state"])


# -- a step directory without a manifest does not block its step -------------------------------

def test_commit_sets_aside_a_step_directory_left_without_a_manifest(run):
    """A resumed run saving step 20 again, after step 20's manifest was deleted, commits
    instead of failing forever with "step 20 is already committed"; the old files are kept."""
    old_shard = _shard(run, 0).read_bytes()
    _manifest(run).unlink()
    assert committed_steps(run) == [INTACT]
    path = _save(run, DAMAGED_STEP)
    assert path == _step_dir(run) and committed_steps(run) == [INTACT, DAMAGED_STEP]
    [aside] = [p for p in run.iterdir() if DAMAGED.fullmatch(p.name)]
    assert (aside / "shard-00000-of-00002.ckpt").read_bytes() == old_shard
    note = (aside / SET_ASIDE_NOTE).read_text()
    assert f"the commit of step {DAMAGED_STEP} found it without manifest.ckpt" in note
    with open_checkpoint(run, DAMAGED_STEP) as checkpoint:
        checkpoint.verify()


def test_commit_still_refuses_a_step_whose_manifest_exists(run):
    _flip(_manifest(run), 30)  # damaged, but a manifest: the user decides with set_aside
    with CheckpointStore(run, run_id=RUN) as store, pytest.raises(
            CheckpointError, match=f"step {DAMAGED_STEP} is already committed"):
        store.begin(DAMAGED_STEP, LAYOUT)
    assert sorted(p.name for p in run.iterdir()) == [".writer.lock", _step_dir(run, INTACT).name, _step_dir(run).name]


def test_set_aside_refuses_what_is_not_there_and_an_empty_reason(run):
    with CheckpointStore(run, run_id=RUN) as store:
        with pytest.raises(CheckpointError, match=r"cannot set aside step 30: .*step-0000000030 does not exist"):
            store.set_aside(30, "gone")
        with pytest.raises(ValueError, match="reason must be a non-empty str; got ' '"):
            store.set_aside(DAMAGED_STEP, " ")
        with pytest.raises(ValueError, match="step must be a non-negative int; got -1"):
            store.set_aside(-1, "negative")
    assert committed_steps(run) == [INTACT, DAMAGED_STEP]


# -- newest_intact over several steps -------------------------------------------------------

def test_newest_intact_reports_every_newer_damaged_step_newest_first(run):
    _save(run, 30)
    _save(run, 40)
    _flip_data(run)                       # step 20: damaged, but older than the intact 30
    _flip(_shard(run, 0, 40), 24 + 40)    # step 40: header damaged
    (run / "step-0000000050").mkdir()     # step 50: a directory that never got a manifest
    step, damaged = newest_intact(run)
    assert step == 30
    assert [s for s, _ in damaged] == [50, 40]
    assert damaged[0][1].startswith(f"{_step_dir(run, 50)}: no manifest.ckpt")
    assert damaged[1][1] == f"{_shard(run, 0, 40)}: header checksum mismatch; the header is damaged"


def test_newest_intact_when_nothing_is_intact(run, tmp_path):
    assert newest_intact(tmp_path / "never-written") == (None, [])
    _flip_header(run)
    _shard(run, 1, INTACT).unlink()
    step, damaged = newest_intact(run)
    assert step is None and [s for s, _ in damaged] == [DAMAGED_STEP, INTACT]
    assert damaged[1][1].startswith(f"{_shard(run, 1, INTACT)}: missing; ")


def test_newest_intact_refuses_a_manifest_copied_into_another_step(run):
    _manifest(run).write_bytes(_manifest(run, INTACT).read_bytes())
    _, damaged = newest_intact(run)
    reason = f"{_manifest(run)}: is the manifest of step {INTACT}; this directory holds step {DAMAGED_STEP}"
    assert damaged == [(DAMAGED_STEP, reason)]


# -- shard file names -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "/etc/passwd", "", "../step-0000000010/shard-00001-of-00002.ckpt",
                                  "shard-00000-of-00002.ckpt", "shard-1-of-2.ckpt", "manifest.ckpt", 7,
                                  "attempt-0123456789ab/../shard-00001-of-00002.ckpt",
                                  "attempt-0123456789a/shard-00001-of-00002.ckpt",
                                  "/attempt-0123456789ab/shard-00001-of-00002.ckpt",
                                  "attempt-0123456789ab/shard-00000-of-00002.ckpt"])
def test_a_manifest_may_name_only_the_layouts_shard_files(run, name):
    _resign(_manifest(run), lambda m: m["shards"][1].update(file=name))
    with pytest.raises(CorruptCheckpointError) as caught:
        RunCheckpoint(_step_dir(run))
    assert str(caught.value) == (f"{_manifest(run)}: shard 1's file is {name!r}; the only names allowed are "
                                 "'shard-00001-of-00002.ckpt' and attempt-<12 hex digits>/shard-00001-of-00002.ckpt")


def test_a_shard_file_replaced_by_a_directory_is_damage(run):
    _shard(run, 1).unlink()
    _shard(run, 1).mkdir()
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{_shard(run, 1)}: not a regular file; the manifest "
                                                               "lists it as shard 1 of 2")):
        _verify(_step_dir(run))


def test_verify_checks_the_bytes_of_bool_arrays(tmp_path):
    """A bool byte of 2 with its chunk checksum, the file's header checksum and the manifest
    all re-sealed: only the bool check can see it, and verify reads every byte."""
    layout = ShardLayout((ParamSpec("mask", (5000,), "bool"),), 1)
    with CheckpointStore(tmp_path, run_id=RUN) as store:
        pending = store.begin(1, layout)
        write_shard(pending, 0, {"mask": np.arange(5000) % 3 == 0})
        store.commit(pending)
    shard = tmp_path / "step-0000000001" / "shard-00000-of-00001.ckpt"
    header, data, _ = split_file(shard.read_bytes())
    [entry] = header["tensors"]
    data = bytearray(data)
    data[4321] = 2
    entry["checksums"] = checksum(bytes(data[:entry["length"]])).to_bytes(8, "little")
    shard.write_bytes(build_file(header, bytes(data)))
    with FileReader(shard) as reader:
        resealed = reader.header_checksum
    _resign(tmp_path / "step-0000000001" / "manifest.ckpt", lambda m: m["shards"][0].update(header_checksum=resealed))
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{shard}: bool tensor 'param/mask' holds bytes "
                                                               "other than 0 and 1")):
        open_checkpoint(tmp_path).verify()


# -- hostile manifests: refused before anything they claim is allocated -----------------------

def _huge_shape_slices_and_sizes(manifest):
    _huge_shape_and_slices(manifest)
    for record in manifest["shards"]:
        record["size"] = 2**40


def _edit(path, value):
    """An edit setting manifest[path[0]][path[1]]... to value."""
    def change(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


# name: (edit, when it is refused: "open" from the manifest alone, "read" from a shard file's
# header before any allocation, the message)
HOSTILE = {
    # the shape alone: its slices no longer cover it
    "huge shape": (_huge_shape, "open", (
        r"the slices of 'w' cover \[0, 600003\); its shape \[2147483648, 64\] has 137438953472 elements")),
    # shape and slices: more array bytes than the shard files hold
    "huge shape and slices": (_huge_shape_and_slices, "open", (
        r"parameter 'w' \(shape \[2147483648, 64\], float32\) needs 274877906944 bytes for shard 0's elements "
        r"\[0, 68719476736\), 274877906944 with the shard's arrays before it; the manifest records its file "
        r"shard-00000-of-00002.ckpt as \d+ bytes")),
    # and the recorded file sizes too: the real files disagree, found before any allocation
    "huge shape, slices and sizes": (_huge_shape_slices_and_sizes, "read", (
        r"shard-00000-of-00002.ckpt: size \d+ / header checksum 0x[0-9a-f]+ differ from the manifest's "
        r"1099511627776 / 0x[0-9a-f]+; the file was replaced or damaged")),
    # slices that tile the parameter, but not as the files hold it
    "shifted slices": (lambda m: _tile(m, "w", [0, 300_000, 600_003]), "read", (
        r"shard-00000-of-00002.ckpt: parameter 'w' is float32\[300001\]; the manifest of .*step-0000000020 says "
        r"float32\[300000\] \(shard 0's elements \[0, 300000\)\)")),
    "other dtype": (_edit(("params", 1, "dtype"), "float32"), "read", (
        r"shard-00000-of-00002.ckpt: parameter 'b' is float64\[15\]; the manifest of .*step-0000000020 says "
        r"float32\[15\] \(shard 0's elements \[0, 15\)\)")),
    "other state dtype": (_edit(("state", "w", "exp_avg_sq", "per_element"), "float16"), "read", (
        r"shard-00000-of-00002.ckpt: state 'exp_avg_sq' of parameter 'w' is float32\[300001\]; the manifest of .* "
        r"says float16\[300001\]")),
    # (on the small parameter: the few bytes it claims fit in the files' header and padding)
    "state the files lack": (_edit(("state", "b", "extra"), {"per_element": "float32"}), "read", (
        r"shard-00000-of-00002.ckpt: the state of parameter 'b' holds \['step', 'exp_avg', 'exp_avg_sq'\]; the "
        r"manifest of .* lists \['step', 'exp_avg', 'exp_avg_sq', 'extra'\]")),
    "negative dimension": (_edit(("params", 1, "shape"), [7, -5]), "open", (
        r"parameter 'b': shape \[7, -5\] must be a list of at most 64 non-negative ints")),
    "bool dimension": (_edit(("params", 1, "shape"), [True, 35]), "open", (
        r"parameter 'b': shape \[True, 35\] must be a list of at most 64 non-negative ints")),
    "unknown dtype": (_edit(("params", 1, "dtype"), "float128"), "open", (
        r"parameter 'b': dtype 'float128' is unknown; allowed: bool, int8, .*complex128")),
    "unhashable dtype": (_edit(("params", 1, "dtype"), ["float32"]), "open", (
        r"parameter 'b': dtype \['float32'\] is unknown; allowed: bool, ")),
    "unknown state dtype": (_edit(("state", "b", "exp_avg", "per_element"), "bfloat16"), "open", (
        r"state schema of 'b'/'exp_avg' is \{'per_element': 'bfloat16'\}; expected \{'value': v\} or "
        r"\{'per_element': dtype\} with dtype one of bool, ")),
    "slice past the end": (_edit(("shards", 1, "slices", "b", 1), 36), "open", (
        r"the slices of 'b' cover \[0, 36\); its shape \[7, 5\] has 35 elements")),
    "overlapping slices": (_edit(("shards", 1, "slices", "b", 0), 10), "open", (
        r"shard 1's slice of 'b' is \[10, 35\]; slices must tile \[0, 35\) in shard order, so this one is "
        r"\[15, stop\) with stop >= 15")),
    "negative size": (_edit(("shards", 0, "size"), -1), "open", (
        r"shard 0's size -1 and header checksum \d+ must be non-negative ints")),
}


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_manifests_are_refused_before_any_allocation(run, hostile):
    change, when, message = HOSTILE[hostile]
    _resign(_manifest(run), change)
    tracemalloc.start()
    try:
        for operation in (_load_shard, _export, _verify):
            with pytest.raises(CorruptCheckpointError) as caught:
                operation(_step_dir(run))
            text = str(caught.value)
            assert re.search(message, text) and "\n" not in text, text
            if when == "open":
                assert text.startswith(f"{_manifest(run)}: "), text
            else:
                assert text.startswith(str(_step_dir(run) / "shard-0000")), text
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the shard slices are 1.2 MB each: refusing must not even allocate one of them
    assert peak < 1 << 20, f"peak {peak} bytes while refusing a manifest"


# -- verify's memory ---------------------------------------------------------------------------

_MEASURE = textwrap.dedent("""
    import json, sys
    from shardstep.checkpoints import RunCheckpoint

    def status(field):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024

    def read_bytes():
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    def peak_during(action):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
        before, read = status("VmRSS"), read_bytes()
        action()
        return status("VmHWM") - before, read_bytes() - read

    with RunCheckpoint(sys.argv[1]) as checkpoint:
        verify = peak_during(checkpoint.verify)
        load = peak_during(lambda: checkpoint.load_shard(0, 1))
    print(json.dumps({"verify": verify, "load": load}))
""")


@pytest.mark.timeout(300)
def test_verify_of_a_large_checkpoint_keeps_memory_at_a_chunk(tmp_path):
    """A 300 MB checkpoint verified in a fresh process: every byte is read, the peak resident
    size grows by less than a chunk plus a few MiB. Loading it in the same process, measured
    the same way, grows it by the whole checkpoint: the measure sees such allocations."""
    numel = 75_000_000
    layout = ShardLayout((ParamSpec("w", (numel,), "float32"),), 2)
    with CheckpointStore(tmp_path, run_id=RUN) as store:
        pending = store.begin(1, layout)
        for shard in range(2):
            start, stop = layout.slice("w", shard)
            write_shard(pending, shard, {"w": np.arange(start, stop, dtype=np.float32)})
        store.commit(pending)
    directory = tmp_path / "step-0000000001"
    size = numel * 4
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(directory)], capture_output=True, text=True,
                            timeout=240, cwd=Path(__file__).resolve().parents[1], check=False)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    (verify_growth, verify_read), (load_growth, _) = measured["verify"], measured["load"]
    assert verify_read >= size, f"verify read {verify_read} bytes of a {size}-byte checkpoint"
    assert verify_growth < CHUNK_SIZE + (4 << 20), f"verify grew the peak RSS by {verify_growth / 2**20:.1f} MiB"
    assert load_growth > size * 0.9, f"loading grew it by only {load_growth / 2**20:.1f} MiB: the measure is blind"
    # and what verify reads is every byte: the last one of the last chunk, flipped, is found
    last = directory / "shard-00001-of-00002.ckpt"
    _flip(last, last.stat().st_size - 1)
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"{last}: checksum mismatch in tensor 'param/w', bytes ")):
        _verify(directory)
