"""The one stage runner (pipelines/stages.py): setup once per actor, declared columns enforced,
storage settings reach the actors, bad rows reach the errors table the same way for every job."""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cart_core.store import Manifest, Store
from pipelines.parts import ErrorLog
from pipelines.stages import Resources, Stage, block_rows, run_stage, stream

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


@dataclass
class Doubler(Stage):
    """Doubles x; rows with x < 0 fail one by one, like a file that does not decode."""

    name = "doubler"
    inputs = ("item_id", "x")
    outputs = ("item_id", "uri", "y", "status", "reason", "setups", "env")

    resources: Resources
    offset: int = 0

    def setup(self) -> None:
        self.setups = getattr(self, "setups", 0) + 1

    def process_batch(self, batch: pa.Table) -> pa.Table:
        x = np.asarray(batch.column("x").to_pylist())
        bad = x < 0
        n = batch.num_rows
        return pa.table({"item_id": batch.column("item_id"), "uri": pa.array([f"mem://{i}" for i in range(n)]),
                         "y": pa.array(np.where(bad, 0, 2 * x + self.offset)),
                         "status": pa.array(np.where(bad, "error", "ok")),
                         "reason": pa.array([f"negative x {v}" if b else None for v, b in zip(x, bad)], pa.string()),
                         "setups": pa.array([self.setups] * n),
                         "env": pa.array([os.environ.get("AWS_CART_STAGE_TEST")] * n, pa.string())})


@dataclass
class Forgetful(Stage):
    name = "forgetful"
    inputs = ("x",)
    outputs = ("x", "y")
    resources: Resources

    def process_batch(self, batch: pa.Table) -> pa.Table:
        return batch


def test_block_rows_whole_batches_and_several_blocks_per_actor():
    assert block_rows(10_000, 64, 2) == 256          # capped, whole batches
    assert block_rows(100, 16, 2) == 16              # several blocks for the pool
    assert block_rows(5, 16, 1) == 16                # never below one batch


def test_stage_runs_setup_once_per_actor_and_streams_every_row(ray_local, monkeypatch):
    monkeypatch.setenv("AWS_CART_STAGE_TEST", "from-the-driver")
    x = list(range(-3, 297))
    table = pa.table({"item_id": [f"i{v}" for v in x], "x": x})
    stage = Doubler(Resources(actors=2, num_cpus=0.5, num_gpus=0, batch_size=16), offset=1)
    out = pa.concat_tables(list(stream(run_stage(stage, table), table.num_rows, "test")))
    assert out.num_rows == len(x)
    got = dict(zip(out.column("item_id").to_pylist(), out.column("y").to_pylist()))
    assert got["i5"] == 11 and got["i-3"] == 0
    assert set(out.column("setups").to_pylist()) == {1}          # one setup per actor, not per batch
    assert set(out.column("env").to_pylist()) == {"from-the-driver"}  # storage settings reach the actors
    assert sorted(out.filter(pa.compute.equal(out.column("status"), "error")).column("item_id").to_pylist()) \
        == ["i-1", "i-2", "i-3"]


def test_stage_that_forgets_a_declared_column_fails_naming_it(ray_local):
    stage = Forgetful(Resources(actors=1, num_cpus=0.5, num_gpus=0, batch_size=8))
    with pytest.raises(Exception, match=r"stage forgetful: process_batch returned no \['y'\]"):
        list(stream(run_stage(stage, pa.table({"x": list(range(10))})), 10, "test"))


def test_stage_input_columns_checked_before_ray_work():
    with pytest.raises(KeyError, match=r"stage doubler: input table lacks column\(s\) \['x'\]"):
        run_stage(Doubler(Resources(1, 1.0, 0.0, 8)), pa.table({"item_id": ["a"]}))


def test_error_log_skips_errors_the_store_already_records(tmp_path):
    store = Store(str(tmp_path / "idx"))
    log = ErrorLog(store, Manifest(version=0), "run-1", "extract")
    log.add(["a", "b"], ["u/a", "u/b"], ["broken", "empty"])
    summary = log.close()
    assert summary["count"] == 2 and log.new == 2 and summary["table"].endswith("errors/run-1")
    manifest = store.commit(Manifest(version=0, errors=["errors/run-1"]), "errors")
    again = ErrorLog(store, manifest, "run-2", "extract")
    again.add(["a", "c"], ["u/a", "u/c"], ["broken", "broken"])
    assert again.close()["count"] == 2 and again.new == 1       # only c is new
    other_stage = ErrorLog(store, manifest, "run-3", "caption")
    other_stage.add(["a"], ["u/a"], ["broken"])
    assert other_stage.new == 1                                 # the same row failing another stage is news


def test_no_actor_pool_outside_the_stage_runner():
    """Every Ray Data actor pool in pipelines/ is built by run_stage."""
    offenders = []
    for path in PIPELINES.glob("*.py"):
        if path.name == "stages.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "ActorPoolStrategy":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_verb_modules_do_not_import_each_others_internals():
    """A verb module (one per `cart` verb) imports shared modules, not another verb's module;
    reindex composes train's fine-tune through its public entry point only."""
    verbs = {"caption", "check", "demo", "evaluate", "extract", "importer", "maintenance", "quantize", "reindex",
             "retrieve", "scan", "serve", "train"}
    allowed = {("reindex", "train"): {"Finetune", "run_train"}}
    found = []
    for name in verbs:
        tree = ast.parse((PIPELINES / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipelines."):
                other = node.module.split(".", 1)[1]
                if other in verbs and other != name:
                    names = {a.name for a in node.names}
                    if not names <= allowed.get((name, other), set()):
                        found.append(f"{name} imports {sorted(names)} from {other}")
    assert found == []
