"""Test tiers. `make test` runs everything not marked `slow` (under 20 minutes on 2 cores);
`make test-slow` runs the `slow` tier: whole clusters started with `ray start` (the multi-node
node-kill test, the chain through `ray job submit`). CI (`.ci/run`) runs both."""


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: starts its own Ray cluster(s) with `ray start`; run by `make test-slow`")
