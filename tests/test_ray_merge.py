"""``merge --ray``: module batches as Ray tasks on merge workers give the same bytes (and card) as the local
driver; warm workers are reused across merges; a worker that dies is replaced and its task retried."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray_fixtures import ray_session  # noqa: F401  (session fixture)
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.distributed import core
from mergekit_lora.distributed.merge_pool import MergePool, MergeWorker, loaded, release_kept
from mergekit_lora.distributed.ray_merge import RayMerge, RayOptions, cut, pack, ray_stream
from mergekit_lora.options import MergeOptions
from mergekit_lora.pipeline import MergeRequest, execute, plan

EXAMPLES = Path(__file__).parents[1] / "examples"
SRC = [str(EXAMPLES / "tiny-llama-shift"), str(EXAMPLES / "tiny-llama-double")]


def _files(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


@pytest.mark.parametrize("method,params", [
    ("linear", {}),
    ("ties", {"density": 0.5, "rank": 4}),
    ("lego", {"k": 3, "batch_modules": 3, "report": True}),
    ("ties", {"density": 0.5, "space": "core"}),
    ("knots_dare_ties", {}),
    ("iso_cts", {"rank": 3}),
    ("svd", {"rank": 4}),
])
def test_ray_merge_same_bytes_as_local(tmp_path, ray_session, method, params):  # noqa: F811
    local = execute(plan(MergeRequest(sources=SRC, method=method, params=params, weights=[0.7, -0.4],
                                       options=MergeOptions(out=tmp_path / "local", device="cpu", seed=3))))
    remote = execute(plan(MergeRequest(sources=SRC, method=method, params=params, weights=[0.7, -0.4],
                                        options=MergeOptions(out=tmp_path / "ray", device="cpu", seed=3))),
                     ray_stream(RayOptions(modules_per_task=2 if method != "svd" else None)))
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")  # adapter, config, card (with reports)
    assert remote.modules == local.modules and remote.fidelity == local.fidelity
    assert [r.name for r in remote.rows] == [r.name for r in local.rows] and remote.report == local.report


def test_pack_groups_whole_batches():
    batches = [["m"] * n for n in (3, 1, 2, 5, 1)]
    tasks = pack(batches, 4)
    assert [[len(b) for b in t] for t in tasks] == [[3, 1], [2, 5], [1]]
    assert [b for t in tasks for b in t] == batches


def test_cut_balances_cost_in_order():
    batches = [[f"m{i}"] for i in range(8)]
    tasks = cut(batches, [1, 1, 1, 1, 4, 1, 1, 6], 4)  # total 16: shares of 4
    assert [b for t in tasks for b in t] == batches  # whole batches, plan order
    assert [[b[0] for b in t] for t in tasks] == [["m0", "m1", "m2", "m3"], ["m4"], ["m5", "m6", "m7"]]
    assert len(cut(batches, [1] * 8, 3)) == 3 and len(cut(batches, [1] * 8, 20)) == 8
    assert cut([], [], 4) == []


def test_batch_costs_from_headers():
    """Each batch's cost is its inputs' factor elements: over the whole plan, every input's parameters."""
    p = plan(MergeRequest(sources=SRC, method="linear", params={}, options=MergeOptions(device="cpu")))
    batches = core.plan_batches(p)
    costs = core.batch_costs(p, batches)
    assert len(costs) == len(batches) and min(costs) > 0
    assert sum(costs) == sum(a.num_params() for a in p.adapters)
    assert core.batch_costs(p, [batches[0] * 2]) == [2 * costs[0]]


def test_merge_task_without_ray_matches_local():
    """The worker's task body alone (what a Ray worker runs) on every batch = the local in-memory merge."""
    p = plan(MergeRequest(sources=SRC, method="ties", params={"density": 0.5}, weights=[0.5, 1.0],
                         options=MergeOptions(device="cpu", seed=1)))
    expected = core.merged_units(p)
    worker = MergeWorker()
    worker.load("t", p)
    got = worker.merge("t", core.plan_batches(p))
    assert [n for n, _, _, _ in got] == list(expected)
    for name, u, row, _ in got:
        assert row is not None and row.name == name
        assert u.A.equal(expected[name].A) and u.B.equal(expected[name].B)


def test_cli_merge_ray(tmp_path, ray_session):  # noqa: F811
    args = ["merge", *SRC, "-m", "linear", "--weights", "1,0.5", "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b"), "--ray"])
    assert r.exit_code == 0, r.output
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")  # recipe.yaml and the card name their own output path
    assert a["adapter_model.safetensors"] == b["adapter_model.safetensors"]
    assert a["adapter_config.json"] == b["adapter_config.json"]


def test_kept_workers_are_reused_across_merges(tmp_path, ray_session):  # noqa: F811
    """With ``keep_s`` (the default when joining a cluster) the second merge finds the same warm workers:
    no cold start, the same worker processes, the same bytes."""
    try:
        runs = []
        for k in range(2):
            merge = RayMerge(RayOptions(workers=2, keep_s=60))
            execute(plan(MergeRequest(sources=SRC, method="ties", params={"density": 0.5}, weights=[0.7, -0.4], options=MergeOptions(out=tmp_path / f"r{k}", device="cpu", seed=3))), merge)
            runs.append(merge.stats)
        assert runs[0].reused == 0 and runs[1].reused == 2
        assert sorted(runs[0].worker_pids) == sorted(runs[1].worker_pids) and len(set(runs[0].worker_pids)) == 2
        execute(plan(MergeRequest(sources=SRC, method="ties", params={"density": 0.5}, weights=[0.7, -0.4], options=MergeOptions(out=tmp_path / "local", device="cpu", seed=3))))
        assert _files(tmp_path / "r0") == _files(tmp_path / "r1") == _files(tmp_path / "local")
    finally:
        assert release_kept(ray_session) == 2  # frees the CPUs for the other Ray tests


def test_dead_worker_is_replaced_and_task_retried(ray_session):  # noqa: F811
    p = plan(MergeRequest(sources=SRC, method="linear", params={}, weights=[1.0, 0.5], options=MergeOptions(device="cpu")))
    tasks = pack(core.plan_batches(p), 2)
    merge = RayMerge(RayOptions())
    pool = MergePool(ray_session, 2)
    ref = ray_session.put(p)
    loaded(pool, "t", ref)
    ray_session.kill(pool.actors[0], no_restart=True)
    try:
        got = [row for result in merge._schedule(ray_session, pool, "t", ref, tasks) for row in result]
    finally:
        pool.close("t")
    assert merge.stats.retried >= 1
    expected = core.merged_units(p)
    assert [n for n, _, _, _ in got] == list(expected)
    assert all(u.A.equal(expected[n].A) and u.B.equal(expected[n].B) for n, u, _, _ in got)
