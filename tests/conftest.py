import itertools
import os
import re

import pytest
import torch

# A new PREFECT_HOME's ephemeral server takes 25-30 s to start on 2 busy cores (database
# migrations), over Prefect's 20 s default; the flow subprocesses inherit this too.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

# `gpu` tests need CUDA. Without it they are skipped, unless CUDA was asked for: a `-m`
# expression that selects them (`-m gpu`, `-m "gpu or slow"`, not `-m "not gpu"`), or
# D3S_REQUIRE_GPU=1. Then each one fails, so a GPU run that silently ran on a machine without a
# usable CUDA cannot pass. The default run (`-m 'not slow and not gpu'`) deselects them.
REQUIRE_ENV = "D3S_REQUIRE_GPU"
_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")
_OPERATORS = {"and", "or", "not", "(", ")"}


def markexpr_selects(markexpr: str, marker: str = "gpu") -> bool:
    """Whether the `-m` expression asks for `marker` explicitly: some test carrying `marker` is
    selected that would not be without it (so `-m gpu` and `-m "gpu or slow"` do, `-m ""`,
    `-m "not gpu"` and `-m "not slow"` do not). An expression this cannot read counts as asking
    when it names `marker` not right after `not`."""
    tokens = _TOKEN.findall(markexpr)
    if marker not in tokens:
        return False
    names = sorted({t for t in tokens if t not in _OPERATORS and t.isidentifier()} - {marker})
    if len(names) > 10 or any(t not in _OPERATORS and not t.isidentifier() for t in tokens):
        return _names_not_negated(tokens, marker)
    code = " ".join(t if t in _OPERATORS else f"v[{t!r}]" for t in tokens)
    try:
        expr = compile(code, "<markexpr>", "eval")
        for values in itertools.product((False, True), repeat=len(names)):
            v = dict(zip(names, values, strict=True))
            with_marker = eval(expr, {"__builtins__": {}}, {"v": {**v, marker: True}})
            without = eval(expr, {"__builtins__": {}}, {"v": {**v, marker: False}})
            if with_marker and not without:
                return True
        return False
    except (SyntaxError, TypeError, KeyError):
        return _names_not_negated(tokens, marker)


def _names_not_negated(tokens: list[str], marker: str) -> bool:
    for i, t in enumerate(tokens):
        if t != marker:
            continue
        j = i - 1
        while j >= 0 and tokens[j] == "(":
            j -= 1
        if j < 0 or tokens[j] != "not":
            return True
    return False


def gpu_requested(config: pytest.Config) -> bool:
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        return True
    return markexpr_selects(config.getoption("markexpr", "") or "")


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs 2 workers), each worker's torch gets its share of
    the cores, so that the workers do not oversubscribe them; tests that need a thread count
    set their own."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture: a `gpu` test without CUDA is skipped, or fails when CUDA was asked
    for (the message says how it was asked for)."""
    if "gpu" not in item.keywords or torch.cuda.is_available():
        return
    if not gpu_requested(item.config):
        pytest.skip("needs CUDA")
    how = f"{REQUIRE_ENV}=1" if os.environ.get(REQUIRE_ENV, "") not in ("", "0") else None
    how = how or f"-m {item.config.getoption('markexpr')!r}"
    pytest.fail(
        f"CUDA was requested ({how}) but torch.cuda.is_available() is False "
        f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
        "gpu tests fail rather than skip when asked for",
        pytrace=False,
    )


# -- shared fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real (ephemeral) Prefect server with an isolated PREFECT_HOME, one for the session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect_home")))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.delenv("PREFECT_API_URL", raising=False)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    mp.undo()


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with a bucket `runs`; its URL (also AWS_ENDPOINT_URL)."""
    moto_server = pytest.importorskip("moto.server")
    mp = pytest.MonkeyPatch()
    # Credentials come from the environment, never from the config or parameters.
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from tests.live_server import free_port  # conftest stays importable alone (test_gpu_gating)

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    mp.setenv("AWS_ENDPOINT_URL", url)  # what a user of an S3-compatible store sets
    # fsspec caches filesystems by their arguments: one made earlier in this process (another
    # module's server, other credentials) must not answer for this one.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="runs")
    yield url
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    mp.undo()


@pytest.fixture(scope="session")
def streaming_prepared(tmp_path_factory):
    """A run root of the streaming synthesis config (configs.SYN) with teachers and statistics
    (the synthesis stage's inputs)."""
    from storage.run import open_run
    from tasks.stages import compute_stats, open_data, train_teachers

    from .helpers import streaming_config

    root = tmp_path_factory.mktemp("syn") / "run"
    torch.set_num_threads(1)
    with open_run(root, streaming_config()) as run:
        open_data(run)
        train_teachers(run)
        compute_stats(run)
    return root


@pytest.fixture
def streaming_root(streaming_prepared, tmp_path):
    """A copy of `streaming_prepared` for one test to run the synthesis stage in."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(streaming_prepared, dst)
    return dst
