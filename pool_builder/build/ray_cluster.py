"""Reaching Ray: the backend's options, joining or starting a cluster, and Ray's failures as one-line errors.

Ray is imported only through :func:`import_ray`, and only for ``--backend ray``.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any, Callable

from pool_builder.errors import PoolBuilderError, unknown_name

Log = Callable[[str], None]
CACHE_TRANSPORTS = ("object_store", "shared_path")
EVAL_BATCH = 512  # run_batched's batch: shard borders on its multiples give the local build's exact batches
DEFAULT_RAY_PORT = 6379


@dataclass(frozen=True)
class RayOptions:
    """How to reach Ray and how to cut the work; none of it changes what the build produces."""

    address: str | None = None  # None: start a private Ray on this machine; else host:port, ray://..., or auto
    num_cpus: int | None = None  # CPUs of a private Ray (default: all of this machine's)
    object_store_mb: int = 512  # object store of a private Ray
    connect_timeout_s: float = 10.0
    max_retries: int = 3  # per task, after its worker process dies
    task_cpus: float | None = None  # CPUs Ray reserves per task (default: the build's torch threads)
    shard_rows: int = 4096
    cache_via: str = "object_store"  # how workers get the caches: object_store, or shared_path (same pool dir)

    def __post_init__(self) -> None:
        if self.cache_via not in CACHE_TRANSPORTS:
            raise unknown_name("cache transport", self.cache_via, list(CACHE_TRANSPORTS))
        if self.shard_rows < EVAL_BATCH or self.shard_rows % EVAL_BATCH:
            raise PoolBuilderError(f"shard rows must be a positive multiple of {EVAL_BATCH} (so that shards "
                                   f"batch like the local build), got {self.shard_rows}")
        if self.max_retries < 0:
            raise PoolBuilderError(f"max retries must be >= 0, got {self.max_retries}")
        if self.task_cpus is not None and self.task_cpus <= 0:
            raise PoolBuilderError(f"CPUs per task must be positive, got {self.task_cpus}")
        if self.connect_timeout_s <= 0:
            raise PoolBuilderError(f"connect timeout must be positive, got {self.connect_timeout_s}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise PoolBuilderError(f"Ray CPUs must be >= 1, got {self.num_cpus}")
        if self.object_store_mb < 80:
            raise PoolBuilderError(f"object store must be >= 80 MB (Ray's minimum), got {self.object_store_mb}")


def ray_options(args: Any) -> RayOptions:
    """RayOptions from the CLI's ``--address`` / ``--ray-*`` flags (unset flags keep the defaults)."""
    given = {"address": args.address, "num_cpus": args.ray_cpus, "object_store_mb": args.ray_object_store_mb,
             "max_retries": args.ray_max_retries, "task_cpus": args.ray_task_cpus, "shard_rows": args.ray_shard_rows,
             "cache_via": args.ray_cache_via, "connect_timeout_s": args.ray_connect_timeout}
    return RayOptions(**{k: v for k, v in given.items() if v is not None})


def import_ray() -> Any:
    """The ``ray`` module, or a PoolBuilderError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise PoolBuilderError("--backend ray needs Ray: pip install 'pool-of-experts-edge[ray]' "
                               f"(or pip install 'ray>=2.9'); import failed: {exc}") from None
    return ray


def parse_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` to probe for an address, or None for ``auto`` (Ray finds a cluster on this machine)."""
    if address == "auto":
        return None
    bare = address.split("://", 1)[1] if "://" in address else address
    host, _, port = bare.rpartition(":") if ":" in bare else (bare, "", str(DEFAULT_RAY_PORT))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PoolBuilderError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto "
                               f"(e.g. 10.0.0.5:{DEFAULT_RAY_PORT})")
    return host.strip("[]"), int(port)


def probe(address: str, timeout_s: float) -> None:
    """Fail within ``timeout_s`` when nothing listens at ``address`` (ray.init itself may retry for minutes)."""
    target = parse_address(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout_s).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise PoolBuilderError(f"Ray cluster at {address} does not answer ({reason} after at most {timeout_s:g}s); "
                               "start one with `ray start --head` or check --address") from None


def connect(opts: RayOptions, log: Log) -> bool:
    """Attach to (or start) Ray; True when this call did, so the caller shuts it down again."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, configure_logging=True)
    if opts.address is None:
        ray.init(num_cpus=opts.num_cpus, object_store_memory=opts.object_store_mb << 20, include_dashboard=False,
                 **quiet)
    else:
        probe(opts.address, opts.connect_timeout_s)
        try:
            ray.init(address=opts.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise PoolBuilderError(f"could not join the Ray cluster at {opts.address}: {first}") from None
    log(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs in the cluster "
        f"({'private, this machine' if opts.address is None else opts.address})")
    return True


def ray_get(ray: Any, ref: Any, what: str) -> Any:
    """``ray.get`` with Ray's failures turned into one-line PoolBuilderErrors."""
    from ray import exceptions as rex

    try:
        return ray.get(ref)
    except rex.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        raise PoolBuilderError(f"{what} failed on a Ray worker: {type(cause).__name__}: "
                               f"{str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else ''}") from None
    except (rex.WorkerCrashedError, rex.NodeDiedError, rex.TaskCancelledError, rex.ObjectLostError,
            rex.RaySystemError, rex.RayActorError) as exc:
        raise PoolBuilderError(f"{what}: its Ray worker kept dying ({type(exc).__name__}) after the allowed retries; "
                               "finished work is kept, run the build again to resume") from None


def drain(ray: Any, pending: dict[Any, Any], handle: Callable[[Any, Any], None]) -> None:
    """Hand each task to ``handle`` as it finishes; on any exception (Ctrl-C included) cancel the rest."""
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            handle(ready[0], pending.pop(ready[0]))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
