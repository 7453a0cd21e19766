"""``--ray-address``: merges that join a running cluster keep their workers warm for the next merge.

A head node of its own (``ray start --head``) and two driver processes, one after the other, as two
``loramerge merge --ray-address`` calls would be: the second finds both workers warm (same processes,
no cold start) and both write the local run's bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ray_head import head_env, head_pids, head_temp_dir, start_head
from typer.testing import CliRunner

from mergekit_lora.cli.main import app

EXAMPLES = Path(__file__).parents[1] / "examples"
SRC = [str(EXAMPLES / "tiny-llama-shift"), str(EXAMPLES / "tiny-llama-double")]

DRIVER = r"""
import json, sys
from mergekit_lora.distributed.ray_merge import RayOptions, ray_stream
from mergekit_lora.options import MergeOptions
from mergekit_lora.pipeline import MergeRequest, execute, plan
address, out, release = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
merge = ray_stream(RayOptions(address=address))
execute(plan(MergeRequest(sources=sys.argv[4:], method="ties", params={"density": 0.5}, weights=[0.7, -0.4], options=MergeOptions(out=out, device="cpu", seed=3))), merge)
if release:
    import ray
    from mergekit_lora.distributed.merge_pool import release_kept
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print("released", release_kept(ray))
print("STATS " + json.dumps(merge.stats.__dict__))
"""


@pytest.fixture(scope="module")
def ray_head():
    pytest.importorskip("ray")
    gen = start_head(2)
    address = next(gen)
    temp_dir = head_temp_dir(address)
    assert head_pids(temp_dir)
    yield address
    next(gen, None)
    assert not head_pids(temp_dir), "the head's processes outlived the fixture"


def _drive(address: str, out: Path, release: bool = False) -> dict:
    r = subprocess.run([sys.executable, "-c", DRIVER, address, str(out), "1" if release else "0", *SRC],
                       env=head_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("STATS "))[6:])


def test_second_merge_reuses_the_warm_workers(tmp_path, ray_head):
    first = _drive(ray_head, tmp_path / "a")
    second = _drive(ray_head, tmp_path / "b", release=True)
    assert first["workers"] == second["workers"] == 2
    assert first["reused"] == 0 and second["reused"] == 2
    assert sorted(first["worker_pids"]) == sorted(second["worker_pids"])
    r = CliRunner().invoke(app, ["merge", *SRC, "-m", "ties", "--density", "0.5", "--weights", "0.7,-0.4",
                                 "--seed", "3", "--device", "cpu", "-o", str(tmp_path / "local")])
    assert r.exit_code == 0, r.output
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        local = (tmp_path / "local" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() == local == (tmp_path / "b" / name).read_bytes()
