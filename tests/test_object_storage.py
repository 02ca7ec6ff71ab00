"""Run checkpoints on object storage, against a real S3-compatible server on loopback (moto's,
started by the tests): the writer's lease, two writers racing for one step, the server going
away in the middle of a checkpoint, the bytes a resharded load fetches, damage and set-aside,
asynchronous saves. The run-checkpoint tests that hold on disk and on object storage alike
(round trips, N -> M resharding, retention, export, SIGKILL trials) are parametrized over
both in test_checkpoint_run.py and test_checkpoint_crash.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import msgpack
import pytest

from shardstep.checkpoints import (
    AsyncSaver,
    CheckpointError,
    CheckpointStore,
    CorruptCheckpointError,
    ParamSpec,
    ShardLayout,
    committed_steps,
    latest_step,
    newest_intact,
    open_checkpoint,
    write_shard,
)
from shardstep.checkpoints.object_store import LEASE
from shardstep.checkpoints.storage import ObjectPath, put_object
from tests.checkpoints import assert_identical
from tests.checkpoints.processes import commit_expected, expected_full, expected_shard, leftovers
from tests.objectstore import BUCKET

SPECS = (ParamSpec("w", (300_001,), "float32"), ParamSpec("b", (7,), "float64"))


@pytest.fixture
def url(s3_server):
    return ObjectPath(f"s3://{BUCKET}/runs/{uuid.uuid4().hex}")


def _bucket_keys(s3_server, url):
    return {key[len(url.key) + 1:]: size for key, size in s3_server.objects(url.key + "/").items()}


def _export_equals(url, step, layout):
    with open_checkpoint(url, step) as checkpoint:
        params, state_dict = checkpoint.export()
    full_params, full_state = expected_full(layout, step)
    assert_identical(full_params, params)
    assert_identical({i: full_state[s.name] for i, s in enumerate(layout.params)}, state_dict["state"])


# -- what is stored ---------------------------------------------------------------------------

def test_a_commit_stores_shard_files_under_an_attempt_then_the_manifest(s3_server, url):
    layout = ShardLayout(SPECS, 2)
    with CheckpointStore(url, run_id="run") as store:
        pending = store.begin(3, layout)
        assert _bucket_keys(s3_server, url).keys() == {LEASE}  # begin writes nothing
        for shard in range(2):
            write_shard(pending, shard, *expected_shard(layout, shard, 3))
        attempt = ObjectPath(pending.directory).name
        assert committed_steps(url) == []  # shard files without a manifest are not a checkpoint
        store.commit(pending)
        keys = _bucket_keys(s3_server, url)
    assert sorted(keys) == [LEASE] + [f"step-0000000003/{attempt}/shard-0000{s}-of-00002.ckpt"
                                      for s in range(2)] + ["step-0000000003/manifest.ckpt"]
    assert LEASE not in _bucket_keys(s3_server, url)  # released on close
    _export_equals(url, 3, layout)


# -- one writer per run -------------------------------------------------------------------------

def test_a_second_live_writer_is_refused_with_who_holds_the_run(url):
    with CheckpointStore(url, run_id="run"):
        with pytest.raises(CheckpointError, match=(
                rf"{url} is being written by another writer \(run 'run', host '.+', pid {os.getpid()}\); one "
                r"writer per run. Its lease runs \d+ s more: if that writer is gone, try again after that")):
            CheckpointStore(url, run_id="run")
    with CheckpointStore(url, run_id="run"):  # released: the next writer gets it at once
        pass


def test_a_crashed_writers_lease_is_taken_over(url):
    """A writer process of this host that died (SIGKILL) is taken over at once; one on another
    host only once its lease expired."""
    code = ("import sys, time; from shardstep.checkpoints import CheckpointStore; "
            "CheckpointStore(sys.argv[1], run_id='run'); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(url)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(CheckpointError, match=f"pid {holder.pid}"):
            CheckpointStore(url, run_id="run")
    finally:
        holder.kill()
        holder.wait(30)
    with CheckpointStore(url, run_id="run"):
        pass
    # a lease of a writer elsewhere, as that writer stores it, running one second more
    record = {"owner": "elsewhere", "run_id": "run", "host": "another-host", "pid": 1, "expires": time.time() + 1.0}
    put_object(url / LEASE, [msgpack.packb(record)])
    with pytest.raises(CheckpointError, match="host 'another-host', pid 1"):
        CheckpointStore(url, run_id="run")
    time.sleep(1.2)
    with CheckpointStore(url, run_id="run"):
        pass


def test_two_writers_racing_for_one_step_exactly_one_commits(s3_server, url):
    """Split brain (the lease object deleted under a live writer, so a second one starts):
    both write step 5 and commit at the same moment, five times over; each time exactly one
    commit lands, the other is told and its attempt is gone, and the checkpoint is the
    winner's, bit for bit."""
    layout = ShardLayout(SPECS, 2)
    first = CheckpointStore(url, run_id="run")
    (url / LEASE).delete()
    second = CheckpointStore(url, run_id="run")
    try:
        for round_ in range(5):
            step = 5 + round_
            pendings = [store.begin(step, layout) for store in (first, second)]
            # the writers save different values (of steps `step` and `step + 100`)
            for pending, values in zip(pendings, (step, step + 100)):
                for shard in range(2):
                    write_shard(pending, shard, *expected_shard(layout, shard, values))
            barrier, outcomes = threading.Barrier(2), {}

            def commit(index, store, pending):
                barrier.wait()
                try:
                    store.commit(pending)
                    outcomes[index] = "committed"
                except CheckpointError as error:
                    outcomes[index] = str(error)

            threads = [threading.Thread(target=commit, args=(i, s, p))
                       for i, (s, p) in enumerate(zip((first, second), pendings))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert sorted(outcomes) == [0, 1] and list(outcomes.values()).count("committed") == 1, outcomes
            winner = [i for i, outcome in outcomes.items() if outcome == "committed"][0]
            loser = outcomes[1 - winner]
            assert loser in (
                f"step {step} of {url} was committed meanwhile by another writer; this writer's attempt was "
                "discarded (one writer per run)", f"step {step} is already committed in {url}"), loser
            with open_checkpoint(url, step) as checkpoint:
                got = checkpoint.load_shard(0, 1)
            expected = expected_shard(ShardLayout(SPECS, 1), 0, step + 100 * winner)
            assert_identical(dict(zip(("params", "state"), expected)), got)
            loser_attempt = ObjectPath(pendings[1 - winner].directory).name
            if outcomes[1 - winner].startswith(f"step {step} of"):
                assert not [k for k in _bucket_keys(s3_server, url) if loser_attempt in k]
    finally:
        first.close()
        second.close()


# -- the server goes away -----------------------------------------------------------------------

def test_the_server_stopped_inside_a_checkpoint(s3_server, url):
    """After one shard file of step 2, the server is gone: the next shard's write fails with a
    CheckpointError naming the object, within the bounded retries; step 1 stays the latest
    and loads bit-identically once the server is back; the writer then saves step 2 as if
    nothing happened, and the leftover of the cut attempt is removed by the next writer."""
    layout = ShardLayout(SPECS, 2)
    store = CheckpointStore(url, run_id="run")
    commit_expected(url, 1, layout, store=store)
    pending = store.begin(2, layout)
    write_shard(pending, 0, *expected_shard(layout, 0, 2))
    s3_server.relay.cut()
    try:
        started = time.monotonic()
        with pytest.raises(CheckpointError, match=rf"cannot write {pending.shard_path(1)}: "):
            write_shard(pending, 1, *expected_shard(layout, 1, 2))
        assert time.monotonic() - started < 30
        with pytest.raises(CheckpointError, match=f"cannot (list|look up) {url}"):
            latest_step(url)
    finally:
        s3_server.relay.restore()
    assert latest_step(url) == 1
    _export_equals(url, 1, layout)
    write_shard(pending, 1, *expected_shard(layout, 1, 2))
    store.commit(pending)
    _export_equals(url, 2, layout)
    cut = store.begin(3, layout)
    write_shard(cut, 0, *expected_shard(layout, 0, 3))
    store._pending.clear()  # as if this writer died here
    store.close()
    assert leftovers(url) == [f"step-0000000003/{ObjectPath(cut.directory).name}/shard-00000-of-00002.ckpt"]
    with CheckpointStore(url, run_id="run") as reopened:
        assert leftovers(url) == [] and reopened.latest() == 2


def test_a_commit_while_the_server_is_gone_fails_and_changes_nothing(s3_server, url):
    layout = ShardLayout(SPECS, 1)
    with CheckpointStore(url, run_id="run") as store:
        commit_expected(url, 1, layout, store=store)
        pending = store.begin(2, layout)
        write_shard(pending, 0, *expected_shard(layout, 0, 2))
        s3_server.relay.cut()
        try:
            with pytest.raises(CheckpointError, match=f"cannot (look up|read|write) {url}/step-0000000002"):
                store.commit(pending)
        finally:
            s3_server.relay.restore()
        assert committed_steps(url) == [1]
        store.commit(pending)
        assert committed_steps(url) == [1, 2]


# -- reads ----------------------------------------------------------------------------------------

def test_a_new_shard_fetches_only_its_byte_ranges(s3_server, url):
    """Counted on the wire (what the server sent through the relay): loading 1 of 8 shards
    fetches its eighth of every array plus at most one checksum chunk (1 MiB) at each end of
    each range and a few KiB of HTTP, not the checkpoint."""
    layout = ShardLayout((ParamSpec("w", (4_000_000,), "float32"),), 1)
    commit_expected(url, 1, layout)
    with open_checkpoint(url) as checkpoint:
        checkpoint.load_shard(0, 1)  # opens the file and reads its header once
        before = s3_server.relay.bytes_down
        checkpoint.load_shard(3, 8)
        used = s3_server.relay.bytes_down - before
    share = 3 * 4_000_000 * 4 // 8  # param, exp_avg, exp_avg_sq
    assert share <= used <= share + 3 * 2 * (1 << 20) + 64 * 1024, used


def test_damage_on_object_storage_is_detected_and_set_aside(s3_server, url):
    """One flipped byte in a stored shard file: loading names the object, newest_intact goes
    back to the older step, set_aside moves the step (with its reason) under
    step-<k>.damaged-<token>/, and step k can be committed again."""
    import boto3

    layout = ShardLayout(SPECS, 2)
    commit_expected(url, 1, layout)
    commit_expected(url, 2, layout)
    with open_checkpoint(url, 2) as checkpoint:
        shard_key = (checkpoint.directory / checkpoint._manifest["shards"][1]["file"]).key
    client = boto3.client("s3")
    data = bytearray(client.get_object(Bucket=BUCKET, Key=shard_key)["Body"].read())
    data[-1] ^= 1
    client.put_object(Bucket=BUCKET, Key=shard_key, Body=bytes(data))
    with pytest.raises(CorruptCheckpointError, match=rf"s3://{BUCKET}/{shard_key}: checksum mismatch in tensor"):
        open_checkpoint(url, 2).export()
    step, damaged = newest_intact(url)
    assert step == 1 and [s for s, _ in damaged] == [2]
    with CheckpointStore(url, run_id="run") as store:
        aside = store.set_aside(2, damaged[0][1])
        assert committed_steps(url) == [1]
        keys = _bucket_keys(s3_server, url)
        assert not [k for k in keys if k.startswith("step-0000000002/")]
        moved = sorted(k[len(aside.name) + 1:] for k in keys if k.startswith(aside.name + "/"))
        assert moved[0].startswith("attempt-") and moved[-2:] == ["manifest.ckpt", "set-aside-reason.txt"]
        note = client.get_object(Bucket=BUCKET, Key=f"{aside.key}/set-aside-reason.txt")["Body"].read().decode()
        assert "checksum mismatch" in note
        commit_expected(url, 2, layout, store=store)
        assert store.cleanup() == []  # the set-aside step is neither a leftover nor committed
    _export_equals(url, 2, layout)


@pytest.mark.parametrize(("where", "message"), [
    ("last byte", "checksum mismatch in tensor"), ("padding", "nonzero byte in the padding before"),
    ("header", "header checksum"),
])
def test_every_kind_of_damage_to_a_stored_shard_file_is_found(url, tmp_path, where, message):
    import boto3

    from shardstep.checkpoints.format import FileReader

    layout = ShardLayout(SPECS, 2)
    commit_expected(url, 1, layout)
    with open_checkpoint(url, 1) as checkpoint:
        shard_key = (checkpoint.directory / checkpoint._manifest["shards"][0]["file"]).key
    client = boto3.client("s3")
    data = bytearray(client.get_object(Bucket=BUCKET, Key=shard_key)["Body"].read())
    (tmp_path / "copy.ckpt").write_bytes(data)
    with FileReader(tmp_path / "copy.ckpt") as reader:  # where the padding between tensors is
        ends = [entry.offset + entry.length for entry in reader.entries]
        padding = next(end for end, entry in zip(ends, reader.entries[1:]) if entry.offset > end)
    data[{"last byte": -1, "padding": padding, "header": 40}[where]] ^= 1
    client.put_object(Bucket=BUCKET, Key=shard_key, Body=bytes(data))
    with pytest.raises(CorruptCheckpointError, match=message):
        with open_checkpoint(url, 1) as checkpoint:
            checkpoint.load_shard(0, 1)


def test_asynchronous_shard_saves_to_object_storage(url):
    layout = ShardLayout(SPECS, 2)
    with CheckpointStore(url, run_id="run") as store, AsyncSaver() as saver:
        pending = store.begin(4, layout)
        for shard in range(2):
            params, state = expected_shard(layout, shard, 4)
            saver.write_shard(pending, shard, params, state)
            for array in list(params.values()):
                array += 1  # the save went on with its own copy
            saver.wait()
        store.commit(pending)
    _export_equals(url, 4, layout)


def test_urls_that_are_not_object_stores_are_refused():
    with pytest.raises(CheckpointError, match=r"http://host/run: the http:// scheme is not an object store"):
        CheckpointStore("http://host/run", run_id="run")
    with pytest.raises(CheckpointError, match=r"s3://bucket/a/../b: expected s3://BUCKET/PREFIX with no"):
        latest_step("s3://bucket/a/../b")


def test_an_aws_profile_from_the_shared_files_gives_keys_region_and_endpoint(s3_server, tmp_path):
    """No AWS_* key, region or endpoint in the environment: a writer in a process of its own
    takes them from the profile AWS_PROFILE names in the AWS files, as every AWS tool does.
    The relay sees requests signed with the profile's key (its id is in the Authorization
    header of plain HTTP), so the endpoint came from the file too."""
    from tests.objectstore import ACCESS_KEY, REGION, SECRET_KEY

    key_id = "AKIDPROFILE" + uuid.uuid4().hex[:8].upper()
    (tmp_path / "credentials").write_text(f"[default]\naws_access_key_id = WRONG\naws_secret_access_key = WRONG\n"
                                          f"[shardstep-test]\naws_access_key_id = {key_id}\n"
                                          f"aws_secret_access_key = {SECRET_KEY}\n")
    (tmp_path / "config").write_text(f"[profile shardstep-test]\nregion = {REGION}\n"
                                     f"endpoint_url = {s3_server.endpoint}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_PROFILE="shardstep-test", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "config"), AWS_ALLOW_HTTP="true",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root = f"s3://{BUCKET}/runs/{uuid.uuid4().hex}"
    code = ("import sys; from shardstep.checkpoints import ShardLayout, ParamSpec, open_checkpoint; "
            "from tests.checkpoints.processes import commit_expected; "
            "layout = ShardLayout((ParamSpec('w', (1000,), 'float32'),), 2); commit_expected(sys.argv[1], 1, layout); "
            "print(open_checkpoint(sys.argv[1]).step)")
    marker = f"Credential={key_id}/".encode()
    s3_server.relay.watched[marker] = 0
    try:
        done = subprocess.run([sys.executable, "-c", code, root], env=env, capture_output=True, text=True, timeout=120)
        assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
        assert s3_server.relay.watched[marker] > 0, "no request was signed with the profile's key"
    finally:
        del s3_server.relay.watched[marker]
    assert ACCESS_KEY != key_id
    env["AWS_PROFILE"] = "no-such-profile"
    done = subprocess.run([sys.executable, "-c", code, root], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "AWS_PROFILE=no-such-profile: no such profile in the AWS credentials or config file" in done.stderr


def test_an_attempt_that_never_committed_is_no_damage(url):
    """Shard files of step 2 without its manifest (a writer cut off before its commit):
    newest_intact goes to step 1 and names nothing as damaged; the next writer removes them."""
    layout = ShardLayout(SPECS, 2)
    commit_expected(url, 1, layout)
    with CheckpointStore(url, run_id="run") as store:
        pending = store.begin(2, layout)
        write_shard(pending, 0, *expected_shard(layout, 0, 2))
        store._pending.clear()  # as if this writer died here
    assert newest_intact(url) == (1, [])
    with CheckpointStore(url, run_id="run"):
        assert leftovers(url) == []
