"""One run at a time per destination: a second run stops at once saying whose run holds it, and a run that died
without giving its claim back does not lock the destination for good."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tasks.bucket import ShardOptions, run_shards
from tasks.lease import LEASE_NAME, DestinationBusy, DestinationLease, _pid_namespace
from tasks.storage import Location, exists, read_bytes, write_bytes
from tests.test_bucket import fill, jpeg, tiny_model


def photos(tmp_path, count=6) -> Location:
    source = Location(str(tmp_path / "in"))
    fill(source, {f"img{index:02}.jpg": jpeg((index * 30, 90, 200)) for index in range(count)})
    return source


def outputs(destination: Location) -> list[str]:
    fs, root = destination.filesystem()
    return [path for path in fs.find(root) if path.endswith(".jpg")] if fs.exists(root) else []


def lease_of(holder: str, host: str, pid: int, seen_s_ago: float, pid_namespace: int | None = None) -> bytes:
    renewed = time.time() - seen_s_ago
    return json.dumps({"holder": holder, "host": host, "pid": pid, "pid_namespace": pid_namespace or _pid_namespace(),
                       "started_at": "2026-11-27T00:00:00+00:00", "renewed_at_unix": renewed}).encode()


def test_a_second_run_into_a_destination_in_use_stops_at_once_and_the_first_finishes(tmp_path):
    source, destination = photos(tmp_path), Location(str(tmp_path / "out"))
    first_started, second_tried = threading.Event(), threading.Event()
    results = {}

    def hold_after_first_image(done: int) -> None:
        first_started.set()
        second_tried.wait(60)

    def first_run() -> None:
        results["first"] = run_shards(source, destination, {"m": tiny_model()}, ShardOptions(batch_size=1), 3,
                                      on_progress=hold_after_first_image)

    runner = threading.Thread(target=first_run)
    runner.start()
    assert first_started.wait(60)
    try:
        with pytest.raises(DestinationBusy, match=f"another run is writing to {destination.display}.*process "):
            run_shards(source, destination, {"m": tiny_model(1)}, ShardOptions(batch_size=1), 3)
    finally:
        second_tried.set()
        runner.join(60)
    assert results["first"]["counts"] == {"ok": 6, "skipped": 0, "error": 0}
    assert len(outputs(destination)) == 6
    assert not exists(destination.child(LEASE_NAME))  # given back: the next run may start
    again = run_shards(source, destination, {"m": tiny_model()}, ShardOptions(batch_size=1), 3)
    assert again["counts"] == {"ok": 0, "skipped": 6, "error": 0}


def test_the_claim_is_given_back_when_a_run_fails(tmp_path):
    source, destination = photos(tmp_path), Location(str(tmp_path / "out"))

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_shards(source, destination, {"m": tiny_model()}, ShardOptions(batch_size=1), 3, on_progress=interrupt)
    assert not exists(destination.child(LEASE_NAME))


def test_a_claim_left_by_a_process_that_is_gone_is_taken_over_at_once(tmp_path):
    source, destination = photos(tmp_path), Location(str(tmp_path / "out"))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_bytes(destination.child(LEASE_NAME), lease_of("killed-run", socket.gethostname(), int(ended.stdout), 5))
    summary = run_shards(source, destination, {"m": tiny_model()}, ShardOptions(batch_size=2), 3)
    assert summary["counts"]["ok"] == 6 and not exists(destination.child(LEASE_NAME))

    # A container sharing this host's name (host networking) has its own process ids: its claim holds.
    other_space = (_pid_namespace() or 0) + 1
    write_bytes(destination.child(LEASE_NAME), lease_of("in-a-container", socket.gethostname(), int(ended.stdout), 5,
                                                        pid_namespace=other_space))
    with pytest.raises(DestinationBusy, match="in-a-container"):
        run_shards(source, destination, {"m": tiny_model()}, ShardOptions(batch_size=2), 3)


def test_a_claim_this_process_could_not_give_back_does_not_lock_it_out(tmp_path):
    # A destination that turned read-only fails the run and keeps its claim; the same process's rerun (a service,
    # a notebook) goes on once the store is healed, while a run it still holds stays refused (the test above).
    source, destination = photos(tmp_path), Location(str(tmp_path / "out"))
    write_bytes(destination.child(LEASE_NAME), lease_of("ended-run", socket.gethostname(), os.getpid(), 5))
    assert run_shards(source, destination, {"m": tiny_model()}, ShardOptions(batch_size=2), 3)["counts"]["ok"] == 6


def test_a_claim_from_another_machine_holds_until_it_has_not_been_renewed_for_the_stale_time(tmp_path):
    source, destination = photos(tmp_path), Location(str(tmp_path / "out"))
    write_bytes(destination.child(LEASE_NAME), lease_of("elsewhere", "other-host", 4242, 30))
    with pytest.raises(DestinationBusy, match=r"run elsewhere on other-host, process 4242.*last seen 3\d s ago.*"
                                              r"lapses 10 minutes"):
        run_shards(source, destination, {"m": tiny_model()}, ShardOptions(batch_size=2), 3)
    assert outputs(destination) == []  # nothing cleaned or written
    assert json.loads(read_bytes(destination.child(LEASE_NAME)))["holder"] == "elsewhere"

    write_bytes(destination.child(LEASE_NAME), lease_of("elsewhere", "other-host", 4242, 601))
    assert run_shards(source, destination, {"m": tiny_model()}, ShardOptions(batch_size=2), 3)["counts"]["ok"] == 6


def test_the_same_run_takes_its_own_claim_back(tmp_path):
    # A Prefect rerun of a crashed flow run has the same id: it must not wait for its own dead attempt.
    destination = Location(str(tmp_path / "out"))
    write_bytes(destination.child(LEASE_NAME), lease_of("flow-run-1", "other-host", 4242, 1))
    with DestinationLease(destination, holder="flow-run-1"):
        assert json.loads(read_bytes(destination.child(LEASE_NAME)))["pid"] != 4242


def test_of_two_runs_claiming_at_the_same_moment_exactly_one_goes_on(gcs_emulator):
    destination = Location(f"gs://photos/{uuid.uuid4().hex[:8]}/out", gcs_emulator)
    start, outcomes = threading.Barrier(2), []

    def claim(name: str) -> None:
        lease = DestinationLease(destination, holder=name, settle_s=1.0)
        start.wait()
        try:
            lease.claim()
            outcomes.append(("claimed", name))
        except DestinationBusy as error:
            outcomes.append(("refused", str(error)))

    threads = [threading.Thread(target=claim, args=(name,)) for name in ("run-a", "run-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(kind for kind, _ in outcomes) == ["claimed", "refused"]
    winner = next(name for kind, name in outcomes if kind == "claimed")
    assert json.loads(read_bytes(destination.child(LEASE_NAME)))["holder"] == winner


class SlowToWriteLease(DestinationLease):
    """A run whose machine stalls between reading the lease and writing its own (a busy machine, a swap-in)."""

    def read(self):
        lease = super().read()
        time.sleep(0.4)
        return lease


def test_on_a_local_disk_a_run_stalled_while_claiming_cannot_overwrite_a_claim_made_meanwhile(tmp_path):
    destination, outcomes = Location(str(tmp_path / "out")), []
    slow = SlowToWriteLease(destination, holder="slow", settle_s=0.1)

    def claim(lease: DestinationLease) -> None:
        try:
            lease.claim()
            outcomes.append(("claimed", lease.holder))
        except DestinationBusy:
            outcomes.append(("refused", lease.holder))

    first = threading.Thread(target=claim, args=(slow,))
    first.start()
    time.sleep(0.1)  # the slow run has read "no lease" and stalls; another run claims now
    claim(DestinationLease(destination, holder="quick", settle_s=0.1))
    first.join(30)
    slow.release()
    assert sorted(outcomes) == [("claimed", "slow"), ("refused", "quick")]


def test_a_long_run_keeps_its_claim_renewed_and_never_takes_back_one_another_run_took_over(tmp_path):
    destination = Location(str(tmp_path / "out"))
    lease = DestinationLease(destination, holder="long-run", renew_every_s=0.05)
    with lease:
        first = json.loads(read_bytes(destination.child(LEASE_NAME)))["renewed_at_unix"]
        time.sleep(0.3)
        assert json.loads(read_bytes(destination.child(LEASE_NAME)))["renewed_at_unix"] > first
        write_bytes(destination.child(LEASE_NAME), lease_of("newcomer", "other-host", 1, 0))
        time.sleep(0.3)
        assert json.loads(read_bytes(destination.child(LEASE_NAME)))["holder"] == "newcomer"
    assert json.loads(read_bytes(destination.child(LEASE_NAME)))["holder"] == "newcomer"  # not removed by the loser
