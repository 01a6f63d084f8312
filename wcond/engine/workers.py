"""Where the per-layer work runs: in this process, or as tasks on a Ray cluster.

The commands split their work into :class:`Task` s (one checkpoint and one layer, or a group of
small layers). A task names its tensors by key and carries the checkpoint's path, so whoever
runs it reads those tensors itself and the driver never holds the whole model. Each command
passes one module-level function, the same one its local path calls, to :meth:`Engine.map`.

Ray is an optional extra (``pip install 'wcond[ray]'``), imported only when a RayEngine starts.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from wcond.defaults import ProgressFn
from wcond.errors import CheckpointError, EngineError, UsageError, WcondError

R = TypeVar("R")

# Layers below this many parameters share a task with their neighbours, so that a task's
# scheduling and checkpoint-opening cost (milliseconds) stays small beside its compute.
TASK_MIN_PARAMS = 1 << 22
RAY_INSTALL = "pip install 'wcond[ray]'"
# Ray re-runs a task whose worker died this many times before the run fails (Ray's default).
RAY_MAX_RETRIES = 3


@dataclass(frozen=True)
class Task:
    """A unit of work: these layers (tensor keys) of the checkpoint at ``path``."""

    path: str
    keys: tuple[str, ...]
    params: int

    def describe(self) -> str:
        """The layer(s) the task covers, for messages."""
        shown = ", ".join(repr(k) for k in self.keys[:3])
        more = f" and {len(self.keys) - 3} more" if len(self.keys) > 3 else ""
        return f"{Path(self.path).name}: layer{'s' if len(self.keys) > 1 else ''} {shown}{more}"


def plan_tasks(
    path: str | Path, layers: Sequence[tuple[str, int]], min_params: int | None = None
) -> list[Task]:
    """Split (key, params) layers, in order, into tasks: large layers alone, small neighbours grouped.

    Example:
        >>> plan_tasks("m.pt", [("a", 10), ("b", 10), ("big", 1 << 23)], min_params=100)
        [Task(path='m.pt', keys=('a', 'b'), params=20), Task(path='m.pt', keys=('big',), ...)]
    """
    min_params = TASK_MIN_PARAMS if min_params is None else min_params
    tasks: list[Task] = []
    keys: list[str] = []
    params = 0
    for key, n in layers:
        if n >= min_params:
            tasks.append(Task(str(path), (key,), n))
            continue
        keys.append(key)
        params += n
        if params >= min_params:
            tasks.append(Task(str(path), tuple(keys), params))
            keys, params = [], 0
    if keys:
        tasks.append(Task(str(path), tuple(keys), params))
    return tasks


def open_on_worker(path: str) -> Path:
    """The checkpoint path as this worker sees it, or an error saying the cluster needs it shared."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{path}: not found on the worker at {socket.gethostname()}; the checkpoint must be on a "
            "filesystem every Ray node mounts at the same path (NFS, a shared volume) or copied to "
            "the same path on every node"
        )
    return p


class Engine(Protocol):
    """Runs ``fn(task, *args)`` for every task and returns the results in task order."""

    name: str

    def map(
        self,
        fn: Callable[..., R],
        tasks: Sequence[Task],
        *args: Any,
        gpu: bool = False,
        progress: ProgressFn | None = None,
    ) -> list[R]: ...


class LocalEngine:
    """Every task in this process, one after the other."""

    name = "local"

    def map(
        self,
        fn: Callable[..., R],
        tasks: Sequence[Task],
        *args: Any,
        gpu: bool = False,
        progress: ProgressFn | None = None,
    ) -> list[R]:
        out = []
        for i, task in enumerate(tasks):
            if progress:
                progress(i, len(tasks), task.keys[0])
            out.append(fn(task, *args))
        if progress:
            progress(len(tasks), len(tasks), "")
        return out


LOCAL = LocalEngine()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise UsageError(f"running on Ray needs the ray package: {RAY_INSTALL}") from e
    return ray


class RayEngine:
    """Tasks on a Ray cluster: the one ``address`` names, else ``RAY_ADDRESS``, else a new local one.

    Args:
        address: what ``ray.init(address=...)`` accepts (``ray://host:10001``, ``host:6379``,
            ``auto``); None uses the ``RAY_ADDRESS`` environment variable, and without it starts a
            local instance (never an unrelated one left running on this machine).
        num_cpus: CPUs of a local instance (default: all).
        init_kwargs: more keyword arguments for ``ray.init``.

    If Ray is already initialized in this process, that instance is used and left running.
    Use as a context manager (or call :meth:`close`) to stop an instance this engine started.

    Example:
        >>> with wcond.engine.RayEngine() as ray_engine:
        ...     report = wcond.inspect("model.safetensors", engine=ray_engine)
    """

    name = "ray"

    def __init__(
        self, address: str | None = None, *, num_cpus: int | None = None, **init_kwargs: Any
    ):
        self.ray = _import_ray()
        self._started = False
        if not self.ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or "local"
            kwargs: dict[str, Any] = {
                "address": address,
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,  # Ray's start-up chatter is not wcond's output
                **init_kwargs,
            }
            if address == "local" and num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
            try:
                self.ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise UsageError(f"cannot join the Ray cluster at {address!r}: {e}") from e
            self._started = True

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the Ray instance if this engine started it."""
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False

    def map(
        self,
        fn: Callable[..., R],
        tasks: Sequence[Task],
        *args: Any,
        gpu: bool = False,
        progress: ProgressFn | None = None,
    ) -> list[R]:
        ray = self.ray
        if gpu and ray.cluster_resources().get("GPU", 0) < 1:
            raise UsageError(
                "device='cuda' on Ray asks one GPU per task, and this Ray cluster has no GPU; "
                "add GPU nodes or run on the CPU workers with device='cpu'"
            )
        remote = ray.remote(fn).options(
            num_gpus=1 if gpu else 0, max_retries=RAY_MAX_RETRIES, retry_exceptions=False
        )
        shared = [ray.put(a) for a in args]  # shipped once, not once per task
        refs = [remote.remote(task, *shared) for task in tasks]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        done = 0
        if progress:
            progress(0, len(refs), "")
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=None)
                for ref in ready:
                    i = index[ref]
                    try:
                        results[i] = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        raise _task_error(tasks[i], e.cause if e.cause is not None else e) from e
                    except ray.exceptions.RayError as e:
                        raise EngineError(
                            f"{tasks[i].describe()}: the task failed after {RAY_MAX_RETRIES} "
                            f"retries: {type(e).__name__}: {_first_line(e)}"
                        ) from e
                    done += 1
                    if progress:
                        progress(done, len(refs), f"{tasks[i].keys[-1]} ({done}/{len(refs)} tasks)")
        except BaseException:
            for ref in pending:  # never leave a half-finished run computing on the cluster
                ray.cancel(ref, force=True)
            raise
        return results


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _task_error(task: Task, cause: BaseException) -> Exception:
    """A failed task's exception, as the driver raises it: the layer named first."""
    if isinstance(cause, WcondError):
        # Keep the library's own error type (a checkpoint the workers cannot see stays a CheckpointError).
        return type(cause)(f"{task.describe()}: {cause}", params=cause.params)
    return EngineError(f"{task.describe()}: {type(cause).__name__}: {_first_line(cause)}")
