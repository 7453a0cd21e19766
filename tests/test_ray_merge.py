"""``merge --ray``: module batches as Ray tasks give the same bytes (and card) as the local driver."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray_fixtures import ray_session  # noqa: F401  (session fixture)
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.distributed import core
from mergekit_lora.distributed.ray_merge import RayOptions, merge_task, pack, ray_stream
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
])
def test_ray_merge_same_bytes_as_local(tmp_path, ray_session, method, params):  # noqa: F811
    local = execute(plan(MergeRequest(sources=SRC, method=method, params=params, weights=[0.7, -0.4],
                                       options=MergeOptions(out=tmp_path / "local", device="cpu", seed=3))))
    remote = execute(plan(MergeRequest(sources=SRC, method=method, params=params, weights=[0.7, -0.4],
                                        options=MergeOptions(out=tmp_path / "ray", device="cpu", seed=3))),
                     ray_stream(RayOptions(modules_per_task=2)))
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")  # adapter, config, card (with reports)
    assert remote.modules == local.modules and remote.fidelity == local.fidelity
    assert [r.name for r in remote.rows] == [r.name for r in local.rows] and remote.report == local.report


def test_pack_groups_whole_batches():
    batches = [["m"] * n for n in (3, 1, 2, 5, 1)]
    tasks = pack(batches, 4)
    assert [[len(b) for b in t] for t in tasks] == [[3, 1], [2, 5], [1]]
    assert [b for t in tasks for b in t] == batches


def test_merge_task_without_ray_matches_local():
    """The task body alone (what a worker runs) on every batch = the local in-memory merge, tensor for tensor."""
    p = plan(MergeRequest(sources=SRC, method="ties", params={"density": 0.5}, weights=[0.5, 1.0],
                         options=MergeOptions(device="cpu", seed=1)))
    expected = core.merged_units(p)
    got = merge_task(p, core.plan_batches(p))
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
