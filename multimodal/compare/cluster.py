"""Running a study's runs as Ray tasks (`multimodal compare STUDY --engine ray`).

Each run is one task with its own CPU (and GPU) request, on an existing Ray cluster (`address`) or
on a Ray instance started here for the study and stopped after it. Ray is an optional extra
(`pip install ".[cluster]"`); nothing imports it unless this engine is chosen.

A task returns the run's results; the driver writes `runs/<run id>/done.json` itself, so a study
is resumable on the driver's side whether or not the cluster's nodes share its filesystem. Model
checkpoints are written where the task ran: on a cluster without a shared filesystem they stay on
that node (the report needs only the results).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from multimodal.types import InputError

# Ray's usage statistics would phone home; nothing in this package reaches the network unasked
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def import_ray():
    try:
        import ray
    except ImportError:  # an optional extra
        raise InputError("the ray engine needs Ray: pip install \".[cluster]\" (or pip install ray), "
                         "or use the default local engine") from None
    return ray


def run_tasks(job: Callable, jobs: Iterable[tuple[str, tuple]], on_result: Callable[[str, Any], None],
              address: str | None = None, cpus: float = 1, gpus: float = 0) -> None:
    """`job(*args)` for each `(run_id, args)` of `jobs` as a Ray task asking for `cpus` CPUs and `gpus`
    GPUs; `on_result(run_id, returned)` on the driver as each finishes, in the order they finish.

    Joins the cluster at `address` (a Ray address such as "ray://head:10001" or "auto"), or the Ray
    instance this process already started, or else starts a local one with this machine's cores and
    stops it afterwards.
    """
    ray = import_ray()
    if cpus <= 0 or gpus < 0:
        raise InputError(f"cpus per run = {cpus} must be > 0 and gpus per run = {gpus} >= 0")
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": os.cpu_count() or 1}))
        except ConnectionError as e:
            raise InputError(f"could not join the Ray cluster at {address!r}: {e}. Start one with `ray start "
                             "--head` (or leave out --address for a local instance)") from None
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(job)
        pending = {task.remote(*args): run_id for run_id, args in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            run_id = pending.pop(ready[0])
            on_result(run_id, ray.get(ready[0]))
    finally:
        if started:
            ray.shutdown()
