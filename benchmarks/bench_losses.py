"""Forward + backward time of the fused loss operator against the pure-PyTorch reference.

For each loss and shape it times one training-style step (loss of a leaf tensor, then
``backward``) of:

- ``fused``: ``apl.fused.fused_loss`` (the C++/CUDA operator, csrc/);
- ``module``: the same operator through the ``nn.Module`` users call (``get_loss``), Python
  wrapper included;
- ``reference``: ``apl.losses.reference_loss`` run eagerly;
- ``compiled``: the reference under ``torch.compile`` (compiled once per loss and shape);
- ``F.cross_entropy``: PyTorch's own cross entropy (for the CE row only);
- ``floor``: ``x.sum()`` and its backward: one read of the logits, one fresh gradient of their
  size written, one autograd step. Every loss's training step does at least this much, so
  reference/floor bounds the speed-up any implementation can show over the reference at that
  shape (page faults of the fresh gradient dominate it for large N x C on Linux).

Each entry is the median over repeats after a warm-up; the contenders of a row take turns in
blocks of a few steps (see ``time_steps``). Prints a Markdown table with the
absolute times and the ratios reference/fused, compiled/fused, fused/F.cross_entropy,
module/F.cross_entropy and reference/floor.

    python -m benchmarks.bench_losses            # N in {128, 1000, 8192} x C in {10, 100, 1000, 32000}
    python -m benchmarks.bench_losses --quick    # fewer shapes, no torch.compile
    python -m benchmarks.bench_losses --ns 128 --cs 10,100 --no-compile   # the shapes people train with
    python -m benchmarks.bench_losses --device cuda
    python -m benchmarks.bench_losses --shape 4,21,256,256   # segmentation: (N, C, H, W) logits
    python -m benchmarks.bench_losses --soft --ns 1000 --cs 10,1000   # probability targets, smoothing
    python -m benchmarks.bench_losses --soft --shape 4,21,256,256
    python -m benchmarks.bench_losses --successors   # APL's successors against their official formulas

``--shape`` times F.cross_entropy's K-dimensional layout instead ((N, C, d1, ..., dK) logits,
(N, d1, ..., dK) targets), as users pass it to ``fused`` (the module), ``reference`` and
``F.cross_entropy``; ``fused on rows`` is the same module on the positions already laid out as
(N*D, C) rows, for comparison with the layout the kernels were first written for.

``--soft`` times the distribution targets instead (LOSSES.md "Soft targets"): probability
targets for CE, MAE, RCE and SCE, and CE with ``label_smoothing=0.1`` on class indices, through
the module on each backend, against ``F.cross_entropy`` for the CE rows; with ``--shape``, in
that layout (probabilities of the logits' shape).

``--successors`` times APL's successors instead (LOSSES.md "Successors"), each at its CIFAR-10
defaults: the fused operator (raw and through the module) against ``official``, an eager
implementation of the official formula as its authors' code computes it
(benchmarks/official_losses.py), and ``official compiled``, that under ``torch.compile``
(``dynamic=True``: compiled once per loss).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import apl.losses.fused as fused
from apl.losses import APLLoss, reference_loss
from apl.losses.spec import SUCCESSOR_NAMES, Kind, LossSpec, spec_for
from benchmarks.official_losses import official_loss

#: the --soft table's losses: (spec, whether the target is probabilities)
SOFT_LOSSES = {
    "CE (probabilities)": (spec_for("ce"), True),
    "CE (label_smoothing 0.1)": (LossSpec(Kind.CE, smoothing=0.1), False),
    "MAE (probabilities)": (spec_for("mae"), True),
    "RCE (probabilities)": (spec_for("rce"), True),
    "SCE (probabilities)": (spec_for("sce"), True),
}

LOSSES = {
    "CE": spec_for("ce"),
    "NCE (ma2020)": spec_for("nce"),
    "NFL (ma2020)": spec_for("nfl"),
    "NCE+RCE (ma2020)": spec_for("nce+rce"),
    "NFL+RCE (ma2020)": spec_for("nfl+rce"),
    "NCE (paper)": spec_for("nce", variant="paper"),
}


def sync(device: str) -> None:
    """Wait for the GPU's queued work (a timed step ends when its kernels do)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(loss_fns: dict, logits: torch.Tensor, target: torch.Tensor, device: str, *,
               min_time: float, max_repeats: int, warmup: int = 3, block: int = 5, backward: bool = True) -> dict:
    """Median seconds of ``loss_fn(x, target).backward()`` (``x`` a leaf of its own per
    function; with ``backward=False``, of ``loss_fn(x, target)`` without autograd) for each of
    ``loss_fns``. The functions take turns in blocks of ``block`` steps, so a slow spell of the
    shared machine falls on every contender alike, while each still runs warm, as it would called
    step after step (one step of each in turn measured the caches the others had just evicted:
    small shapes came out 2-3x slower). Repeats until ``min_time`` per
    function has passed (at least 5 steps, at most ``max_repeats``)."""
    xs = {name: logits.detach().clone().requires_grad_(backward) for name in loss_fns}

    def step(name):
        x = xs[name]
        if not backward:
            with torch.no_grad():
                loss_fns[name](x, target)
            return
        x.grad = None
        loss_fns[name](x, target).backward()

    for _ in range(warmup):
        for name in loss_fns:
            step(name)
    sync(device)
    times = {name: [] for name in loss_fns}
    start_all = time.perf_counter()
    budget = min_time * len(loss_fns)
    while True:
        done = len(times[next(iter(loss_fns))])
        if done >= max_repeats or (done >= 5 and time.perf_counter() - start_all >= budget):
            break
        for name in loss_fns:
            for _ in range(block):
                t0 = time.perf_counter()
                step(name)
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def random_batch(n: int, c: int, device: str, *, probabilities: bool = False):
    """Logits (n, c) and class indices (n,), or probabilities (n, c), the same on every device."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, generator=g) * 3
    if probabilities:
        target = torch.softmax(torch.randn(n, c, generator=g) * 3, dim=1)
    else:
        target = torch.randint(0, c, (n,), generator=g)
    return logits.to(device), target.to(device)


def cross_entropy_contender(spec: LossSpec):
    """``F.cross_entropy`` (with the spec's label smoothing) for a row of CE alone; None for any other loss."""
    if spec.active == Kind.CE and spec.passive == Kind.NONE:
        return lambda x, y, e=spec.smoothing: F.cross_entropy(x, y, label_smoothing=e)
    return None


def with_cross_entropy(contenders: dict, spec: LossSpec) -> dict:
    """``contenders`` and, for CE alone, ``F.cross_entropy`` (:func:`cross_entropy_contender`)."""
    ce = cross_entropy_contender(spec)
    return contenders if ce is None else {**contenders, "F.cross_entropy": ce}


def soft_contenders(spec: LossSpec) -> dict:
    """A distribution-target row's contenders (the ``--soft`` table, the GPU check's): the module on
    each backend, and ``F.cross_entropy`` for CE alone."""
    return with_cross_entropy({"fused": APLLoss(spec, backend="fused"),
                               "reference": APLLoss(spec, backend="reference")}, spec)


def layout_rows(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of an (N, C, d1, ..., dK) batch as (N*D, C) rows, with their targets (class
    indices (N*D,), or probabilities (N*D, C) when ``target`` has the logits' shape)."""
    c = logits.shape[1]
    rows_target = target.movedim(1, -1).reshape(-1, c) if target.dim() == logits.dim() else target.reshape(-1)
    return logits.movedim(1, -1).reshape(-1, c), rows_target


def markdown_row(cells) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_header(header) -> list[str]:
    """A Markdown table's header row and its rule."""
    return [markdown_row(header), "|" + "---|" * len(header)]


def fmt_ms(seconds: float | None) -> str:
    """Seconds as milliseconds, three significant digits at most ("-" for none)."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _int_list(text: str) -> list[int]:
    """'128,1000' -> [128, 1000] (argparse type)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``"2.00x"`` ("-" when either is missing)."""
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N in {128, 1000} x C in {10, 1000}, no torch.compile")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument("--no-large", action="store_true", help="skip N = 8192")
    parser.add_argument("--max-elements", type=int, default=1 << 26,
                        help="skip shapes with more logits than this (default 2^26: 8192 x 32000 needs "
                             "several GB for the eager reference)")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of repeats per entry (default 0.3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's); 1 gives stable numbers on a busy machine")
    parser.add_argument("--losses", nargs="*", default=list(LOSSES), choices=list(LOSSES), metavar="LOSS",
                        help="subset of: " + ", ".join(LOSSES))
    parser.add_argument("--ns", type=_int_list, default=None, help="batch sizes, e.g. 128,1000 (overrides the presets)")
    parser.add_argument("--cs", type=_int_list, default=None, help="class counts, e.g. 10,100 (overrides the presets)")
    parser.add_argument("--soft", action="store_true",
                        help="probability targets and label smoothing (the distribution path) instead")
    parser.add_argument("--successors", nargs="*", default=None, choices=SUCCESSOR_NAMES, metavar="LOSS",
                        help="APL's successors against their official formulas instead (all, or these of: "
                             + ", ".join(SUCCESSOR_NAMES) + ")")
    parser.add_argument("--shape", type=_int_list, default=None,
                        help="one K-dimensional logits shape N,C,d1,...,dK (e.g. 4,21,256,256) instead of N x C")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if not fused.is_available():
        print(f"fused operator unavailable: {fused.unavailable_reason()}", file=sys.stderr)
        return 1
    if args.device == "cuda" and not (torch.cuda.is_available() and fused.cuda_available()):
        print("--device cuda needs a GPU and the extension built with CUDA kernels", file=sys.stderr)
        return 1

    ns = args.ns or ([128, 1000] if (args.quick or args.no_large) else [128, 1000, 8192])
    cs = args.cs or ([10, 1000] if args.quick else [10, 100, 1000, 32000])
    use_compile = not (args.quick or args.no_compile)
    max_repeats = 30 if args.quick else 200

    isa = torch.ops.apl._cpu_kernel_isa() if args.device == "cpu" else "cuda"
    print("# apl fused loss benchmark: forward+backward, median of repeats, times in ms\n")
    print(f"torch {torch.__version__}, device {args.device} (row kernels: {isa}), "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n")
    if args.shape:
        return layout_table(args, max_repeats)
    if args.soft:
        return soft_table(args, ns, cs, max_repeats)
    if args.successors is not None:
        return successors_table(args, args.successors or list(SUCCESSOR_NAMES), ns, cs, use_compile, max_repeats)
    header = ["loss", "N", "C", "fused", "module", "reference", "compiled", "F.cross_entropy", "floor",
              "reference/fused", "compiled/fused", "fused/F.ce", "module/F.ce", "reference/floor"]
    print("\n".join(markdown_header(header)))
    for name in args.losses:
        spec = LOSSES[name]
        for n in ns:
            for c in cs:
                if n * c > args.max_elements:
                    continue
                logits, target = random_batch(n, c, args.device)
                module = APLLoss(spec, backend="fused")
                contenders = {"fused": lambda x, y: fused.fused_loss(x, y, spec),
                              "module": module,
                              "reference": lambda x, y: reference_loss(x, y, spec),
                              "floor": lambda x, y: x.sum()}
                if use_compile:
                    torch._dynamo.reset()
                    contenders["compiled"] = torch.compile(lambda x, y: reference_loss(x, y, spec), dynamic=False)
                contenders = with_cross_entropy(contenders, spec)
                t = time_steps(contenders, logits, target, args.device, min_time=args.min_time,
                               max_repeats=max_repeats)
                t_fused, t_mod, t_ref, t_floor = t["fused"], t["module"], t["reference"], t["floor"]
                t_comp, t_ce = t.get("compiled"), t.get("F.cross_entropy")
                row = [name, str(n), str(c), fmt_ms(t_fused), fmt_ms(t_mod), fmt_ms(t_ref), fmt_ms(t_comp),
                       fmt_ms(t_ce), fmt_ms(t_floor), ratio(t_ref, t_fused), ratio(t_comp, t_fused),
                       ratio(t_fused, t_ce), ratio(t_mod, t_ce), ratio(t_ref, t_floor)]
                print(markdown_row(row), flush=True)
    return 0


def soft_table(args, ns: list[int], cs: list[int], max_repeats: int) -> int:
    """The ``--soft`` table: distribution targets through the module on each backend."""
    header = ["loss", "N", "C", "fused", "reference", "F.cross_entropy", "reference/fused", "fused/F.ce"]
    print("\n".join(markdown_header(header)))
    for name, (spec, probabilities) in SOFT_LOSSES.items():
        for n in ns:
            for c in cs:
                if n * c > args.max_elements:
                    continue
                logits, target = random_batch(n, c, args.device, probabilities=probabilities)
                t = time_steps(soft_contenders(spec), logits, target, args.device, min_time=args.min_time,
                               max_repeats=max_repeats)
                t_ce = t.get("F.cross_entropy")
                row = [name, str(n), str(c), fmt_ms(t["fused"]), fmt_ms(t["reference"]), fmt_ms(t_ce),
                       ratio(t["reference"], t["fused"]), ratio(t["fused"], t_ce)]
                print(markdown_row(row), flush=True)
    return 0


def successors_table(args, names: list[str], ns: list[int], cs: list[int], use_compile: bool,
                     max_repeats: int) -> int:
    """The ``--successors`` table: each successor's fused operator against its official formula."""
    header = ["loss", "N", "C", "fused", "module", "official", "official compiled", "official/fused",
              "compiled/fused"]
    print("\n".join(markdown_header(header)))
    for name in names:
        spec = spec_for(name)
        compiled = None
        if use_compile:
            torch._dynamo.reset()
            compiled = torch.compile(lambda x, y, n=name: official_loss(n, x, y), dynamic=True)
        for n in ns:
            for c in cs:
                if n * c > args.max_elements:
                    continue
                logits, target = random_batch(n, c, args.device)
                contenders = {"fused": lambda x, y: fused.fused_loss(x, y, spec),
                              "module": APLLoss(spec, backend="fused"),
                              "official": lambda x, y, n=name: official_loss(n, x, y)}
                if compiled is not None:
                    contenders["official compiled"] = compiled
                t = time_steps(contenders, logits, target, args.device, min_time=args.min_time,
                               max_repeats=max_repeats)
                t_fused, t_official, t_comp = t["fused"], t["official"], t.get("official compiled")
                row = [name, str(n), str(c), fmt_ms(t_fused), fmt_ms(t["module"]), fmt_ms(t_official),
                       fmt_ms(t_comp), ratio(t_official, t_fused), ratio(t_comp, t_fused)]
                print(markdown_row(row), flush=True)
    return 0


def layout_table(args, max_repeats: int) -> int:
    """The ``--shape`` table: each loss on one (N, C, d1, ..., dK) batch."""
    if len(args.shape) < 3:
        print("--shape needs N,C and at least one more dimension (use --ns/--cs for N x C)", file=sys.stderr)
        return 2
    n, c, *rest = args.shape
    header = ["loss", "shape", "fused", "fused on rows", "reference", "F.cross_entropy",
              "reference/fused", "fused/F.ce"]
    print("\n".join(markdown_header(header)))
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.shape, generator=g) * 3).to(args.device)
    indices = torch.randint(0, c, (n, *rest), generator=g).to(args.device)
    probs = torch.softmax(torch.randn(args.shape, generator=g) * 3, dim=1).to(args.device) if args.soft else None
    entries = SOFT_LOSSES.items() if args.soft else ((name, (LOSSES[name], False)) for name in args.losses)
    for name, (spec, probabilities) in entries:
        target = probs if probabilities else indices
        module = APLLoss(spec, backend="fused")
        contenders = with_cross_entropy({"fused": module, "reference": lambda x, y, s=spec: reference_loss(x, y, s)},
                                        spec)
        t = time_steps(contenders, logits, target, args.device, min_time=args.min_time, max_repeats=max_repeats)
        t_rows = time_steps({"rows": module}, *layout_rows(logits, target), args.device,
                            min_time=args.min_time, max_repeats=max_repeats)["rows"]
        t_ce = t.get("F.cross_entropy")
        row = [name, "x".join(map(str, args.shape)), fmt_ms(t["fused"]), fmt_ms(t_rows), fmt_ms(t["reference"]),
               fmt_ms(t_ce), ratio(t["reference"], t["fused"]), ratio(t["fused"], t_ce)]
        print(markdown_row(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
