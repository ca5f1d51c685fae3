"""The object-store lock against a real S3 server (moto) on 127.0.0.1: writers racing for the
lease, a lease taken over under a stalled holder, release of a lease no longer ours."""

import json
import logging
import threading
import time
import uuid
import weakref

import pytest

from storage import lock as lock_mod
from storage.fs import RunFS
from storage.lock import LEASE_FILE, LockLost, RunLock, RunLocked

from .live_server import free_port

N = 8  # writers per race
REPS = 5  # races per test

# The moto server, as the store. `ignore_conditions` turns it into a store that ignores
# If-Match / If-None-Match (as older S3-compatible servers do).
STORE = {"ignore_conditions": False}


@pytest.fixture(scope="module")
def s3_endpoint():
    moto_server = pytest.importorskip("moto.server")
    from moto.s3.responses import S3Response
    from werkzeug.datastructures import Headers

    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # moto checks a condition, then writes: two requests in its threads could interleave there.
    # S3 makes a conditional write atomic; so does this (one object write at a time).
    serial = threading.Lock()

    def store(method):
        def handle(self):
            with serial:
                if STORE["ignore_conditions"]:
                    headers = Headers(self.headers)
                    headers.remove("If-Match")
                    headers.remove("If-None-Match")
                    self.headers = headers
                return method(self)

        return handle

    mp.setattr(S3Response, "put_object", store(S3Response.put_object))
    mp.setattr(S3Response, "delete_object", store(S3Response.delete_object))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    mp.setenv("AWS_ENDPOINT_URL", url)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="locks")
    yield url
    server.stop()
    mp.undo()


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """Each test probes the store afresh (what it honours is cached per process)."""
    monkeypatch.setattr(lock_mod, "_SUPPORT", weakref.WeakKeyDictionary())
    monkeypatch.setitem(STORE, "ignore_conditions", False)


@pytest.fixture
def root():
    return f"s3://locks/run-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def ignoring_store(monkeypatch):
    monkeypatch.setitem(STORE, "ignore_conditions", True)


@pytest.fixture
def fallback_forced(monkeypatch):
    monkeypatch.setattr(lock_mod, "_probe", lambda obj: lock_mod._Support(put=False, delete=False))


@pytest.fixture
def wide_window(monkeypatch):
    """0.3 s between reading the lease and the next request: a slow network, a GC pause."""
    get = lock_mod._S3Object.get

    def slow_get(self):
        out = get(self)
        time.sleep(0.3)
        return out

    monkeypatch.setattr(lock_mod._S3Object, "get", slow_get)


def client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def key(root, name=LEASE_FILE):
    return root.removeprefix("s3://locks/") + "/" + name


def lease_on_store(endpoint, root):
    try:
        body = client(endpoint).get_object(Bucket="locks", Key=key(root))["Body"].read()
    except client(endpoint).exceptions.NoSuchKey:
        return None
    return json.loads(body)


def objects_under(endpoint, root):
    out = client(endpoint).list_objects_v2(Bucket="locks", Prefix=key(root, ""))
    return [o["Key"] for o in out.get("Contents", [])]


def race(endpoint, root, n=N, ttl=30.0):
    """n writers try to take the lock at the same instant: (winners, refusals, other errors)."""
    barrier = threading.Barrier(n)
    won, refused, errors = [], [], []

    def writer():
        lock = RunLock(RunFS(root, endpoint_url=endpoint), ttl=ttl)
        barrier.wait()
        try:
            won.append(lock.acquire())
        except RunLocked as e:
            refused.append(e)
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, refused, errors


def release_all(locks):
    """Release every winner; those whose lease another overwrote learn it (LockLost)."""
    lost = []

    def release(lock):
        try:
            lock.release()
        except LockLost:
            lost.append(lock)

    threads = [threading.Thread(target=release, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return len(lost)


@pytest.mark.parametrize("window", ["natural", "wide"])
def test_racing_writers_exactly_one_wins(s3_endpoint, root, window, request):
    if window == "wide":
        request.getfixturevalue("wide_window")
    for _ in range(REPS):  # the first race also probes the store, from every writer at once
        won, refused, errors = race(s3_endpoint, root)
        assert errors == []
        assert len(won) == 1 and len(refused) == N - 1, (len(won), len(refused))
        (winner,) = won
        assert winner.conditional
        assert all("is being written by" in str(e) for e in refused)
        assert lease_on_store(s3_endpoint, root)["id"] == winner.owner["id"]
        winner.release()
        assert objects_under(s3_endpoint, root) == []  # no lease, no probe object left


def test_racing_takeover_of_an_expired_lease_has_one_winner(s3_endpoint, root):
    for _ in range(REPS):
        dead = {"host": "gone", "pid": 1, "id": "dead", "time": time.time() - 1000}
        client(s3_endpoint).put_object(Bucket="locks", Key=key(root), Body=json.dumps(dead))
        won, refused, errors = race(s3_endpoint, root)
        assert errors == []
        assert len(won) == 1 and len(refused) == N - 1, (len(won), len(refused))
        assert lease_on_store(s3_endpoint, root)["id"] == won[0].owner["id"]
        won[0].release()


@pytest.mark.parametrize("store", ["ignoring_store", "fallback_forced"])
def test_without_conditional_writes_the_race_lets_several_writers_through(
    s3_endpoint, root, store, request, wide_window, caplog
):
    """What the conditional writes buy, shown by their absence: the same race with a store
    that ignores the conditions (detected by the probe) or with the fallback forced."""
    request.getfixturevalue(store)
    caplog.set_level(logging.WARNING, logger="storage.lock")
    several = 0
    for _ in range(3):
        won, refused, errors = race(s3_endpoint, root)
        assert errors == [] and won
        assert not any(lock.conditional for lock in won)
        several += len(won) > 1
        assert release_all(won) == len(won) - 1  # only the last writer's lease is deleted
        assert objects_under(s3_endpoint, root) == []
    assert several > 0
    assert "two writers started at the same instant can both hold it" in caplog.text


def test_a_stalled_holder_whose_lease_was_taken_learns_it_at_its_next_heartbeat(s3_endpoint, root):
    fs = RunFS(root, endpoint_url=s3_endpoint)
    first = RunLock(fs, ttl=0.4)
    resume = threading.Event()
    renew = first._renew

    def stalled_renew():  # a process paused (GC, SIGSTOP, a slow disk) past its lease
        resume.wait(30)
        return renew()

    first._renew = stalled_renew
    first.acquire()
    assert first.conditional
    time.sleep(0.6)  # the lease is now older than the ttl
    second = RunLock(fs, ttl=0.4).acquire()  # takes it over, If-Match on the ETag it read
    assert lease_on_store(s3_endpoint, root)["id"] == second.owner["id"]
    resume.set()  # the heartbeat's If-Match write gets 412
    deadline = time.monotonic() + 10
    while not first.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.lost
    with pytest.raises(LockLost, match=f"run {root}: this process lost its writer lease"):
        first.check()
    with pytest.raises(LockLost, match="held by"):
        first.release()
    time.sleep(0.3)  # the second writer's heartbeat keeps its lease
    assert lease_on_store(s3_endpoint, root)["id"] == second.owner["id"]
    second.check()
    second.release()
    assert lease_on_store(s3_endpoint, root) is None


@pytest.mark.parametrize("conditional", [True, False])
def test_release_does_not_delete_a_lease_another_writer_took(
    s3_endpoint, root, conditional, monkeypatch
):
    if not conditional:
        monkeypatch.setattr(
            lock_mod, "_probe", lambda obj: lock_mod._Support(put=False, delete=False)
        )
    fs = RunFS(root, endpoint_url=s3_endpoint)
    first = RunLock(fs, ttl=60).acquire()  # no heartbeat in the next 15 s
    assert first.conditional is conditional
    time.sleep(0.2)
    second = RunLock(fs, ttl=0.1).acquire()  # the first lease has expired for this writer
    with pytest.raises(LockLost, match=f"run {root}: .*held by"):
        first.release()
    assert lease_on_store(s3_endpoint, root)["id"] == second.owner["id"]
    second.release()
    assert lease_on_store(s3_endpoint, root) is None


def test_a_fresh_lease_refuses_and_a_released_one_admits(s3_endpoint, root):
    fs = RunFS(root, endpoint_url=s3_endpoint)
    with RunLock(fs) as held:
        with pytest.raises(RunLocked, match=f"run {root} is being written by"):
            RunLock(fs).acquire()
        held.check()
    with RunLock(fs):
        pass
    assert objects_under(s3_endpoint, root) == []
