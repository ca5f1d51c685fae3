"""Credentials never appear in flow parameters, logs, artifacts, the saved config or the run's
files: they come from the environment or a Prefect Secret block; URLs that carry them are
refused without echoing them."""

import asyncio
import json
import secrets

import pytest

from storage.config import parse_config
from storage.fs import RunFS
from storage.urls import check_no_credentials

from .configs import SMALL
from .live_server import free_port

SECRET = "s3cr3t-" + secrets.token_hex(8)

BAD = [
    f"s3://AKIAEXAMPLE:{SECRET}@runs/exp",
    f"https://user:{SECRET}@example.org/w.safetensors",
    f"https://bucket.s3.amazonaws.com/w.pt?X-Amz-Credential=a&X-Amz-Signature={SECRET}",
    f"https://acct.blob.core.windows.net/c/w.pt?sv=2024&sig={SECRET}",
    f"https://example.org/w.pt?token={SECRET}",
]


# Ids without the secret: it is drawn afresh per process (each pytest-xdist worker collects the
# same ids), and a test id is printed.
@pytest.mark.parametrize(
    "url", BAD, ids=["userinfo-s3", "userinfo-https", "aws-signature", "sas", "token"]
)
def test_urls_with_credentials_are_refused_without_echoing_them(url):
    with pytest.raises(ValueError, match="carries credentials") as e:
        check_no_credentials(url, "teachers.import_from[0]")
    assert SECRET not in str(e.value)
    assert "teachers.import_from[0]" in str(e.value)


@pytest.mark.parametrize(
    "url",
    [
        "s3://runs/exp",
        "/data/imagenet/train",
        "https://example.org/resnet18.safetensors",
        "https://example.org/w.pt?versionId=3",
        "relative/path",
    ],
)
def test_plain_urls_pass(url):
    check_no_credentials(url, "x")


def test_config_and_root_refuse_credentials():
    with pytest.raises(ValueError, match=r"teachers.init_from\[1\]") as e:
        parse_config(
            {
                **SMALL,
                "teachers": {
                    "count": 2,
                    "init_from": ["a.safetensors", f"https://u:{SECRET}@h/b.safetensors"],
                },
            }
        )
    assert SECRET not in str(e.value)
    with pytest.raises(ValueError, match="run root") as e:
        RunFS(BAD[0])
    assert SECRET not in str(e.value)


def test_secret_block_name_is_not_part_of_the_results_hash():
    a = parse_config(SMALL)
    b = parse_config({**SMALL, "storage": {"secret_block": "team-s3"}})
    assert a.config_hash() == b.config_hash()


@pytest.fixture
def s3_without_env_credentials(monkeypatch, tmp_path):
    moto_server = pytest.importorskip("moto.server")
    # Nothing in the environment: the only credentials are in the Secret block.
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="AKIAEXAMPLE", aws_secret_access_key=SECRET
    )
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem cached with other credentials
    s3.create_bucket(Bucket="runs")
    yield url, s3
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow  # the default tier's run on S3: tests/test_s3.py
def test_flow_on_s3_with_a_secret_block_leaks_nothing(prefect_server, s3_without_env_credentials):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.distill import distill

    url, s3 = s3_without_env_credentials
    options = {"key": "AKIAEXAMPLE", "secret": SECRET, "endpoint_url": url}
    # Without the block, the run cannot reach the bucket (no credentials anywhere else).
    with pytest.raises(Exception):  # noqa: B017
        RunFS("s3://runs/probe").write_bytes("x", b"x")
    Secret(value=options).save("d3s-test-s3", overwrite=True)
    cfg = parse_config({**SMALL, "name": "secure", "storage": {"secret_block": "d3s-test-s3"}})
    state = distill(root="s3://runs/secure", config=cfg, return_state=True)
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id

    # The run's files, read straight from the bucket.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="runs")["Contents"]]
    assert "secure/validation/summary.json" in keys and "secure/report/report.md" in keys
    for key in keys:
        body = s3.get_object(Bucket="runs", Key=key)["Body"].read()
        assert SECRET.encode() not in body, key
    saved = json.loads(s3.get_object(Bucket="runs", Key="secure/config.json")["Body"].read())
    assert saved["config"]["storage"] == {"secret_block": "d3s-test-s3"}

    async def everything_the_server_shows():
        async with get_client() as client:
            fr = await client.read_flow_run(flow_run_id)
            tasks = [t for t in await client.read_task_runs() if t.flow_run_id == flow_run_id]
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            artifacts = await client.read_artifacts()
            return (
                [fr.model_dump_json()]
                + [t.model_dump_json() for t in tasks]
                + [entry.message for entry in logs]
                + [a.model_dump_json() for a in artifacts]
            )

    shown = asyncio.run(everything_the_server_shows())
    assert len(shown) > 10
    leaks = [s[:200] for s in shown if SECRET in s or "AKIAEXAMPLE" in s]
    assert leaks == []
