"""The thread policy: one place that decides how many CPU threads each piece of linear algebra gets.

Why: torch's default (one OpenMP/MKL thread per core) is a disaster for the small per-module
products a merge is made of when the machine is busy — a QR of a 112×24 matrix took 307 ms with 2
threads on a loaded 2-core box and 0.017 ms with 1, because every parallel region waits at a barrier
for a thread the OS has descheduled.  Large dense work (a 1024×2816 product, a batched GEMM) does
gain from the cores even under load.  So:

- inside :func:`thread_policy` torch runs **single-threaded** by default;
- an operation big enough to deserve threads (by its flop count) gets workers from the budget for that
  call only: a product through :meth:`ThreadBudget.matmul`, a pool of independent chunks through :meth:`ThreadBudget.workers_for`;
- the budget is the explicit ``threads`` option, else ``OMP_NUM_THREADS``, else the usable cores
  (``os.sched_getaffinity``);
- **load-aware threads**: when the budget was *not* set explicitly, chunk pools
  (:meth:`ThreadBudget.workers_for`) and, for budgets ≤ ``LOAD_AWARE_MAX_BUDGET`` = 2, products (:meth:`ThreadBudget.matmul`)
  get only the cores nobody else is using: :func:`barrier_threads` = clamp(online CPUs − other
  runnable threads, 1, budget), re-read at each call from ``/proc/loadavg``'s running count minus this
  process's own running threads (``/proc/self/task/*/stat``; ~0.05 ms, negligible next to a ≥ 5 ms op).
  Why: an OpenMP/MKL parallel region ends at a barrier, so one thread the OS has descheduled for
  another process stalls the whole op — at the Llama-7B layout with two other processes holding both
  cores of a 2-core box, LoRA-LEGO took 4.08 s with 2-thread GEMMs vs 3.02 s with one thread.  Pools
  of independent chunks (``algorithms/elementwise.run_chunks``) have no barrier but still lost on that
  busy box (``ties`` 1.34 s with 2 workers vs 1.14 s with 1, RESULTS-threads.md), so they are trimmed
  too, at any budget (the pool size never changes the bytes).
- **big products as fixed blocks** (:meth:`ThreadBudget.matmul`): MKL's threaded GEMM does *not* give the same bits at
  1 and 2 threads on every CPU (measured on an AVX-512 Xeon: a 300×900 @ 900×16 product) nor at 3–4 for
  skinny products, so a big product is cut into blocks of ``MATMUL_ROW_BLOCK`` rows, each a
  single-threaded GEMM, and only the blocks are shared among workers.  The blocks depend on the shapes
  only, so the bytes do not depend on the thread count at *any* count, explicit budgets above 2 included.
  With an implicit budget a product still gets at most ``LOAD_AWARE_MAX_BUDGET`` = 2 workers: no longer
  needed for the bits (the cap dates from before the blocks), kept because more workers per product have
  not been measured (a 2-core machine never reaches the cap).  Without ``/proc`` (non-Linux) the load is
  unknown and the budget is used.

The budget reaches the algorithms in their context (``registry.ModuleContext.threads``, a
:class:`ThreadBudget` that ``execute`` takes from :func:`current` inside :func:`thread_policy`): an
algorithm asks its budget (``ctx.threads.workers_for``, ``ctx.threads.matmul``), never this module's state.
The policy itself stays process-wide, as torch's thread count is.

``LORAMERGE_THREAD_POLICY=off`` leaves torch's own setting untouched (benchmarks compare against it).
Results do not depend on the thread count in the code paths that use this module: only pools of
independent blocks or chunks get threads; LAPACK factorisations (QR, SVD), which MKL does *not*
reproduce across thread counts, run under :func:`single_thread`.  (:func:`parallel_for`, a threaded
region around one op, is kept for callers whose op is bit-stable across counts; the merge paths use
:meth:`ThreadBudget.matmul` instead.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    import torch

# Below this many floating-point operations an op runs on one thread: ~5 ms of single-thread work
# (at ~30 GFLOP/s), enough that a parallel region's barrier (a descheduled thread on a busy machine)
# cannot dominate.  The policy as a whole is checked against torch's default and fixed 1 / 2 threads
# under contention by evals/bench/thread_bench.py (RESULTS-threads.md).
PARALLEL_MIN_FLOPS = 1.5e8

# Rows of one block of a big product in :meth:`ThreadBudget.matmul`: a function of the shape only, so the blocks (and
# their bits) are the same whatever the number of workers computing them.
MATMUL_ROW_BLOCK = 256
# Columns of Y per block when a product is cut by columns (``matmul(…, by="cols")``: a short, wide X such as
# Qᵀ [72, m] @ D [m, n]); 512 was as fast as the whole product (RESULTS-dense.md).
MATMUL_COL_BLOCK = 512

T = TypeVar("T")

# Most workers a product (and parallel_for) gets with an implicit budget.  Not needed for the bits since
# matmul's fixed row blocks; kept until more workers per product are measured (module docstring).
LOAD_AWARE_MAX_BUDGET = 2

_budget: int | None = None  # the active policy's thread budget (None: no policy active)
_load_aware = False  # whether parallel_for trims the budget to the idle cores (budget not set explicitly)


def policy_enabled() -> bool:
    """False when ``LORAMERGE_THREAD_POLICY`` is ``off``/``0``/``torch`` (torch's own threading is kept)."""
    return os.environ.get("LORAMERGE_THREAD_POLICY", "on").strip().lower() not in ("off", "0", "torch", "false")


def usable_cores() -> int:
    """CPU cores this process may run on (affinity mask), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(os.cpu_count() or 1, 1)


def explicit_budget(threads: int | None = None) -> int | None:
    """The budget the user set: ``threads`` if given, else ``OMP_NUM_THREADS``, else None."""
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be ≥ 1, got {threads}")
        return int(threads)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            return max(int(env.split(",")[0]), 1)
        except ValueError:
            pass
    return None


def thread_budget(threads: int | None = None) -> int:
    """Threads large operations may use: ``threads`` if given, else ``OMP_NUM_THREADS``, else the cores."""
    explicit = explicit_budget(threads)
    return usable_cores() if explicit is None else explicit


def barrier_threads(budget: int, online_cpus: int, others_running: int) -> int:
    """Threads for a barrier-synchronised op: the idle CPUs (``online_cpus − others_running``), in [1, budget].

    ``others_running``: runnable threads of *other* processes right now (machine-wide, like
    ``online_cpus``, so a container whose ``/proc/loadavg`` shows the host's load still gets its budget
    on a big host).
    """
    return max(1, min(budget, online_cpus - max(others_running, 0)))


def _own_running_threads() -> int:
    n = 0
    for task in os.scandir("/proc/self/task"):
        try:
            with open(f"{task.path}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        n += stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] == b"R"
    return max(n, 1)  # the reading thread runs


def others_running() -> int | None:
    """Runnable threads of other processes now (``/proc/loadavg`` field 4 minus ours), None if unknown."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
        return max(running - _own_running_threads(), 0)
    except (OSError, ValueError, IndexError):
        return None


class Busy:
    """How many threads are busy with some work in this process right now, counted by :meth:`hold`: the
    driver's read-ahead thread while it reads (``execute._merged_tensors``), shared by the budgets that hand
    out workers; LoRA-LEGO's batches being merged (``PoolBuffers.merges``).

    Why: with 2 threads, a merge whose pools took both workers while the next batch was read on a third
    thread had 3 busy threads on 2 cores; each thread's many small torch ops (every op releases and retakes
    the GIL) then waited on the others (LoRA-LEGO, 7B layout: the read took 1.9 CPU s instead of 1.4, the merge
    0.3 s more).  The pools never change the bytes, so trimming them is free."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0

    @property
    def count(self) -> int:
        return self._n

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Count the calling thread busy for the enclosed work."""
        with self._lock:
            self._n += 1
        try:
            yield
        finally:
            with self._lock:
                self._n -= 1


@dataclass(frozen=True)
class ThreadBudget:
    """The thread budget of one run, as an algorithm gets it (``ModuleContext.threads``).

    ``budget``: threads big operations may use (None: no policy active — torch's own threading, plain
    products); ``load_aware``: the budget was not set explicitly, so pools and products get only the idle
    cores (module docstring); ``busy``: threads of the budget busy elsewhere in this process (:class:`Busy`),
    taken off every pool while they are.  Results never depend on it: only pools of independent chunks or
    fixed row blocks get threads."""

    budget: int | None = None
    load_aware: bool = False
    busy: Busy | None = field(default=None, compare=False, repr=False)

    def workers_for(self, flops: float) -> int:
        """Workers a pool of independent chunks worth ``flops`` gets: the budget when ``flops`` ≥
        PARALLEL_MIN_FLOPS, trimmed to the idle CPUs when the budget was not set explicitly (any budget: the
        pool size never changes the bytes), less the threads :attr:`busy` elsewhere in this process."""
        if self.budget is None:
            import torch  # lazily: a torch-free merge (numpy factors) holds a budget but never asks it

            return torch.get_num_threads()
        if flops < PARALLEL_MIN_FLOPS:
            return 1
        budget = max(self.budget - (self.busy.count if self.busy is not None else 0), 1)
        if budget <= 1 or not self.load_aware:
            return budget
        others = others_running()
        return budget if others is None else barrier_threads(budget, os.cpu_count() or budget, others)

    def gemm_workers_for(self, flops: float) -> int:
        """Threads a barrier-synchronised op (an OpenMP GEMM) of ``flops`` gets: as :meth:`workers_for`
        (trimmed to the idle CPUs by :func:`barrier_threads` when the budget is implicit), and with an implicit
        budget never more than ``LOAD_AWARE_MAX_BUDGET`` = 2 (a speed choice: :meth:`matmul`'s bits do not
        depend on the count).  An explicit budget (``threads`` option, ``OMP_NUM_THREADS``) is used as given."""
        n = self.workers_for(flops)
        return min(n, LOAD_AWARE_MAX_BUDGET) if self.load_aware else n

    def matmul(self, X: torch.Tensor, Y: torch.Tensor, by: Literal["rows", "cols"] = "rows") -> torch.Tensor:
        """``X @ Y`` with bits that do not depend on the budget (:func:`blocked_matmul`)."""
        return blocked_matmul(X, Y, self, by)


NO_BUDGET = ThreadBudget()  # outside a policy: torch's own threading, plain products


def current() -> ThreadBudget:
    """The active :func:`thread_policy`'s budget (:data:`NO_BUDGET` outside one): what ``execute`` hands the
    algorithms in their context."""
    return ThreadBudget(_budget, _load_aware)


class Workspace:
    """A reusable buffer per thread (LoRA-LEGO's batch pools, the readers' staging of strided reads).

    A batch's pool is tens of MiB (8 × 128 units of 15 104 entries: 62 MiB); above glibc's mmap
    threshold every fresh allocation is a new mapping, and first-touching it costs a page fault per
    4 KiB — as much as the copy into it (measured: 22 ms fresh vs 6.6 ms reused for one batch).
    Not pickled (a plan sent to a worker starts empty).
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def buffer(self, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A flat uninitialised tensor of ``numel`` entries; valid until this thread asks again."""
        import torch  # lazily, as every torch call of this module

        buf = getattr(self._local, "buf", None)
        want = torch.device(device)
        same_device = buf is not None and buf.device.type == want.type and want.index in (None, buf.device.index)
        if buf is None or not same_device or buf.dtype != dtype or buf.numel() < numel:
            self._local.buf = buf = None  # drop the old buffer before allocating the new one
            buf = self._local.buf = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def __reduce__(self) -> tuple:
        return (Workspace, ())


@contextmanager
def _num_threads(n: int) -> Iterator[None]:
    import torch  # lazily, as every torch call of this module: planning and numpy merges import no torch

    prev = torch.get_num_threads()
    if n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@contextmanager
def thread_policy(threads: int | None = None) -> Iterator[int]:
    """Run the enclosed merge under the policy: one thread by default, the budget for big operations.

    Yields the budget.  Re-entrant (an inner policy keeps the outer budget unless ``threads`` is
    given); restores torch's thread count on exit.  A no-op (yields torch's count) when the policy is
    disabled by ``LORAMERGE_THREAD_POLICY=off``.
    """
    global _budget, _load_aware
    import torch

    if not policy_enabled():
        yield torch.get_num_threads()
        return
    outer, outer_aware = _budget, _load_aware
    if threads is not None or outer is None:
        explicit = explicit_budget(threads)
        _budget, _load_aware = (usable_cores(), True) if explicit is None else (explicit, False)
    try:
        with _num_threads(1):
            yield _budget
    finally:
        _budget, _load_aware = outer, outer_aware


@contextmanager
def parallel_for(flops: float) -> Iterator[int]:
    """Give the enclosed operation the budget's threads when it is worth ``flops`` ≥ PARALLEL_MIN_FLOPS,
    trimmed to the idle CPUs unless the budget was set explicitly (:meth:`ThreadBudget.gemm_workers_for`).

    Outside :func:`thread_policy` (or with the policy disabled) it changes nothing.  Yields the
    thread count in effect.
    """
    n = current().gemm_workers_for(flops)
    if _budget is None:
        yield n
        return
    with _num_threads(n):
        yield n


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed LAPACK call (QR, SVD, eigh) on one thread under the policy, whatever its size.

    MKL's threaded LAPACK gives different bits with 1 and 2 threads (so does its GEMM on some CPUs: big
    products go through :meth:`ThreadBudget.matmul`), so factorisations whose results are written stay single-threaded:
    output bytes do not depend on the thread budget.
    """
    if _budget is None:
        yield
        return
    with _num_threads(1):
        yield


def matmul_flops(m: int, k: int, n: int, batch: int = 1) -> float:
    """Floating-point operations of a [batch, m, k] @ [batch, k, n] product (2·m·k·n per matrix)."""
    return 2.0 * batch * m * k * n


def run_pool(fn: Callable[..., T], items: Sequence[tuple], workers: int) -> list[T]:
    """``[fn(*item) for item in items]``, on a pool of ``workers`` threads when > 1 (torch ops release the GIL).

    Each worker runs its torch ops single-threaded (a new thread otherwise gets OpenMP's default, all
    cores); torch's thread setting is process-wide, so it is restored afterwards.  The items must be
    independent: the result never depends on ``workers``.
    """
    if workers <= 1 or len(items) < 2:
        return [fn(*it) for it in items]
    import torch

    prev = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,)) as ex:
            return list(ex.map(lambda it: fn(*it), items))
    finally:
        torch.set_num_threads(prev)


def blocked_matmul(X: torch.Tensor, Y: torch.Tensor, threads: ThreadBudget,
                   by: Literal["rows", "cols"] = "rows") -> torch.Tensor:
    """``X @ Y`` for [m, k] @ [k, n] or batched [M, m, k] @ [M, k, n], with bits that do not depend on the
    thread count.

    MKL's threaded GEMM splits the work differently with 1 and 2 threads on some CPUs (measured on an
    AVX-512 Xeon: a 300×900 @ 900×16 product), so a big product is cut into fixed blocks of
    ``MATMUL_ROW_BLOCK`` rows of X (per batch entry), or with ``by="cols"`` of ``MATMUL_COL_BLOCK`` columns of
    Y (for a short, wide X), each a single-threaded GEMM, run on ``threads.gemm_workers_for`` workers.
    Products below PARALLEL_MIN_FLOPS, and everything without a budget (:data:`NO_BUDGET`), are one plain
    ``X @ Y``.  The choice depends on the shapes (and ``by``) only.
    """
    import torch

    m, k = X.shape[-2], X.shape[-1]
    n = Y.shape[-1]
    batch = X.shape[0] if X.ndim == 3 else 1
    flops = matmul_flops(m, k, n, batch)
    if not uses_blocks(threads, m, k, n, batch, X.device.type):
        # one plain product, on contiguous operands: MKL's small-GEMM path picks another kernel for a
        # transposed view and rounds differently (1 ulp, measured on SD conv modules), while the row blocks
        # below read views with the bits of copies (tests/test_lego.py); copies of small operands are cheap
        return X.contiguous() @ Y.contiguous()
    X3, Y3 = (X, Y) if X.ndim == 3 else (X[None], Y[None])
    out = torch.empty(X3.shape[0], m, n, dtype=torch.promote_types(X.dtype, Y.dtype))
    size, step = (n, MATMUL_COL_BLOCK) if by == "cols" else (m, MATMUL_ROW_BLOCK)
    blocks = [(b, a, min(a + step, size)) for b in range(X3.shape[0]) for a in range(0, size, step)]

    def block(b: int, a: int, e: int) -> None:
        if by == "cols":
            out[b, :, a:e] = torch.mm(X3[b], Y3[b, :, a:e])
        else:
            torch.mm(X3[b, a:e], Y3[b], out=out[b, a:e])

    run_pool(block, blocks, threads.gemm_workers_for(flops))
    return out if X.ndim == 3 else out[0]


def uses_blocks(threads: ThreadBudget, m: int, k: int, n: int, batch: int = 1, device_type: str = "cpu") -> bool:
    """Whether :func:`blocked_matmul` cuts a [batch, m, k] @ [batch, k, n] product into row/column blocks
    (else one plain product): a function of the shapes and of whether there is a budget, never of its size."""
    return threads.budget is not None and matmul_flops(m, k, n, batch) >= PARALLEL_MIN_FLOPS and device_type == "cpu"


def matmul_rows_into(X: torch.Tensor, Y: torch.Tensor, out: torch.Tensor) -> None:
    """One batch entry of :func:`blocked_matmul` by rows (when :func:`uses_blocks`): X [m, k] @ Y [k, n] into
    ``out`` [m, n] as the same single-threaded row blocks, so the same bits (a caller that computes entries
    one by one, e.g. while each is in cache)."""
    import torch

    for a in range(0, X.shape[0], MATMUL_ROW_BLOCK):
        e = min(a + MATMUL_ROW_BLOCK, X.shape[0])
        torch.mm(X[a:e], Y, out=out[a:e])
