"""LoRA-LEGO reads its inputs straight into the batch pool (``pool.read_pools``): the same pool, the same
output bytes and the same refusals as loading each input and copying it, at 1 and 2 threads."""

import itertools
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from reliab_helpers import peft_config, write_peft

from mergekit_lora import load_adapter, merge
from mergekit_lora import threads as threads_module
from mergekit_lora.adapter import Adapter
from mergekit_lora.algorithms.lego.algorithm import Lego
from mergekit_lora.algorithms.lego.pool import build_pools
from mergekit_lora.algorithms.lego.read import PoolBuffers, read_pools
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.registry import Algorithm, ModuleContext
from mergekit_lora.threads import NO_BUDGET, Busy, ThreadBudget, Workspace

MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
PREFIX = "base_model.model."


def _tensors(seed: int, r: int = 4, d_out: int = 40, d_in: int = 24, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODULES:
        out[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(r, d_in, generator=g).to(dtype)
        out[f"{PREFIX}{m}.lora_B.weight"] = (torch.randn(d_out, r, generator=g) * 0.1).to(dtype)
    return out


def _adapters(tmp_path: Path, n: int = 3, dtype=torch.float32, r: int = 4) -> list[Path]:
    # lora_alpha 3·r: scale 3, folded into B (the in-place reader multiplies it in its buffer)
    return [write_peft(tmp_path / f"a{i}", tensors=_tensors(i, r, dtype=dtype), config=peft_config(r, lora_alpha=3 * r))
            for i in range(n)]


def _pools(units, weights, threads: ThreadBudget, buffers: PoolBuffers | None, features="canonical", signs="rule"):
    ctxs = [ModuleContext(m, 0, torch.device("cpu")) for m in MODULES]
    return build_pools(units, weights, features=features, signs=signs, generators=[c.generator("o") for c in ctxs],
                       device=torch.device("cpu"), workspace=Workspace(), threads=threads, buffers=buffers)


FIELDS = ("A", "B", "ca", "cb", "order", "KA", "KB", "FA", "FB", "linf", "source", "target_norm2")


@pytest.mark.parametrize("threads", [NO_BUDGET, ThreadBudget(1), ThreadBudget(2)])
@pytest.mark.parametrize("features,signs", [("canonical", "rule"), ("paper", "none")])
def test_read_into_the_pool_gives_the_pool_of_loading_and_copying(tmp_path, threads, features, signs):
    ads = [load_adapter(p) for p in _adapters(tmp_path)]
    inputs = [[(a, i) for i, a in enumerate(ads)] for _ in MODULES]
    weights = [[0.5, 2.0, -1.0]] * len(MODULES)  # unequal: the in-place path weights B inside the pool
    loaded = [[a.units(m, source=i) for a, i in ins] for ins, m in zip(inputs, MODULES)]
    want = _pools(loaded, weights, threads, None, features, signs)
    buffers = PoolBuffers()
    units = read_pools(inputs, MODULES, buffers, threads)
    assert units is not None
    flat = buffers.holder(units[0][0].A)  # views of one taken buffer: read in place
    assert flat is not None and all(buffers.holder(u.A) is flat and buffers.holder(u.B) is flat for us in units for u in us)
    for us, ls in zip(units, loaded):  # the units themselves: the same values and sources before weighting
        for u, v in zip(us, ls):
            assert torch.equal(u.A, v.A) and torch.equal(u.B, v.B) and torch.equal(u.source, v.source)
    got = _pools(units, weights, threads, buffers, features, signs)
    for f in FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_inputs_the_reader_cannot_read_in_place_are_loaded_and_copied(tmp_path):
    """A memory adapter has no in-place reader: its units are loaded as usual and copied by build_pools."""
    ads = [load_adapter(p) for p in _adapters(tmp_path)]
    mem = Adapter.from_units({m: ads[1].units(m) for m in MODULES}, ads[1].meta)
    mixed = [ads[0], mem, ads[2]]
    inputs = [[(a, i) for i, a in enumerate(mixed)] for _ in MODULES]
    weights = [[1.0, 1.0, 1.0]] * len(MODULES)
    want = _pools([[a.units(m, source=i) for a, i in ins] for ins, m in zip(inputs, MODULES)], weights, NO_BUDGET, None)
    buffers = PoolBuffers()
    got = _pools(read_pools(inputs, MODULES, buffers), weights, NO_BUDGET, buffers)
    for f in FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_inputs_not_stored_in_the_pool_dtype_take_the_default_reading(tmp_path):
    ads = [load_adapter(p) for p in _adapters(tmp_path, dtype=torch.float16)]
    assert read_pools([[(a, i) for i, a in enumerate(ads)] for _ in MODULES], MODULES, PoolBuffers()) is None
    A, B = torch.empty(4, 24), torch.empty(40, 4)
    assert ads[0].factors_into(MODULES[0], A, B) is False  # float16 in the file, float32 asked


def test_factors_into_with_check_refuses_what_units_refuses(tmp_path):
    t = _tensors(0)
    t[f"{PREFIX}{MODULES[0]}.lora_A.weight"][1, 2] = float("nan")
    ad = load_adapter(write_peft(tmp_path / "bad", tensors=t, config=peft_config(4)))
    with pytest.raises(LoraMergeError) as via_units:
        ad.units(MODULES[0])
    with pytest.raises(LoraMergeError) as via_into:
        ad.factors_into(MODULES[0], torch.empty(4, 24), torch.empty(40, 4), check=True)
    assert str(via_into.value) == str(via_units.value)
    assert ad.factors_into(MODULES[0], torch.empty(4, 24), torch.empty(40, 4))  # unchecked: check_read's job


def test_threads_read_tensors_of_one_file_side_by_side(tmp_path):
    """The range reader reads at offsets (no shared file position): concurrent reads get their own bytes."""
    ad = load_adapter(_adapters(tmp_path, n=1)[0])
    want = {m: ad.units(m) for m in MODULES}
    errors = []

    def worker(m: str) -> None:
        for _ in range(200):
            A, B = torch.empty(4, 24), torch.empty(40, 4)
            if not (ad.factors_into(m, A, B) and torch.equal(A, want[m].A) and torch.equal(B, want[m].B)):
                errors.append(m)

    ts = [threading.Thread(target=worker, args=(m,)) for m in MODULES]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two bytecodes: a shared file position would race
    try:
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors


def _assert_bytes_of_the_default_reading(paths: list[str], kw: dict, tmp_path: Path, monkeypatch, threads: int) -> None:
    """The merge writes the bytes of the default reading (Algorithm.load_batch), and at 2 threads those of 1."""
    merge(paths, "lego", tmp_path / "new", **kw)
    monkeypatch.setattr(Lego, "load_batch", Algorithm.load_batch)
    merge(paths, "lego", tmp_path / "old", **kw)
    new, old = ((tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("new", "old"))
    assert new == old
    if threads == 2:
        monkeypatch.undo()
        merge(paths, "lego", tmp_path / "one", **{**kw, "threads": 1})
        assert (tmp_path / "one" / "adapter_model.safetensors").read_bytes() == new


@pytest.mark.parametrize("threads", [1, 2])
def test_merge_bytes_equal_those_of_loading_and_copying(tmp_path, monkeypatch, threads):
    """The whole merge (batches of same-shape modules, reweighting paper, weights unequal) writes the bytes it
    writes with the default reading, and the same at 1 and 2 threads."""
    paths = [str(p) for p in _adapters(tmp_path, r=6)]
    kw = dict(params={"k": 5, "batch_modules": 4}, weights=[1.0, 0.5, 2.0], force=True, threads=threads)
    _assert_bytes_of_the_default_reading(paths, kw, tmp_path, monkeypatch, threads)


def test_a_batch_read_while_another_is_merged_takes_another_buffer(tmp_path):
    """Read ahead: batch 2 is read before batch 1 is merged; each keeps its own pool, and a merged batch's
    buffer is reused by the next read (two buffers, not one per batch)."""
    ads = [load_adapter(p) for p in _adapters(tmp_path)]
    inputs = [[(a, i) for i, a in enumerate(ads)] for _ in MODULES]
    lego, buffers = Lego(), PoolBuffers()
    lego.__dict__["_read_buffers"] = buffers
    ctxs = [ModuleContext(m, 0, torch.device("cpu")) for m in MODULES]
    params = Lego.Params(k=5)
    weights = [[1.0, 0.5, 2.0]] * len(MODULES)
    want = [m.units for m in lego.merge_batch(lego.load_batch(inputs, params, ctxs), weights, params, ctxs)]
    one = lego.load_batch(inputs, params, ctxs)
    two = lego.load_batch(inputs, params, ctxs)  # read ahead: one is not merged yet
    assert buffers.holder(one[0][0].A) is not buffers.holder(two[0][0].A)
    for batch in (one, two):
        got = [m.units for m in lego.merge_batch(batch, weights, params, ctxs)]
        assert all(torch.equal(g.A, w.A) and torch.equal(g.B, w.B) for g, w in zip(got, want))
    three = lego.load_batch(inputs, params, ctxs)
    assert buffers.holder(three[0][0].A) is not None and len(buffers._free) == 1  # one given back, reused


@pytest.mark.parametrize("threads", [1, 2])
def test_the_driver_reads_the_next_batch_while_this_one_is_merged(tmp_path, monkeypatch, threads):
    """With two workers the next batch is read on a second thread during the merge (the merge of batch 1 sees
    batch 2's read start); with one, batches are read in turn on the calling thread."""
    paths = [str(p) for p in _adapters(tmp_path)]
    load, merge_batch = Lego.load_batch, Lego.merge_batch
    reads: list[tuple[str, bool]] = []
    second_read = threading.Event()
    seen_during_merge: list[bool] = []

    def spy_load(self, inputs, params, ctxs, *rest):
        reads.append((ctxs[0].name, threading.current_thread() is threading.main_thread()))
        if len(reads) == 2:
            second_read.set()
        return load(self, inputs, params, ctxs, *rest)

    def spy_merge(self, units, weights, params, ctxs):
        if not seen_during_merge:
            seen_during_merge.append(second_read.wait(timeout=5 if threads == 2 else 0))
        return merge_batch(self, units, weights, params, ctxs)

    monkeypatch.setattr(Lego, "load_batch", spy_load)
    monkeypatch.setattr(Lego, "merge_batch", spy_merge)
    merge(paths, "lego", tmp_path / "out", params={"k": 5, "batch_modules": 2}, force=True, threads=threads)
    assert len(reads) == 3  # 6 modules in batches of 2
    assert seen_during_merge == [threads == 2]
    assert all(main == (threads == 1) for _, main in reads)


def test_the_merge_gets_one_worker_fewer_while_the_next_batch_is_read(tmp_path, monkeypatch):
    """2 threads: while the read-ahead thread reads, the merge's pools get 1 worker (not 3 busy threads on 2
    cores); once the read is done, 2 again.  The bytes are those of 1 thread."""
    paths = [str(p) for p in _adapters(tmp_path)]
    load, merge_batch = Lego.load_batch, Lego.merge_batch
    reading, release = threading.Event(), threading.Event()
    seen: list[int] = []
    calls = [0]

    def spy_load(self, inputs, params, ctxs, *rest):
        calls[0] += 1
        if calls[0] == 2:  # the first read ahead: held until the merge has looked
            reading.set()
            release.wait(timeout=5)
        return load(self, inputs, params, ctxs, *rest)

    def spy_merge(self, units, weights, params, ctxs):
        if not seen:
            assert reading.wait(timeout=5)
            seen.append(ctxs[0].threads.workers_for(1e12))
            release.set()
            for _ in range(500):  # the read finishes: its thread is no longer busy
                if ctxs[0].threads.workers_for(1e12) == 2:
                    break
                time.sleep(0.01)
            seen.append(ctxs[0].threads.workers_for(1e12))
        return merge_batch(self, units, weights, params, ctxs)

    monkeypatch.setattr(Lego, "load_batch", spy_load)
    monkeypatch.setattr(Lego, "merge_batch", spy_merge)
    merge(paths, "lego", tmp_path / "two", params={"k": 5, "batch_modules": 2}, force=True, threads=2)
    assert seen == [1, 2]
    monkeypatch.setattr(Lego, "load_batch", load)
    monkeypatch.setattr(Lego, "merge_batch", merge_batch)
    merge(paths, "lego", tmp_path / "one", params={"k": 5, "batch_modules": 2}, force=True, threads=1)
    name = "adapter_model.safetensors"
    assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_busy_threads_are_taken_off_the_pools():
    busy = Busy()
    budget = ThreadBudget(3, busy=busy)
    assert budget.workers_for(1e12) == 3 and budget.workers_for(1.0) == 1 and budget == ThreadBudget(3)
    with busy.hold():
        assert budget.workers_for(1e12) == 2 and budget.gemm_workers_for(1e12) == 2
        with busy.hold(), busy.hold():
            assert budget.workers_for(1e12) == 1  # never below one
    assert busy.count == 0 and budget.workers_for(1e12) == 3


def test_pool_buffers_reuse_a_free_buffer_that_fits_and_drop_those_that_do_not():
    bufs = PoolBuffers()
    small, big = bufs.take(10, torch.float32), bufs.take(100, torch.float32)
    assert bufs.holder(small[3:]) is not None and bufs.holder(torch.empty(5)) is None
    bufs.give(small)
    bufs.give(big)
    again = bufs.take(50, torch.float32)  # the small free buffer does not fit, the big one does
    assert again.numel() == 50 and again.data_ptr() == big.data_ptr() and len(bufs._free) == 1
    assert bufs.take(200, torch.float32).numel() == 200 and not bufs._free  # none fits: the free ones dropped
    for t in [bufs.take(10, torch.float32) for _ in range(3)]:
        bufs.give(t)
    assert len(bufs._free) == 2


def _ranked_adapters(tmp_path: Path, ranks: list[int]) -> list[Path]:
    return [write_peft(tmp_path / f"r{i}", tensors=_tensors(10 + i, r), config=peft_config(r, lora_alpha=3 * r))
            for i, r in enumerate(ranks)]


@pytest.mark.parametrize("threads", [NO_BUDGET, ThreadBudget(1), ThreadBudget(2)])
@pytest.mark.parametrize("features,signs", [("canonical", "rule"), ("canonical", "invariant"), ("paper", "none")])
@pytest.mark.parametrize("ranks", [[4, 4, 4], [2, 5, 3]])
@pytest.mark.parametrize("grams", ["none", "all", "some"])
def test_the_pass_made_while_reading_gives_the_pool_of_build_pools_own_pass(tmp_path, monkeypatch, threads, features,
                                                                           signs, ranks, grams):
    """With the weights and sort-key generators, read_pools weights B, projects the sort keys (b from its
    staging buffer), takes the max-abs norms (per module) and signs while reading, and (when the batch's
    products are row blocks and another batch is being merged) the modules' B-Grams, all or some;
    build_pools then uses them (``PoolKeys``), computes the B-Grams left, and its pool is bit for bit the one
    of its own pass over loaded units."""
    blocks = grams != "none"
    if blocks:  # these tiny products as row blocks, as the 7B layout's are
        monkeypatch.setattr(threads_module, "PARALLEL_MIN_FLOPS", 0.0)
        monkeypatch.setattr(threads_module, "MATMUL_ROW_BLOCK", 3)  # several blocks per module
        merging = itertools.cycle([True] if grams == "all" else [True, False])  # "some": every other module
        monkeypatch.setattr(PoolBuffers, "merging", property(lambda self: next(merging)))
    ads = [load_adapter(p) for p in _ranked_adapters(tmp_path, ranks)]
    inputs = [[(a, i) for i, a in enumerate(ads)] for _ in MODULES]
    weights = [[0.3, 1.7, -0.9]] * len(MODULES)  # relative weights 3w/2.9: none exact in float32
    loaded = [[a.units(m, source=i) for a, i in ins] for ins, m in zip(inputs, MODULES)]
    want = _pools(loaded, weights, threads, None, features, signs)
    buffers = PoolBuffers()
    gens = [ModuleContext(m, 0, torch.device("cpu")).generator("o") for m in MODULES]
    units = read_pools(inputs, MODULES, buffers, threads, weights=weights, generators=gens, signs=signs)
    keys = buffers.keys(units[0][0].A)
    assert keys is not None and keys.fits(units, weights, signs, [ModuleContext(m, 0, torch.device("cpu")).generator("o")
                                                                   for m in MODULES])
    assert (keys.GB is not None) == (blocks and threads.budget is not None)
    if keys.GB is not None:
        assert sum(keys.has_gram) == (len(MODULES) if grams == "all" else len(MODULES) // 2)
    got = _pools(units, weights, threads, buffers, features, signs)
    for f in FIELDS:
        assert torch.equal(getattr(got, f), getattr(want, f)), f


def test_keys_taken_for_other_weights_signs_or_generators_are_not_used(tmp_path):
    ads = [load_adapter(p) for p in _adapters(tmp_path)]
    inputs = [[(a, i) for i, a in enumerate(ads)] for _ in MODULES]
    weights = [[1.0, 0.5, 2.0]] * len(MODULES)
    ctxs = [ModuleContext(m, 0, torch.device("cpu")) for m in MODULES]
    buffers = PoolBuffers()
    units = read_pools(inputs, MODULES, buffers, weights=weights, generators=[c.generator("o") for c in ctxs], signs="rule")
    keys = buffers.keys(units[0][0].A)
    gens = [c.generator("o") for c in ctxs]
    assert keys.fits(units, weights, "rule", gens)
    assert not keys.fits(units, [[1.0, 0.5, 2.5]] * len(MODULES), "rule", gens)
    assert not keys.fits(units, weights, "none", gens)
    assert not keys.fits(units, weights, "rule", [c.generator("other") for c in ctxs])
    assert not keys.fits([list(us) for us in units[:-1]], weights[:-1], "rule", gens[:-1])
    buffers.give(units[0][0].A)
    assert buffers.keys(units[0][0].A) is None  # given back: the keys go with the buffer


@pytest.mark.parametrize("threads", [1, 2])
def test_merge_bytes_with_unequal_ranks_equal_those_of_loading_and_copying(tmp_path, monkeypatch, threads):
    """Unequal ranks take the per-input column max-abs; unequal weights weight B while reading."""
    paths = [str(p) for p in _ranked_adapters(tmp_path, [2, 5, 3, 4])]
    kw = dict(params={"k": 5, "batch_modules": 4, "signs": "rule"}, weights=[1.0, 0.3, 2.0, -0.7], force=True,
              threads=threads)
    _assert_bytes_of_the_default_reading(paths, kw, tmp_path, monkeypatch, threads)


def _bad(tmp_path: Path, where: str, value: float, alpha: float = 12.0) -> list[str]:
    """Three adapters, the second's module 1 with ``value`` at one entry of ``where`` (A or B)."""
    paths = [str(p) for p in _adapters(tmp_path)]
    t = _tensors(1)
    t[f"{PREFIX}{MODULES[1]}.lora_{where}.weight"][2, 1] = value
    paths[1] = str(write_peft(tmp_path / "bad", tensors=t, config=peft_config(4, lora_alpha=alpha)))
    return paths


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["nan-A", "inf-B", "scale-overflow", "magnitude"])
def test_a_bad_input_is_refused_by_the_per_module_check_with_the_message_of_units(tmp_path, threads, case):
    """The read checks a whole module's inputs at once (max-abs of rows and columns): a NaN/Inf in the file
    names the tensor, an overflowing scale or magnitude the module, with the words of Adapter.units."""
    where, value, alpha = {"nan-A": ("A", float("nan"), 12.0), "inf-B": ("B", float("inf"), 12.0),
                           "scale-overflow": ("B", 3e38, 12.0), "magnitude": ("A", 1e16, 12.0)}[case]
    paths = _bad(tmp_path, where, value, alpha)
    with pytest.raises(LoraMergeError) as via_units:
        load_adapter(paths[1]).units(MODULES[1])
    with pytest.raises(LoraMergeError) as via_merge:
        merge(paths, "lego", tmp_path / "out", params={"k": 5, "batch_modules": 6}, force=True, threads=threads)
    assert str(via_merge.value) == str(via_units.value)
    assert str(Path(paths[1])) in str(via_merge.value) and MODULES[1] in str(via_merge.value)
    if case in ("nan-A", "inf-B"):
        assert f"lora_{where}.weight contains NaN or Inf" in str(via_merge.value)


def test_check_read_refuses_what_units_refuses(tmp_path):
    ad = load_adapter(_bad(tmp_path, "B", float("nan"))[1])
    u = ad.units(MODULES[0])  # a good module: the bounds pass
    ad.check_read(MODULES[0], float(u.A.abs().max()), float(u.B.abs().max()))
    with pytest.raises(LoraMergeError, match="contains NaN or Inf"):
        ad.check_read(MODULES[1], 1.0, float("nan"))
    with pytest.raises(LoraMergeError, match="could reach"):
        ad.check_read(MODULES[0], 1e10, 1e10)


def test_a_read_while_a_batch_is_merged_takes_the_b_grams_and_the_bytes_stay(tmp_path, monkeypatch):
    """Only a read made while a batch is being merged computes B-Grams (then on the reading thread); the
    merged bytes are those of build_pools computing them."""
    monkeypatch.setattr(threads_module, "PARALLEL_MIN_FLOPS", 0.0)
    monkeypatch.setattr(threads_module, "MATMUL_ROW_BLOCK", 5)
    ads = [load_adapter(p) for p in _adapters(tmp_path, r=6)]
    inputs = [[(a, i) for i, a in enumerate(ads)] for _ in MODULES]
    lego, buffers = Lego(), PoolBuffers()
    lego.__dict__["_read_buffers"] = buffers
    ctxs = [ModuleContext(m, 0, torch.device("cpu"), ThreadBudget(1)) for m in MODULES]
    params = Lego.Params(k=5)
    weights = [[1.0, 0.5, 2.0]] * len(MODULES)
    plain = lego.load_batch(inputs, params, ctxs, weights)
    assert buffers.keys(plain[0][0].A).GB is None  # no merge in progress: build_pools makes them
    want = [m.units for m in lego.merge_batch(plain, weights, params, ctxs)]
    with buffers.merges.hold():
        ahead = lego.load_batch(inputs, params, ctxs, weights)
    assert all(buffers.keys(ahead[0][0].A).has_gram)
    got = [m.units for m in lego.merge_batch(ahead, weights, params, ctxs)]
    assert all(torch.equal(g.A, w.A) and torch.equal(g.B, w.B) for g, w in zip(got, want))


def test_inputs_within_bounds_each_are_not_refused_when_the_module_wide_bound_is_exceeded(tmp_path, monkeypatch):
    """The per-module check first tests the module's largest |A| and |B| together (a bound that every input
    then passes); when that fails, each input is checked on its own: large A in one input and large B in
    another are accepted, as the default reading accepts them."""
    paths = [str(p) for p in _adapters(tmp_path)]
    for k, (where, j) in enumerate([("A", 0), ("B", 2)]):
        t = _tensors(10 + k)
        t[f"{PREFIX}{MODULES[1]}.lora_{where}.weight"][1, 1] = 1e8  # |A|·|B|·r ≈ 1e9 per input, 1e16 across
        paths[j] = str(write_peft(tmp_path / f"big{k}", tensors=t, config=peft_config(4, lora_alpha=12)))
    kw = dict(params={"k": 5, "batch_modules": 6}, force=True, threads=1)
    merge(paths, "lego", tmp_path / "new", **kw)
    monkeypatch.setattr(Lego, "load_batch", Algorithm.load_batch)
    merge(paths, "lego", tmp_path / "old", **kw)
    name = "adapter_model.safetensors"
    assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes()
