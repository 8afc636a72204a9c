"""The grid's pending runs on a Ray cluster: one Ray task per run, retried when its worker or node dies.

:func:`run_ray` is the Ray counterpart of :func:`apl.runner.run_parallel` (``python -m apl grid
--engine ray``). It connects to a cluster (``address``; none: it starts a local one and stops it at
the end), submits one task per run asking for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs (a
fraction packs several runs on one GPU), and records what the tasks report through the run book of
:mod:`apl.runner`, as the local engines do: the manifest (with the node each run ran on) and the
grid's bar, which counts every finished epoch across the cluster.

A task's body is the grid's own per-run path, :func:`apl.train.train` with ``resume=True`` into
``<runs>/<run name>/``: a finished run is returned as it is, an unfinished one resumes from its
last epoch checkpoint, and the run folder's lock (:mod:`apl.runlock`) keeps a second trainer off it.
Ray re-runs a task whose worker process or node died (``max_retries``), so the retry resumes from
the dead attempt's last checkpoint; a Python error in a run is not retried (it fails the run, the
grid carries on). The run folders must be on storage every node sees at the same path: each task
first checks that it sees the driver's grid folder and can write its run folder, and fails with
the folder and the node named when it cannot. Data a task cannot load (gone, damaged) stops the
grid once, with that one error; warnings a task's run logs (a damaged result set aside) come back
with its outcome and are printed by the driver.

Ray is an optional dependency (``pip install .[ray]``): it is imported only here, when the engine
runs, so that everything else works without it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from apl.config import TrainConfig
from apl.data import load_cifar10
from apl.errors import DataError, RayUnavailable
from apl.interrupts import Interrupted, graceful_stop
from apl.records import Manifest, run_summary
from apl.runlock import RunInUse
from apl.runner import Progress, RunBook, failure_text, with_execution
from apl.train import train

__all__ = ["RAY_INSTALL_HINT", "import_ray", "check_options", "run_ray"]

RAY_INSTALL_HINT = ("--engine ray needs Ray, an optional dependency not installed here: "
                    "pip install '.[ray]' in the project folder (or pip install ray), then run again")
#: Seconds the driver waits for a task to end before polling the progress reports again.
_POLL_S = 0.5
#: Seconds a task waits for a run folder's lock before leaving the run busy: after a driver is killed,
#: Ray takes a moment to end its tasks, whose locks a rerun would otherwise find held.
_BUSY_GRACE_S = 10.0
#: Seconds the driver waits, after a stop, for the cancelled tasks to reach their safe point.
_STOP_WAIT_S = 60.0
#: The grid folder's marker a task must see: proof that its node mounts the driver's folder.
_MARKER_PREFIX = ".ray-driver-"
log = logging.getLogger("apl.ray_engine")


def import_ray():
    """The ``ray`` module, or :class:`~apl.errors.RayUnavailable` saying how to install it."""
    try:
        import ray  # here, not at the top: Ray is an optional dependency of this engine alone
    except ImportError:
        raise RayUnavailable(RAY_INSTALL_HINT) from None
    return ray


def check_options(*, address: str | None = None, gpus_per_run: float | None = None, cpus_per_run: int = 1,
                  max_retries: int = 3) -> dict:
    """The engine's options, checked (``ValueError`` naming the bad one); Ray must be importable and a
    ``host:port`` address must answer (:class:`~apl.errors.RayUnavailable` otherwise)."""
    import_ray()
    if address:
        _check_reachable(address)
    if gpus_per_run is not None:
        if isinstance(gpus_per_run, bool) or not isinstance(gpus_per_run, (int, float)) or gpus_per_run < 0:
            raise ValueError(f"--gpus-per-run must be a number >= 0, got {gpus_per_run!r}")
        if gpus_per_run > 1 and gpus_per_run != int(gpus_per_run):
            raise ValueError(f"--gpus-per-run above 1 must be a whole number (Ray's rule), got {gpus_per_run}")
    if isinstance(cpus_per_run, bool) or not isinstance(cpus_per_run, int) or cpus_per_run < 1:
        raise ValueError(f"--cpus-per-run must be an integer >= 1 (a run's CPU threads), got {cpus_per_run!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"--max-retries must be an integer >= 0, got {max_retries!r}")
    return dict(address=address, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, max_retries=max_retries)


# --------------------------------------------------------------------------- the task (on a worker)

def _node() -> dict:
    """The node this task runs on: host name, IP and Ray node id."""
    ray = import_ray()
    return {"host": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
            "id": ray.get_runtime_context().get_node_id()}


def _node_text(node: dict) -> str:
    return f"{node['host']} ({node['ip']}, Ray node {node['id'][:12]})"


def _storage_problem(runs_dir: Path, marker: str, run_dir: Path, node: dict) -> str | None:
    """Why this worker cannot train into ``run_dir`` (None when it can): it must see the driver's
    grid folder (its ``marker``) and be able to write the run folder."""
    if not (runs_dir / marker).is_file():
        return (f"node {_node_text(node)} does not see the grid folder {runs_dir} that the driver writes "
                f"(its marker {marker} is missing there): the output folder must be on storage every node "
                f"mounts at the same path (docs/clusters.md, 'Several machines')")
    probe = run_dir / f".write-check-{uuid.uuid4().hex[:8]}"
    try:
        run_dir.mkdir(exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return (f"node {_node_text(node)} cannot write the run folder {run_dir} ({e.strerror or e}): "
                f"the output folder must be writable from every node")
    return None


@functools.lru_cache(maxsize=1)
def _dataset(data_dir: str):
    """CIFAR-10 from ``data_dir``, loaded once per worker process (Ray reuses workers across tasks)."""
    return load_cifar10(data_dir, download=False)


def _report(events, *event) -> None:
    """Put ``event`` in the driver's queue; ``put`` returns once it is there, so a task's reports all
    precede its result. A lost queue costs the bar an update, never the run."""
    ray = import_ray()
    with contextlib.suppress(ray.exceptions.RayError):
        events.put(event)


class _Collect(logging.Handler):
    """Keeps the messages of the warnings logged while a task runs (its worker's output is not shown)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _train_with_grace(cfg: TrainConfig, run_dir: Path, data, on_epoch) -> dict:
    """:func:`apl.train.train` (resume=True), waiting up to :data:`_BUSY_GRACE_S` for a lock still held."""
    deadline = time.monotonic() + _BUSY_GRACE_S
    while True:
        try:
            return train(cfg, run_dir, resume=True, progress=False, data=data, on_epoch=on_epoch)
        except RunInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _run_task(config: dict, runs_dir: str, marker: str, data_dir: str, device: str, threads: int,
              events) -> dict:
    """One run, as a Ray task: ``{"kind": done|busy|interrupted|fatal|failed, "payload", "node", "warnings"}``.

    ``kind`` and ``payload`` are those of :func:`apl.runner._worker`'s events, so the driver records
    them with the same run book; ``node`` says where the run trained, ``warnings`` what it logged.
    """
    collect = _Collect()
    logging.getLogger("apl").addHandler(collect)
    try:
        outcome = _run_task_body(config, runs_dir, marker, data_dir, device, threads, events)
    finally:
        logging.getLogger("apl").removeHandler(collect)
    return {**outcome, "warnings": collect.messages}


def _run_task_body(config: dict, runs_dir: str, marker: str, data_dir: str, device: str, threads: int,
                   events) -> dict:
    """:func:`_run_task` without the warnings."""
    node = _node()
    cfg = with_execution(TrainConfig.from_dict(config), device, threads, data_dir)
    name = cfg.run_name()
    run_dir = Path(runs_dir) / name
    problem = _storage_problem(Path(runs_dir), marker, run_dir, node)
    if problem is not None:
        return {"kind": "failed", "payload": problem, "node": node}
    _report(events, "start", name, node)
    try:
        result = _train_with_grace(cfg, run_dir, _dataset(data_dir),
                                   lambda rec: _report(events, "epoch", name, rec["epoch_time_s"]))
    except Interrupted as e:  # a stop (ray.cancel, or a signal to the worker) at the run's safe point
        return {"kind": "interrupted", "payload": e.signum, "node": node}
    except DataError as e:  # the data went (or is damaged): the grid stops, with this one message
        return {"kind": "fatal", "payload": f"{e} (on node {_node_text(node)})", "node": node}
    except RunInUse as e:
        return {"kind": "busy", "payload": str(e), "node": node}
    except Exception as e:  # noqa: BLE001 - reported to the driver, which carries on with the other runs
        return {"kind": "failed", "payload": f"{failure_text(e)} (on node {_node_text(node)})", "node": node}
    return {"kind": "done", "payload": run_summary(result), "node": node}


# --------------------------------------------------------------------------- the driver

def _check_reachable(address: str) -> None:
    """``ValueError`` when nothing answers at a ``host:port`` address: Ray itself would retry without end.
    Other forms (``auto``, ``ray://...``) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise RayUnavailable(f"no Ray cluster answers at {address} ({e.strerror or e}): start its head there "
                             f"(ray start --head --port={port}), or use --address auto on a node of the "
                             f"cluster") from None


def _connect(ray, address: str | None) -> bool:
    """Connect to ``address`` or start a local cluster; True when this call started the connection
    (and must end it). A process already connected (``ray.init`` called) keeps its connection."""
    if ray.is_initialized():
        return False
    # The workers' output would break the bar: what a run has to say comes back in its result.
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", include_dashboard=False, **quiet)  # "local": never join another cluster
    return True


def _plan_resources(ray, gpus_per_run: float | None, cpus_per_run: int) -> tuple[float, int]:
    """(GPUs per run, runs the cluster holds at once); ``ValueError`` when no node can take a run."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total_gpus = sum(r.get("GPU", 0) for r in nodes)
    if gpus_per_run is None:
        gpus_per_run = 1.0 if total_gpus else 0.0  # a GPU each where there are GPUs, else the CPUs
    fits = [r for r in nodes if r.get("CPU", 0) >= cpus_per_run and r.get("GPU", 0) >= gpus_per_run]
    if not fits:
        raise ValueError(f"no node of the Ray cluster has {cpus_per_run} CPU(s) and {gpus_per_run:g} GPU(s) for a "
                         f"run (nodes: {', '.join(_resources_text(r) for r in nodes) or 'none'}); "
                         "lower --cpus-per-run/--gpus-per-run")
    slots = sum(int(r.get("CPU", 0) // cpus_per_run) if not gpus_per_run else
                min(int(r.get("CPU", 0) // cpus_per_run), int(r.get("GPU", 0) / gpus_per_run + 1e-9))
                for r in fits)
    return float(gpus_per_run), max(1, slots)


def _resources_text(resources: dict) -> str:
    return f"{resources.get('CPU', 0):g} CPU/{resources.get('GPU', 0):g} GPU"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _write_marker(runs_dir: Path) -> str:
    """A fresh marker file in the grid folder, for the tasks' shared-storage check; its name. Markers
    left by killed drivers of this host (their pid is gone) are removed."""
    host = socket.gethostname()
    for old in runs_dir.glob(f"{_MARKER_PREFIX}{host}-*"):
        pid = old.name[len(f"{_MARKER_PREFIX}{host}-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                old.unlink()
    marker = f"{_MARKER_PREFIX}{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    (runs_dir / marker).write_text("the driver of a Ray grid: its tasks check that they see this file\n")
    return marker


def _record(book: RunBook, manifest: Manifest, name: str, outcome: dict) -> int | None:
    """Record a task's outcome with the run book; the signal number when it was interrupted."""
    kind, payload = outcome["kind"], outcome["payload"]
    for message in outcome.get("warnings", []):
        log.warning(message)
    manifest.run(name, node=outcome["node"])
    if kind == "done":
        book.ended(name, summary=payload)
    elif kind == "busy":
        book.set_aside(name, "busy", payload)
    elif kind == "interrupted":
        book.set_aside(name, "interrupted", str(Interrupted(payload)), quiet=True)
        return payload
    elif kind == "fatal":
        book.set_aside(name, "interrupted", f"the grid stopped: {payload}", quiet=True)
    else:
        book.ended(name, error=payload)
    return None


def _lost(error: Exception, retries: int) -> str:
    """A task that Ray could not complete (its worker or node died on every attempt), as a failure."""
    return f"Ray could not complete the task after {retries} retries: {type(error).__name__}: {error}"


class _Driver:
    """The submitted tasks, their progress reports, and what the run book makes of both."""

    def __init__(self, ray, refs: dict, events, book: RunBook, manifest: Manifest, retries: int, device: str):
        self.ray, self.refs, self.events, self.device = ray, refs, events, device
        self.book, self.manifest, self.retries = book, manifest, retries
        self.interrupted: int | None = None
        self.fatal: str | None = None  # the data error that stops the grid, once

    def _drain(self) -> None:
        in_flight = set(self.refs.values())
        try:
            waiting = self.events.size()  # only this driver takes from the queue: all of these are there
            reports = self.events.get_nowait_batch(waiting) if waiting else []
        except self.ray.exceptions.RayError:
            return  # the queue's node died: the bar misses reports, the runs' outcomes still come
        for kind, name, payload in reports:
            if name not in in_flight:
                continue  # a late report of a run already recorded
            if kind == "start":
                self.manifest.run(name, node=payload)
                self.book.started(name, self.device)
            else:
                self.book.epoch(name, payload)

    def _finish(self, ref) -> None:
        name = self.refs[ref]
        try:
            outcome = self.ray.get(ref)
        except self.ray.exceptions.TaskCancelledError:
            outcome = None
            self.book.set_aside(name, "interrupted", "cancelled by the stop of the grid", quiet=True)
        except self.ray.exceptions.RayError as e:
            outcome = None
            self.book.ended(name, error=_lost(e, self.retries))
        del self.refs[ref]
        if outcome is not None:
            signum = _record(self.book, self.manifest, name, outcome)
            self.interrupted = self.interrupted or signum
            if outcome["kind"] == "fatal":
                self.fatal = self.fatal or outcome["payload"]

    def wait(self, stop) -> None:
        """Record every task's reports and outcome until all ended; on a stop, or data no task can load,
        cancel them first."""
        cancelled_at = None
        while self.refs:
            done, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=_POLL_S)
            # Reports first: a task's reports were all in the queue before its result was ready.
            self._drain()
            for ref in done:
                self._finish(ref)
            if (stop.signum is not None or self.fatal is not None) and cancelled_at is None:
                cancelled_at = time.monotonic()
                for ref in self.refs:
                    self.ray.cancel(ref)  # not force: a run stops at its safe point, its checkpoint kept
            if cancelled_at is not None and time.monotonic() - cancelled_at > _STOP_WAIT_S:
                for ref, name in list(self.refs.items()):
                    self.book.set_aside(name, "interrupted", "did not stop in time after the grid's stop",
                                        quiet=True)
                    del self.refs[ref]


def run_ray(pending: list, runs_dir: Path, data_dir, manifest: Manifest, progress: Progress, *,
            address: str | None = None, gpus_per_run: float | None = None, cpus_per_run: int = 1,
            max_retries: int = 3) -> list:
    """Train ``pending`` on a Ray cluster, one task per run; return the failed run names.

    ``address``: the cluster to join (``auto``: the one this machine belongs to; None: start a
    local cluster for the grid, stopped at the end). ``gpus_per_run`` (default: 1 where the cluster
    has GPUs, else 0) and ``cpus_per_run`` (the run's CPU threads) are each task's resources;
    ``max_retries``: how many times a task whose worker or node died is run again. SIGINT/SIGTERM
    cancels the tasks, which stop at their runs' safe points, and raises
    :class:`~apl.interrupts.Interrupted`; so does data a task cannot load, raising that
    :class:`~apl.errors.DataError` (the grid looked for the data before: it must be there).
    """
    ray = import_ray()
    from ray.util.queue import Queue  # here, with ray: an optional dependency

    check_options(address=address, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, max_retries=max_retries)
    runs_dir, data_dir = Path(runs_dir).absolute(), Path(data_dir).absolute()
    started = _connect(ray, address)
    marker = events = None
    try:
        gpus, slots = _plan_resources(ray, gpus_per_run, cpus_per_run)
        progress.workers = max(1, min(slots, len(pending)))
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        progress.say(f"[grid] Ray cluster of {len(nodes)} node(s) "
                     f"({', '.join(_resources_text(n.get('Resources', {})) for n in nodes)}); each run takes "
                     f"{cpus_per_run} CPU and {gpus:g} GPU: up to {slots} at once")
        marker = _write_marker(runs_dir)
        here = ray.get_runtime_context().get_node_id()
        # Ray's own queue actor (no import of this package in its process), on the driver's node, taking
        # no CPU slot from the runs: where tasks report their start and each epoch.
        events = Queue(actor_options=dict(
            num_cpus=0, scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                here, soft=False)))
        task = ray.remote(_run_task).options(num_cpus=cpus_per_run, num_gpus=gpus, max_retries=max_retries,
                                             retry_exceptions=False)
        device = "cuda" if gpus else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU
        refs = {task.remote(cfg.to_dict(), str(runs_dir), marker, str(data_dir), device, cpus_per_run, events):
                cfg.run_name() for cfg in pending}
        book = RunBook(pending, manifest, progress)
        driver = _Driver(ray, refs, events, book, manifest, max_retries, device)
        with graceful_stop() as stop:
            try:
                driver.wait(stop)
            except BaseException as e:  # a second Ctrl-C: the runs it cut short say so
                book.abandon(e)
                raise
        signum = stop.signum or driver.interrupted
    finally:
        if marker is not None:
            with contextlib.suppress(OSError):
                (runs_dir / marker).unlink()
        if events is not None:
            with contextlib.suppress(Exception):  # cleanup only: a queue already gone is what we want
                events.shutdown(force=True)
        if started:
            ray.shutdown()
    if driver.fatal is not None:
        raise DataError(driver.fatal)
    if signum is not None:
        raise Interrupted(signum)
    return book.failures
