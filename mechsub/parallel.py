"""Data-parallel training over several GPUs or machines with Hugging Face accelerate (``launcher="accelerate"``).

Run under ``accelerate launch -m mechsub.cli student ... --set launcher=accelerate``: every process loads the model
on its own device, takes every ``world``-th item of each step's batch, and the gradients are summed across
processes after each backward, with each process's loss weighted by its share of the batch's loss positions, so
an update equals the single-process one (up to float summation order). No DDP wrapper: the training loop calls
the decoder and the head separately, which a DDP module would not see. Only the main process writes (the run
folder, checkpoints); the others follow its decisions (:func:`stage`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from mechsub.config import Config
from mechsub.device import need
from mechsub.runs import Run
from mechsub.runs import stage as run_stage

Launcher = Literal["single", "accelerate"]
T = TypeVar("T")


@dataclass
class Parallel:
    """This process's place in a data-parallel run; the default is a run of one process (no accelerate)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # the device accelerate gave this process (None: the stage's own)
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Sequence[T]) -> list[T]:
        """This process's items of a step's batch: every ``world``-th, from its rank."""
        return list(batch[self.rank :: self.world])

    def share(self, part: Sequence[Any], whole: Sequence[Any]) -> float:
        """The fraction of the batch's loss weight (positions, or position weights where items carry them) that
        ``part`` holds: the mean over ``part`` times this, summed over processes, is the mean over ``whole``."""
        return _weight(part) / max(_weight(whole), 1e-12)

    def nothing(self, params: Sequence[Tensor]) -> Tensor:
        """A zero loss with a (zero) gradient for every parameter, for a process whose shard is empty."""
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=params[0].device))

    def sync(self, params: Sequence[Tensor]) -> None:
        """Sum the gradients of ``params`` across processes (in place)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                p.grad.copy_(self.accelerator.reduce(p.grad, reduction="sum"))

    def total(self, loss: Tensor) -> float:
        """The step's loss over the whole batch (the sum of the processes' weighted losses)."""
        if self.world == 1:
            return loss.item()
        return float(self.accelerator.reduce(loss.detach().reshape(1), reduction="sum")[0])

    def agree(self, value: T) -> T:
        """The main process's ``value``, on every process."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]  # type: ignore[no-any-return]

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()


def _weight(items: Sequence[Any]) -> float:
    return float(sum(float(it.weight.sum()) if it.weight is not None else it.n_positions for it in items))


def start(launcher: Launcher) -> Parallel:
    """This process's :class:`Parallel` for a stage's ``launcher``."""
    if launcher == "single":
        return Parallel()
    accelerate = need("accelerate", "accelerate", "launcher='accelerate'")
    acc = accelerate.Accelerator()
    return Parallel(acc.process_index, acc.num_processes, acc.device, acc)


class _Follower(Run):
    """A non-main process's view of the run: the main process writes the folder, this one only computes."""

    def unit(self, key: str, compute: Any) -> Any:
        return compute()

    def finish(self, metrics: dict[str, Any]) -> None:
        self.metrics, self.done = metrics, True


@contextmanager
def stage(
    par: Parallel,
    out: str | Path,
    config: Config,
    *,
    model: dict[str, Any] | None = None,
    force: bool = False,
) -> Iterator[Run]:
    """:func:`mechsub.runs.stage` for a possibly data-parallel run: the main process holds the folder and its lock
    and tells the others whether the run is already finished."""
    if par.world == 1:
        with run_stage(out, config, model=model, force=force) as r:
            yield r
        return
    if par.is_main:
        with run_stage(out, config, model=model, force=force) as r:
            par.agree(r.done)
            yield r
        return
    yield _Follower(Path(out), config, done=par.agree(False))
