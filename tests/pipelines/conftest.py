"""Real components for the pipeline tests: a local Ray, and an S3-compatible server on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def ray_node_ports(names: tuple[str, ...], workers: int = 200, start: int = 20000) -> tuple[dict[str, int], int]:
    """Distinct free ports for a `ray start` node, plus a worker-port range that overlaps none of them.

    Picking the worker range as `free_port() .. +200` collided with the other picks (Ray refuses to
    start when its runtime-env agent port falls inside the worker range), so the range is searched
    below the ephemeral range, where the kernel's own picks do not land.
    """
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = free_port()
        if port not in ports.values():
            ports[names[len(ports)]] = port
    taken = set(ports.values())
    for first in range(start, start + 10000, workers + 1):
        span = range(first, first + workers + 1)
        if not taken.intersection(span) and all(_is_free(p) for p in span):
            return ports, first
    raise RuntimeError(f"no free worker-port range between {start} and {start + 10000}")


# The S3 endpoint and credentials are fixed before any Ray worker starts, so workers inherit
# them exactly as cluster nodes get theirs from the environment.
S3_PORT = free_port()
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{S3_PORT}"}
os.environ.update(S3_ENV)


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray for the session (jobs call init_ray(), which reuses it)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in its own process, on a free loopback port: a real HTTP endpoint that
    s3fs / pyarrow talk to exactly as to AWS. Yields the endpoint URL; sets the AWS_* env vars."""
    port = S3_PORT
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto S3 server did not start") from None
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="cart-test")
        yield endpoint
    finally:
        proc.kill()
        proc.wait()
