"""Fixtures for the awscli/boto3 tests of datapipeline-local.

The server binary comes from $DATAPIPELINE_LOCAL_BIN (set by tests/local_python.rs, which runs
these tests under `cargo test --release`) or target/release/datapipeline-local.
"""
import json
import os
import pathlib
import signal
import subprocess

import boto3
import botocore.config
import pytest

AK = "AKIDPYTEST"
SK = "py-test-secret"
LONG_POLL = 3

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _binary():
    b = os.environ.get("DATAPIPELINE_LOCAL_BIN") or str(ROOT / "target/release/datapipeline-local")
    if not os.path.exists(b):
        pytest.fail(f"datapipeline-local binary not found at {b}: run cargo build --release")
    return b


@pytest.fixture
def server(tmp_path):
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"access-id": AK, "private-key": SK}))
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY")}
    env["NO_PROXY"] = "*"
    p = subprocess.Popen(
        [_binary(), "serve", "--listen", "127.0.0.1:0", "--credentials", str(creds),
         "--long-poll-seconds", str(LONG_POLL)],
        stdout=subprocess.PIPE, cwd=tmp_path, env=env, text=True,
    )
    try:
        line = p.stdout.readline().strip()
        assert line.startswith("listening on "), line
        yield line[len("listening on "):]
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def make_client(url, ak=AK, sk=SK):
    return boto3.client(
        "datapipeline",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=ak,
        aws_secret_access_key=sk,
        # Above the long poll, as a runner must set it (botocore's default is 60 s).
        config=botocore.config.Config(read_timeout=LONG_POLL + 30, retries={"max_attempts": 1}),
    )


@pytest.fixture
def client(server):
    return make_client(server)


@pytest.fixture
def aws_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY")}
    env.update({
        "AWS_ACCESS_KEY_ID": AK,
        "AWS_SECRET_ACCESS_KEY": SK,
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "*",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    })
    return env
