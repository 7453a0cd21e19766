"""Compile time and per-chunk cost of a ``torch.compile``'d fused TIES chunk (trim + weight + election) vs eager.

    OMP_NUM_THREADS=1 python evals/bench/compile_probe.py

Run twice: the first run in a fresh environment pays inductor's C++ compilation (cold cache), the
second reads its on-disk cache.  Results: RESULTS-dense.md.
"""

import time

import torch


def ties_chunk(B0, A0, B1, A1, B2, A2, B3, A3, t0, t1, t2, t3):  # noqa: N803
    """The TIES chunk of 4 inputs written plainly: products, trim at t_i, weight 1/4, election, mean."""
    xs = []
    for B, A, t in ((B0, A0, t0), (B1, A1, t1), (B2, A2, t2), (B3, A3, t3)):
        x = B @ A
        xs.append(torch.where(x.abs() >= t, x, 0.0) * 0.25)
    mass = xs[0] + xs[1] + xs[2] + xs[3]
    e = torch.where(mass >= 0, 1.0, -1.0)
    num = sum(torch.relu(x * e) for x in xs)
    cnt = sum((x * e > 0).float() for x in xs)
    return num * e / cnt.clamp(min=1)


def main() -> None:
    torch.set_num_threads(1)
    c_start = time.process_time()
    rows, n, r = 256, 1024, 16
    args: list[torch.Tensor] = []
    for _ in range(4):
        args += [torch.randn(rows, r), torch.randn(r, n)]
    ts = [torch.tensor(3.0)] * 4
    f = torch.compile(ties_chunk, dynamic=False)
    c0, w0 = time.process_time(), time.perf_counter()
    f(*args, *ts)
    print(f"first call (compile): {time.process_time() - c0:.1f} CPU s, {time.perf_counter() - w0:.1f} wall s; "
          f"importing the compiler: {c0 - c_start:.1f} CPU s")
    for name, fn in (("compiled", f), ("eager", ties_chunk)):
        fn(*args, *ts)
        c = time.process_time()
        for _ in range(50):
            fn(*args, *ts)
        print(f"{name}: {(time.process_time() - c) / 50 / (rows * n) * 1e9:.2f} ns per output element")


if __name__ == "__main__":
    main()
