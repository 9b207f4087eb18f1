"""Training the generator on (query -> identifier) pairs: cross-entropy + omega * R-Drop KL.

The text encoder is frozen, so its layer states are computed once per training query and cached
in float16; each epoch then only runs the small fusion decoder, which is what makes training on a
2-core CPU practical.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from cart_core.generator import Generator, identifier_nll, rdrop_kl
from cart_core.settings import TrainConfig  # noqa: F401  (re-exported)


@dataclass
class StateCache:
    """Frozen encoder states for a fixed list of queries, padded to one length."""

    states: torch.Tensor  # float16 [N, S, T, H]
    mask: torch.Tensor    # bool [N, T]

    @classmethod
    def build(cls, generator: Generator, queries, batch_size: int = 256, progress: bool = True) -> "StateCache":
        chunks, masks = [], []
        bar = tqdm(range(0, len(queries), batch_size), desc="encode queries", disable=not progress, leave=False)
        with torch.no_grad():
            for start in bar:
                states, mask = generator.encode_queries(queries[start:start + batch_size])
                chunks.append(states.to(torch.float16).cpu())  # host memory: the cache can be large
                masks.append(mask.cpu())
        t = max(m.shape[1] for m in masks)
        states = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, t - c.shape[2])) for c in chunks])
        mask = torch.cat([torch.nn.functional.pad(m, (0, t - m.shape[1])) for m in masks])
        return cls(states, mask)

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.mask[index]
        used = mask.any(0).nonzero()
        t = int(used.max()) + 1 if len(used) else 1  # trim padding columns shared by the whole batch
        return self.states[index, :, :t].to(device).float(), mask[:, :t].to(device)


def _lr_lambda(total_steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def _batches(n: int, batch_size: int, gen: torch.Generator, lengths: torch.Tensor | None):
    """Shuffled batches; with query lengths, batches are formed from length-sorted windows of
    50 batches so padding (and so cross-attention cost) stays small."""
    perm = torch.randperm(n, generator=gen)
    if lengths is not None:
        window = batch_size * 50
        perm = torch.cat([
            chunk[torch.argsort(lengths[chunk], stable=True)] for chunk in perm.split(window)
        ])
    batches = list(perm.split(batch_size))
    order = torch.randperm(len(batches), generator=gen)
    return [batches[i] for i in order]


def steady_epoch_s(epoch_s: list[float]) -> float:
    """Median epoch time, the first epoch left out when there are more (its warm-up is not the
    rate a long training runs at)."""
    return float(np.median(epoch_s[1:] if len(epoch_s) > 1 else epoch_s))


@dataclass
class DataParallel:
    """This process's part in data-parallel training over its own shard of pairs: every process
    runs the same `steps_per_epoch` (the smallest shard's), and `sync_grads(params)` averages
    gradients across processes after each backward (an all-reduce under Ray Train)."""

    steps_per_epoch: int | None = None
    sync_grads: Callable[[list[torch.Tensor]], None] | None = None


@dataclass
class TrainState:
    """Where a resumed run starts: epochs done, optimizer and scheduler state, history so far."""

    epoch: int
    optimizer: dict
    scheduler: dict
    history: dict


def train_generator(
    generator: Generator,
    queries,
    codes: np.ndarray,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    weights: np.ndarray | None = None,
    parallel: DataParallel | None = None,
    resume: TrainState | None = None,
    checkpoint: Callable[[int, dict, torch.optim.Optimizer, object], None] | None = None,
    teacher: Generator | None = None,
    distill: np.ndarray | None = None,
    distill_weight: float = 0.0,
) -> dict:
    """Fit the decoder (and vector projector) on queries[i] -> codes[i]; returns a loss history.

    `weights[i]` scales pair i's loss (pseudo-queries count less than human captions).
    `on_epoch_end(epoch, history)` runs after every epoch (validation); `checkpoint(epoch,
    history, optimizer, scheduler)` too, for saving a resumable state. Batch order and dropout
    are seeded per epoch, so a run resumed from a checkpoint continues as the original would.
    With a `teacher` (the generator before a fine-tune), pairs with `distill[i] > 0` also pay
    `distill_weight` x KL(teacher || student) at every identifier position, teacher-forced on their
    own identifier: the fine-tune keeps old queries' predictions instead of only replaying them."""
    if len(queries) != len(codes):
        raise ValueError(f"{len(queries)} queries but {len(codes)} target identifiers")
    if len(codes) == 0:
        raise ValueError("no training pairs")
    parallel = parallel or DataParallel()
    device = next(generator.decoder.parameters()).device
    targets = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    pair_weight = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    distill_mask = None
    if teacher is not None and distill_weight > 0:
        distill_mask = torch.as_tensor(np.ones(len(codes)) if distill is None else np.asarray(distill),
                                       dtype=torch.float32)
        teacher.eval()
    cache = StateCache.build(generator, queries, progress=progress) if generator.text_encoder else None
    vectors = None if cache else torch.as_tensor(np.asarray(queries), dtype=torch.float32)
    params = [p for n, p in generator.named_parameters() if p.requires_grad and not n.startswith("text_encoder.")]
    tuned = generator.tuned_encoder_layers()
    tuned_params = [p for layer in tuned for p in layer.parameters()]
    groups = [{"params": params}] + ([{"params": tuned_params, "lr": cfg.encoder_lr}] if tuned_params else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = params + tuned_params
    steps_per_epoch = parallel.steps_per_epoch or math.ceil(len(targets) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, int(cfg.warmup_frac * total))))
    history = {"loss": [], "nll": [], "kl": []}
    first = 0
    if resume is not None:
        opt.load_state_dict(resume.optimizer)
        sched.load_state_dict(resume.scheduler)
        history = {k: list(v) for k, v in resume.history.items()}
        first = resume.epoch
    start_time = time.perf_counter()
    bar = tqdm(range(first, cfg.epochs), desc="train generator", disable=not progress,
               initial=first, total=cfg.epochs)
    for epoch in bar:
        epoch_start = time.perf_counter()
        generator.train()
        torch.manual_seed(cfg.seed + 7919 * epoch)
        gen = torch.Generator().manual_seed(cfg.seed + epoch)
        sums, seen = np.zeros(3), 0
        batches = _batches(len(targets), cfg.batch_size, gen, cache.mask.sum(1) if cache else None)
        for idx in batches[:steps_per_epoch]:
            states, mask = cache.batch(idx, device) if cache else generator.encode_queries(vectors[idx].to(device))
            frozen_states = states  # before the student's tuned top layers: the teacher runs its own
            if tuned:
                n = len(tuned)
                top = generator.text_encoder.run_top_layers(states[:, -n - 1], mask, n)
                states = torch.cat([states[:, :-n], top], dim=1)
            memory = generator.decoder.prepare_memory(states, mask)
            y = targets[idx].to(device)
            if cfg.rdrop_weight > 0:  # two dropout passes of the decoder over one shared memory
                memory = {key: torch.cat([value, value]) for key, value in memory.items()}
                logp = generator.decoder.sequence_log_probs(memory, torch.cat([y, y]))
                a, b = [lp[: len(y)] for lp in logp], [lp[len(y):] for lp in logp]
                w = None if pair_weight is None else pair_weight[idx].to(device)
                nll = 0.5 * (identifier_nll(a, y, w) + identifier_nll(b, y, w))
                kl = rdrop_kl(a, b)
            else:
                logp = generator.decoder.sequence_log_probs(memory, y)
                w = None if pair_weight is None else pair_weight[idx].to(device)
                nll, kl = identifier_nll(logp, y, w), torch.zeros(())
            loss = nll + cfg.rdrop_weight * kl
            if distill_mask is not None:
                student = logp if cfg.rdrop_weight <= 0 else [lp[: len(y)] for lp in logp]
                t_states, t_mask = teacher_states(teacher, frozen_states, mask, vectors[idx].to(device)
                                                  if cache is None else None)
                loss = loss + distill_weight * teacher_kl(teacher, t_states, t_mask, y, student,
                                                          distill_mask[idx].to(device))
            opt.zero_grad()
            loss.backward()
            if parallel.sync_grads is not None:
                parallel.sync_grads(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            sums += np.array([loss.item(), nll.item(), kl.item()]) * len(y)
            seen += len(y)
        for key, value in zip(("loss", "nll", "kl"), sums / max(seen, 1)):
            history[key].append(float(value))
        history.setdefault("epoch_s", []).append(round(time.perf_counter() - epoch_start, 4))  # steps only
        bar.set_postfix(nll=f"{history['nll'][-1]:.3f}", kl=f"{history['kl'][-1]:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
        if checkpoint is not None:
            checkpoint(epoch, history, opt, sched)
    generator.eval()
    history["train_s"] = time.perf_counter() - start_time
    history["pairs"] = int(len(targets))
    history["steps_per_epoch"] = int(min(steps_per_epoch, math.ceil(len(targets) / cfg.batch_size)))
    return history


@torch.no_grad()
def teacher_states(teacher: Generator, frozen: torch.Tensor, mask: torch.Tensor,
                   vectors: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's encoder states: its own vector encoder for vector queries; for text, the frozen
    layers' cached states with the teacher's own tuned top layers (if any) run on top."""
    if vectors is not None:
        return teacher.encode_queries(vectors)
    tuned = teacher.tuned_encoder_layers()
    if not tuned:
        return frozen, mask
    n = len(tuned)
    top = teacher.text_encoder.run_top_layers(frozen[:, -n - 1], mask, n)
    return torch.cat([frozen[:, :-n], top], dim=1), mask


def teacher_kl(teacher: Generator, states: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor,
               student: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of weight x sum over positions of KL(teacher || student), teacher-forced.
    A position whose vocabulary the student has widened is compared on the teacher's tokens: mass
    the student moves to tokens the teacher never had counts against it."""
    with torch.no_grad():
        target = teacher.decoder.sequence_log_probs(teacher.decoder.prepare_memory(states, mask), codes)
    total = torch.zeros(len(codes), device=codes.device)
    for t, s in zip(target, student):
        total = total + (t.exp() * (t - s[:, : t.shape[1]])).sum(-1)
    return (weight * total).sum() / max(len(codes), 1)
