"""Test tiers. `make test` runs everything not marked `slow` (under 20 minutes on 2 cores);
`make test-slow` runs the `slow` tier: whole clusters started with `ray start` (the multi-node
node-kill test, the chain through `ray job submit`) and the wheel installed in a fresh venv.
`make test-fast` is the edit loop (no Ray). CI (`.ci/run`) runs `make test` and `make test-slow`."""


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: starts its own Ray cluster(s) with `ray start`; run by `make test-slow` (also: assembling the optional 400 MB mpnet model)")
