"""How `cart` reports a failure raised inside Ray: exit code and one line (pipelines/cli.py)."""
from __future__ import annotations

import pytest

from cart_core.errors import InputNotFound, LocatedError
from cart_core.store import CommitConflict, StoreError
from pipelines.cli import exit_code, innermost, one_line


def _constructor_failure(ray, error: Exception) -> BaseException:
    """What a call to an actor whose constructor raised `error` raises (Ray's ActorDiedError)."""

    @ray.remote(num_cpus=0.1, max_restarts=0)
    class Loads:
        def __init__(self):
            raise error

        def ping(self) -> int:
            return 1

    with pytest.raises(ray.exceptions.ActorDiedError) as caught:
        ray.get(Loads.remote().ping.remote())
    return caught.value


@pytest.mark.parametrize("error, code", [
    (LocatedError("/data/items.parquet", 7, "embedding contains NaN"), 2),
    (StoreError("/s/gen-3/model: the generator cannot be loaded (truncated)"), 2),
    (CommitConflict("another job committed version 9 meanwhile"), 3),
    (InputNotFound("/data/queries.parquet: file not found"), 2),  # Exception.__new__ refuses this class
])
def test_our_error_in_an_actor_constructor_keeps_its_exit_code_and_message(ray_local, error, code):
    died = _constructor_failure(ray_local, error)
    assert exit_code(died)[0] == 1, "Ray's own exception carries no type of ours"
    cause = innermost(died)
    assert isinstance(cause, type(error))
    assert exit_code(cause)[0] == code
    assert one_line(cause) == str(error)


def _chained(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as caught:
            raise outer from caught
    except Exception as raised:
        return raised


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA out of memory"),
    _chained(RuntimeError("CUDA out of memory"), StoreError("/s/gen-3/model: the generator cannot be loaded")),
    _chained(KeyError("a bug while handling ours"), LocatedError("/data/items.parquet", 7, "embedding contains NaN")),
], ids=["plain", "ours-as-cause", "bug-while-handling-ours"])
def test_another_libraries_error_in_an_actor_constructor_stays_a_failed_job(ray_local, error):
    """Only the exception that ends the traceback counts: ours as its cause is not what failed."""
    died = _constructor_failure(ray_local, error)
    cause = innermost(died)
    assert cause is died
    assert exit_code(cause)[0] == 1


def _fails_in_the_worker(config: dict) -> None:
    raise StoreError(config["message"])


def test_our_error_in_a_ray_train_worker_keeps_its_exit_code_and_message(ray_local, tmp_path):
    """Ray Train reports a worker's exception inside WorkerGroupError; `cart` answers with it."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    message = f"{tmp_path}/generator/run/epoch-0001/model: the generator cannot be loaded (truncated)"
    trainer = TorchTrainer(_fails_in_the_worker, train_loop_config={"message": message},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="fails", storage_path=str(tmp_path / "ray"),
                                                failure_config=FailureConfig(max_failures=0)))
    with pytest.raises(Exception) as caught:
        trainer.fit()
    cause = innermost(caught.value)
    assert isinstance(cause, StoreError)
    assert exit_code(cause)[0] == 2
    assert one_line(cause) == message


def test_only_the_last_part_of_a_chained_traceback_names_the_error():
    """Ray leaves its own frames out of the text: a part without a frame names no error of ours,
    even when the frame before it (the cause's) ends in one."""
    from pipelines.cli import final_exception_line

    cause = ('Traceback (most recent call last):\n  File "/x/cart_core/store.py", line 3, in read\n'
             '    raise StoreError("m")\ncart_core.store.StoreError: /s/manifest.json: not valid JSON\n')
    outer_without_frames = cause + ("\nThe above exception was the direct cause of the following exception:\n\n"
                                    "\x1b[36mray::Worker.__init__()\x1b[39m (pid=1)\nRuntimeError: CUDA out of memory")
    assert final_exception_line(cause) == "cart_core.store.StoreError: /s/manifest.json: not valid JSON"
    assert final_exception_line(outer_without_frames) == ""
    multiline = cause.replace("not valid JSON\n", "not valid JSON\n  second line of the message\n")
    assert final_exception_line(multiline) == "cart_core.store.StoreError: /s/manifest.json: not valid JSON"
