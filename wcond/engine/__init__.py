"""Where the work runs: the device a layer is computed on, and the engine that runs the tasks
(in this process, or on a Ray cluster)."""

from wcond.engine.workers import (
    LOCAL,
    TASK_MIN_PARAMS,
    Engine,
    LocalEngine,
    RayEngine,
    Task,
    open_on_worker,
    plan_tasks,
)

__all__ = [
    "LOCAL",
    "TASK_MIN_PARAMS",
    "Engine",
    "LocalEngine",
    "RayEngine",
    "Task",
    "open_on_worker",
    "plan_tasks",
]
