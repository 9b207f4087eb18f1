"""Resumable training checkpoints in plain formats: safetensors for tensors, JSON for the rest.

torch's own optimizer/scheduler state dicts mix tensors and Python values; they are split here
into a flat tensor dict and a JSON skeleton so nothing is pickled."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cart_core.generator import Generator
from cart_core.training import TrainState


def _split(obj, prefix: str, tensors: dict) -> object:
    """Replace every tensor in a nested structure by a reference into `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split(k, f"{prefix}.k{i}", tensors), _split(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def _join(obj, tensors: dict) -> object:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_join(k, tensors): _join(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, dict) and "__list__" in obj:
        items = [_join(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj.get("tuple") else items
    return obj


def save_checkpoint(folder: str | Path, generator: Generator, epoch: int, history: dict,
                    optimizer: torch.optim.Optimizer, scheduler) -> None:
    """`model/` (what serving loads) + `state.safetensors` / `state.json` (what resuming needs)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    generator.save(folder / "model")
    tensors: dict = {}
    skeleton = {"epoch": epoch + 1, "history": history,
                "optimizer": _split(optimizer.state_dict(), "opt", tensors),
                "scheduler": _split({k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
                                    "sched", tensors)}
    save_file(tensors or {"_": torch.zeros(1)}, folder / "state.safetensors")
    (folder / "state.json").write_text(json.dumps(skeleton))


def load_checkpoint(folder: str | Path, text_encoder=None) -> tuple[Generator, TrainState]:
    from safetensors.torch import load_file

    folder = Path(folder)
    tensors = load_file(folder / "state.safetensors")
    skeleton = json.loads((folder / "state.json").read_text())
    generator = Generator.load(folder / "model", text_encoder=text_encoder)
    scheduler = _join(skeleton["scheduler"], tensors)
    scheduler["lr_lambdas"] = [None] * len(scheduler.get("base_lrs", [None]))
    state = TrainState(skeleton["epoch"], _join(skeleton["optimizer"], tensors), scheduler, skeleton["history"])
    return generator, state
