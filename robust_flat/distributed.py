"""Multi-host data parallelism through JAX's multi-controller runtime (``jax.distributed``).

One Python process per host (or per GPU) runs the same program; :func:`initialize` connects them before any JAX
computation, after which ``jax.devices()`` lists the devices of all processes and a jitted step over a mesh of them
runs the cross-process collectives (NCCL on GPU, gloo over TCP on CPU). The trainer then needs two things from this
module: :func:`initialize`, and :func:`global_batch`, which builds the global batch array from the rows that this
process's devices hold, so each process gathers only its share of every batch.

Launching: see the README ("Multi-host"); under SLURM, Open MPI or on a TPU pod ``auto=True`` finds the coordinator,
process count and process id in the environment (``jax.distributed.initialize()`` with no arguments).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import numpy as np


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = False) -> bool:
    """Start the multi-controller runtime; returns whether it was started (``False``: single process, no-op).

    ``coordinator`` is ``HOST:PORT`` of process 0 (it listens there; every process passes the same value). Give all
    three of ``coordinator``, ``num_processes``, ``process_id``, or ``auto=True`` to detect the unset ones from the
    cluster environment (SLURM, Open MPI, TPU, Kubernetes). Must run before anything touches a JAX backend.

    Cross-process collectives on CPU use gloo (``jax_cpu_collectives_implementation``), unless the environment
    variable ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` chose another one (``mpi``).
    """
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if not auto and all(v is None for v in given.values()):
        return False
    if not auto and any(v is None for v in given.values()):
        missing = ", ".join(k for k, v in given.items() if v is None)
        raise ValueError(f"multi-process training needs the coordinator address, the number of processes and this "
                         f"process's id ({missing} missing); or use auto-detection under SLURM / Open MPI / TPU")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if coordinator is not None and (":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except ValueError as e:
        if auto:
            raise ValueError(f"no cluster environment detected for multi-process training ({e}); pass the "
                             "coordinator address, number of processes and process id explicitly") from e
        raise
    return True


def process_rows(sharding: jax.sharding.Sharding, batch_size: int) -> np.ndarray:
    """Rows of a global batch of ``batch_size`` (sharded along axis 0) held by this process's devices, in the
    order :func:`jax.make_array_from_process_local_data` expects them (ascending)."""
    slices = sharding.addressable_devices_indices_map((batch_size,)).values()
    starts = sorted({s[0].indices(batch_size)[:2] for s in slices})
    return np.concatenate([np.arange(a, b) for a, b in starts])


def global_batch(load_rows: Callable[[np.ndarray], dict], sharding: jax.sharding.Sharding, batch_size: int,
                 rows: Optional[np.ndarray] = None):
    """The global batch as a ``jax.Array`` sharded by ``sharding``, each process loading only its rows.

    ``load_rows(rows)`` returns a pytree of NumPy arrays whose leading axis are the batch rows ``rows``
    (positions within the global batch); ``rows`` defaults to :func:`process_rows` (pass it to skip recomputing).
    With one process this is ``jax.device_put(load_rows(all rows), sharding)``.
    """
    rows = process_rows(sharding, batch_size) if rows is None else rows
    local = load_rows(rows)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, a, (batch_size,) + a.shape[1:]), local)
