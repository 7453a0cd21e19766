"""``merge --ray``: module batches as Ray tasks give the same bytes as the local driver."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray_fixtures import ray_session  # noqa: F401  (session fixture)
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.distributed.ray_merge import RayOptions, merge_task, pack
from mergekit_lora.merge import merge

EXAMPLES = Path(__file__).parents[1] / "examples"
SRC = [str(EXAMPLES / "tiny-llama-shift"), str(EXAMPLES / "tiny-llama-double")]


def _bytes(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("method,params", [
    ("linear", {}),
    ("ties", {"density": 0.5, "rank": 4}),
    ("lego", {"k": 3, "batch_modules": 3}),
])
def test_ray_merge_same_bytes_as_local(tmp_path, ray_session, method, params):  # noqa: F811
    local = merge(SRC, method, tmp_path / "local", weights=[0.7, -0.4], params=params, device="cpu", seed=3)
    remote = merge(SRC, method, tmp_path / "ray", weights=[0.7, -0.4], params=params, device="cpu", seed=3,
                   ray=RayOptions(modules_per_task=2))
    assert _bytes(tmp_path / "local") == _bytes(tmp_path / "ray")
    assert remote.modules == local.modules
    assert [r.name for r in remote.rows] == [r.name for r in local.rows]
    assert remote.fidelity == local.fidelity


def test_pack_groups_whole_batches():
    batches = [([("m",)] * n, None) for n in (3, 1, 2, 5, 1)]
    tasks = pack(batches, 4)  # type: ignore[arg-type]
    assert [[len(b[0]) for b in t] for t in tasks] == [[3, 1], [2, 5], [1]]
    assert [b for t in tasks for b in t] == batches


def test_merge_task_without_ray_matches_local(tmp_path):
    """The task body alone (what a worker runs) on every batch = the local stream, tensor for tensor."""
    from mergekit_lora.distributed import core

    inputs = core.load_inputs(SRC)
    algo, p = core.resolve_params("ties", {"density": 0.5})
    w = [0.5, 1.0]
    expected = core.merged_units(inputs, "ties", p, w, seed=1)
    got = merge_task(SRC, "union", None, "ties", core.plan_batches(inputs, algo, p, w), w, 1, "cpu", p)
    assert [n for n, _, _ in got] == list(expected)
    for name, u, row in got:
        assert row is not None and row.name == name
        assert u.A.equal(expected[name].A) and u.B.equal(expected[name].B)


def test_cli_merge_ray(tmp_path, ray_session):  # noqa: F811
    r = CliRunner().invoke(app, ["merge", *SRC, "-m", "linear", "--weights", "1,0.5", "-o", str(tmp_path / "a"),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["merge", *SRC, "-m", "linear", "--weights", "1,0.5", "-o", str(tmp_path / "b"),
                                 "--device", "cpu", "--ray"])
    assert r.exit_code == 0, r.output
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
