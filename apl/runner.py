"""Running a grid's pending runs: in this process, or one worker process per device; the progress bar.

:func:`run_sequential` trains the runs one after another here; :func:`run_parallel` starts one
spawned worker per device, each taking configs from a shared queue and reporting events back
(``(kind, worker index, run name, payload)``: start, epoch, done, failed, busy, interrupted,
fatal, exit). A run's result depends only on its config, so both give the same records. Either way
the manifest is updated as each run starts and ends, and one failed run does not stop the others;
data that a worker cannot load (gone, damaged) stops the grid once, with that one error.
SIGINT or SIGTERM stops the grid at a safe point: the grid process passes the stop on to its
workers (each in its own process group, so that a terminal's Ctrl-C reaches them once, through
it), waits for them to stop, and raises :class:`~apl.interrupts.Interrupted`; a second signal
stops everything at once, and the runs it cut short are marked ``interrupted`` on the way out.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from apl.config import TrainConfig
from apl.data import load_cifar10
from apl.errors import DataError, show_warnings
from apl.interrupts import Interrupted, graceful_stop
from apl.records import Manifest, run_summary
from apl.runlock import RunInUse
from apl.train import train

__all__ = ["Progress", "RunBook", "with_execution", "failure_text", "run_sequential", "run_parallel"]

#: Seconds the grid waits for a worker's event before checking that the workers still live (a
#: worker stopped while it still starts up exits without a word).
_EVENT_WAIT_S = 1.0


def _hours_minutes_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """The grid's bar (one step per epoch, so its ETA is meaningful) and the time projection."""

    def __init__(self, total_epochs: int, workers: int, show: bool):
        self.remaining = total_epochs
        self.workers = workers
        self.projected = False
        self.bar = None
        if show and total_epochs:
            self.bar = tqdm(total=total_epochs, desc="grid", unit="epoch", position=0,
                            dynamic_ncols=True, file=sys.stderr)

    def say(self, msg: str) -> None:
        """Print a line to stderr without breaking the bar."""
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def epoch(self, run: str, epoch_time: float) -> None:
        """One epoch of ``run`` ended; the first one also projects the grid's remaining time."""
        self.remaining -= 1
        if not self.projected:
            self.projected = True
            eta = epoch_time * self.remaining / self.workers
            self.say(f"[grid] first epoch ({run}) took {epoch_time:.1f} s; projected time for the "
                     f"remaining {self.remaining} epochs on {self.workers} worker(s): "
                     f"~{_hours_minutes_seconds(eta)}")
        if self.bar is not None:
            self.bar.update(1)

    def skip(self, epochs: int) -> None:
        """A run ended without reporting every epoch (it resumed, or failed)."""
        self.remaining -= epochs
        if self.bar is not None:
            self.bar.update(epochs)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def with_execution(config: TrainConfig, device: str, threads: int | None, data_dir) -> TrainConfig:
    """``config`` placed on ``device`` with ``threads`` and ``data_dir`` (its identity unchanged)."""
    fields = config.to_dict()
    fields.update(device=device, num_threads=threads, data_dir=str(data_dir))
    return TrainConfig.from_dict(fields)


def failure_text(error: Exception) -> str:
    """How a run's error is recorded: its type and message."""
    return f"{type(error).__name__}: {error}"


class RunBook:
    """The manifest and the bar, kept up to date as runs start, finish epochs and end."""

    def __init__(self, pending: list, manifest: Manifest, progress: Progress):
        self.manifest, self.progress = manifest, progress
        self.epochs = {c.run_name(): c.epochs for c in pending}
        self.seen: dict[str, int] = {}
        self.failures: list[str] = []
        self.running: set[str] = set()

    def started(self, name: str, device: str) -> None:
        self.running.add(name)
        self.manifest.run(name, status="running", device=device)
        self.manifest.save()

    def epoch(self, name: str, epoch_time: float) -> None:
        self.seen[name] = self.seen.get(name, 0) + 1
        self.progress.epoch(name, epoch_time)

    def ended(self, name: str, error: str | None = None, summary: dict | None = None) -> None:
        """Run ``name`` ended: with ``error`` (a failure) or its manifest ``summary``."""
        self.running.discard(name)
        if error is not None:
            self.failures.append(name)
            self.manifest.run(name, status="failed", error=error)
            self.progress.say(f"[grid] run {name} failed: {error}")
        else:
            self.manifest.run(name, **summary)
        self.progress.skip(self.epochs[name] - self.seen.get(name, 0))
        self.manifest.save()

    def set_aside(self, name: str, status: str, why: str, *, quiet: bool = False) -> None:
        """Run ``name`` stopped unfinished, not failed: ``busy`` (another process trains it) or
        ``interrupted`` (a signal); a later grid picks it up. ``quiet``: the grid's own message follows."""
        self.running.discard(name)
        self.manifest.run(name, status=status, error=why)
        if not quiet:
            self.progress.say(f"[grid] run {name} {status}: {why}")
        self.progress.skip(self.epochs[name] - self.seen.get(name, 0))
        self.manifest.save()

    def abandon(self, error: BaseException) -> None:
        """The grid stops at once on ``error`` (a second Ctrl-C, a failure of its own): mark the runs still
        running ``interrupted`` and save, as far as the disk lets it (``error`` is what the caller raises)."""
        why = ("stopped at once by a second Ctrl-C" if isinstance(error, KeyboardInterrupt) else
               f"the grid stopped: {failure_text(error)}")
        for name in sorted(self.running):
            self.manifest.run(name, status="interrupted", error=f"{why}; run the grid again to resume it")
        self.running.clear()
        with contextlib.suppress(Exception):  # a manifest that cannot be saved must not hide ``error``
            self.manifest.save()


def run_sequential(pending: list, runs_dir: Path, device: tuple, data_dir, manifest: Manifest,
                   progress: Progress, show: bool) -> list:
    """Train ``pending`` here, one after another, on ``device`` = (name, threads); return the failed run names."""
    book = RunBook(pending, manifest, progress)
    # One stop request for the whole grid (each run shares it): a signal between runs stops it too.
    with graceful_stop() as stop:
        data = load_cifar10(data_dir, download=False)  # the grid found it (or downloaded it) already
        try:
            for cfg in pending:
                stop.check()
                _train_one(cfg, book, runs_dir, device, data_dir, data, show)
        except Interrupted:
            raise
        except BaseException as e:  # a second Ctrl-C: the run it cut short says so
            book.abandon(e)
            raise
    return book.failures


def _train_one(cfg: TrainConfig, book: RunBook, runs_dir: Path, device: tuple, data_dir, data, show: bool) -> None:
    """Train one run of :func:`run_sequential` and record how it ended."""
    cfg = with_execution(cfg, device[0], device[1], data_dir)
    name = cfg.run_name()
    book.started(name, device[0])
    try:
        result = train(cfg, runs_dir / name, resume=True, progress=show, data=data,
                       on_epoch=lambda record: book.epoch(name, record["epoch_time_s"]))
    except Interrupted as e:  # a stop asked for by a signal ends the grid, at this run's safe point
        book.set_aside(name, "interrupted", str(e), quiet=True)
        raise
    except RunInUse as e:
        book.set_aside(name, "busy", str(e))
    except Exception as e:  # noqa: BLE001 - one failed run must not stop a long grid
        book.ended(name, error=failure_text(e))
    else:
        book.ended(name, summary=run_summary(result))


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the grid process dies (e.g. SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(index: int, device: str, threads, data_dir: str, runs_dir: str, tasks, events) -> None:
    """Worker process ``index``: take configs from ``tasks`` until None, train each on ``device``;
    a stop passed on by the grid process ends the run in progress at its safe point, and the worker; so
    does data it cannot load (``fatal``: no run of this grid can train)."""
    _die_with_parent()
    os.setpgrp()  # a terminal's Ctrl-C goes to the grid process alone, which passes the stop on once
    show_warnings()
    if threads:
        torch.set_num_threads(threads)
    data = None
    # One stop request for the worker's life (its runs share it): a stop between runs counts too.
    with graceful_stop() as stop:
        while True:
            item = tasks.get()
            if item is None or stop.signum is not None:
                break
            cfg = with_execution(TrainConfig.from_dict(item), device, threads, data_dir)
            name = cfg.run_name()
            events.put(("start", index, name, device))
            try:
                if data is None:
                    data = load_cifar10(data_dir, download=False)
                result = train(cfg, Path(runs_dir) / name, resume=True, progress=False, data=data,
                               on_epoch=lambda rec: events.put(("epoch", index, name, rec["epoch_time_s"])))
            except Interrupted as e:  # the grid passed a stop on: no more runs
                events.put(("interrupted", index, name, e.signum))
                break
            except DataError as e:  # the data went (or is damaged): the grid stops, with this one message
                events.put(("fatal", index, name, str(e)))
                break
            except RunInUse as e:
                events.put(("busy", index, name, str(e)))
            except Exception as e:  # noqa: BLE001 - reported to the grid, which carries on
                events.put(("failed", index, name, failure_text(e)))
            else:
                events.put(("done", index, name, run_summary(result)))
    events.put(("exit", index, None, None))


def _pass_stop_to(procs: list):
    """``on_stop`` for :func:`graceful_stop`: send the signal to each worker still running."""
    def pass_on(signum: int) -> None:
        for p in procs:
            if p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signum)
    return pass_on


def _collect(events, procs: list, devices: list, book: RunBook, stop_workers) -> tuple[int | None, str | None]:
    """Record the workers' events until every worker has exited; return the signal that stopped
    one of them, if one did, and the data error that stopped the grid, if one did (the first one
    calls ``stop_workers(signum)`` to stop the others at their safe points)."""
    current: dict[int, str | None] = {i: None for i in range(len(procs))}
    interrupted = fatal = None
    while current:
        try:
            kind, index, name, payload = events.get(timeout=_EVENT_WAIT_S)
        except queue.Empty:
            # A worker killed from outside (e.g. out of memory) never says goodbye.
            for i in [i for i in current if not procs[i].is_alive()]:
                lost = current.pop(i)
                if lost is not None:
                    book.ended(lost, error=f"worker {i} ({devices[i][0]}) died with exit code "
                                           f"{procs[i].exitcode}")
            continue
        if kind == "exit":
            current.pop(index, None)
        elif kind == "start":
            current[index] = name
            book.started(name, payload)
        elif kind == "epoch":
            book.epoch(name, payload)
        elif kind == "busy":
            current[index] = None
            book.set_aside(name, "busy", payload)
        elif kind == "interrupted":
            current[index] = None
            interrupted = payload
            book.set_aside(name, "interrupted", str(Interrupted(payload)), quiet=True)
        elif kind == "fatal":
            current[index] = None
            book.set_aside(name, "interrupted", f"the grid stopped: {payload}", quiet=True)
            if fatal is None:
                fatal = payload
                stop_workers(signal.SIGTERM)
        else:
            current[index] = None
            book.ended(name, error=payload if kind == "failed" else None,
                       summary=payload if kind == "done" else None)
    return interrupted, fatal


def run_parallel(pending: list, runs_dir: Path, devices: list, data_dir, manifest: Manifest,
                 progress: Progress) -> list:
    """Train ``pending`` in one worker per ``(device, threads)`` of ``devices``; return the failed run names.
    The data must be there (the grid looked for it): a worker that cannot load it stops the grid, which
    raises that :class:`~apl.errors.DataError` once."""
    ctx = mp.get_context("spawn")  # no fork of a process that may hold CUDA or OpenMP state
    tasks, events = ctx.Queue(), ctx.Queue()
    for cfg in pending:
        tasks.put(cfg.to_dict())
    for _ in devices:
        tasks.put(None)
    # Not daemonic: torch.compile may start compile workers of its own.
    procs = [ctx.Process(target=_worker, args=(i, d, t, str(data_dir), str(runs_dir), tasks, events))
             for i, (d, t) in enumerate(devices)]
    for p in procs:
        p.start()
    book = RunBook(pending, manifest, progress)
    stop_workers = _pass_stop_to(procs)
    try:
        with graceful_stop(on_stop=stop_workers) as stop:
            interrupted, fatal = _collect(events, procs, devices, book, stop_workers)
        interrupted = stop.signum or interrupted
    except BaseException as e:
        for p in procs:
            p.kill()  # a second signal, or a failure of the grid process itself: no waiting for the workers
        book.abandon(e)
        raise
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if fatal is not None:
        raise DataError(fatal)
    if interrupted is not None:
        raise Interrupted(interrupted)
    return book.failures
