"""Test tiers. `make test` runs everything not marked `slow` (under 20 minutes on 2 cores);
`make test-slow` runs the `slow` tier: whole clusters started with `ray start` (the multi-node
node-kill test, the chain through `ray job submit`), the wheel installed in a fresh venv, the
README's commands and the end-to-end tiny run of benchmarks/pipeline_speed.py (four arms, each
its own process and Ray instance).
`make test-fast` is the edit loop (no Ray). CI (`.ci/run`) runs `make test` and `make test-slow`."""


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: starts its own Ray cluster(s) with `ray start`; run by `make test-slow` (also: assembling the optional 400 MB mpnet model, the pipeline-speed benchmark's tiny run)")
