"""Every entry point is a thin caller of one pipeline: the same request gives the same bytes.

For each input family (PEFT, kohya, diffusers, and a kohya + diffusers pair of the same SD model,
which needs the name alignment) a LoRA-LEGO merge and a routed adapter are written through
``loramerge merge``, ``cluster`` / ``route``, ``run`` (a recipe) and the Python API; the adapter
files must be byte-identical, and the merge must equal Σ ΔW of the inputs where it is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_peft_adapter
from sd_helpers import diffusers_state_dict, kohya_state_dict, save
from typer.testing import CliRunner

from mergekit_lora import load_adapter, merge
from mergekit_lora.cli.main import app
from mergekit_lora.pipeline import make_options
from mergekit_lora.routing import route

runner = CliRunner()


def _linear_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop conv modules (routing takes linear modules only): keep the keys of 2-D factors (+ their alpha)."""
    conv = {k.rsplit(".", 2)[0] for k, v in sd.items() if v.dim() == 4}
    return {k: v for k, v in sd.items() if not any(k.startswith(c + ".") for c in conv)}


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, list[str]]:
    d = tmp_path_factory.mktemp("inputs")
    k1 = save(d / "k1.safetensors", _linear_only(kohya_state_dict(seed=1)))
    k2 = save(d / "k2.safetensors", _linear_only(kohya_state_dict(seed=2, r=2)))
    d1 = save(d / "d1.safetensors", _linear_only(diffusers_state_dict(seed=3)))
    d2 = save(d / "d2.safetensors", _linear_only(diffusers_state_dict(seed=4, r=2)))
    p1 = make_peft_adapter(d / "p1", "llama", seed=5)
    p2 = make_peft_adapter(d / "p2", "llama", seed=6, r=2, lora_alpha=2)
    return {"peft": [str(p1), str(p2)], "kohya": [str(k1), str(k2)], "diffusers": [str(d1), str(d2)],
            "kohya+diffusers": [str(k1), str(d2)]}


def _cli(*args: str) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output


def _recipe(path: Path, sources: list[str], method: str, params: dict, out: Path) -> Path:
    doc = {"method": method, "adapters": [{"source": s, "weight": 0.5} for s in sources], "parameters": params,
           "output": {"path": str(out)}, "seed": 3}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _tensor_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.rglob("*.safetensors"))}


def _all_entry_points(tmp_path: Path, src: list[str], method: str, params: dict, command: list[str],
                      python: object) -> None:
    """``merge -m METHOD``, the dedicated command, ``run`` on a recipe and the Python API: same tensor bytes."""
    common = ["--weights", "0.5,0.5", "--seed", "3", "-o"]
    ps = [x for k, v in params.items() for x in ("-p", f"{k}={v}")]
    _cli("merge", *src, "-m", method, *ps, *common, tmp_path / "merge")
    _cli(*command, *src, *common, tmp_path / "command")
    _cli("run", _recipe(tmp_path / "r.yaml", src, method, params, tmp_path / "run"))
    python(src, tmp_path / "api")  # type: ignore[operator]
    ref = _tensor_files(tmp_path / "merge")
    assert ref
    for entry in ("command", "run", "api"):
        assert _tensor_files(tmp_path / entry) == ref, entry


@pytest.mark.parametrize("family", ["peft", "kohya", "diffusers", "kohya+diffusers"])
def test_lego_is_the_same_through_every_entry_point(tmp_path, families, family):
    src = families[family]
    _all_entry_points(tmp_path, src, "lego", {"k": 3}, ["cluster", "-k", "3"],
                      lambda s, o: merge(s, "lego", o, params={"k": 3}, weights=[0.5, 0.5], seed=3))
    # The mixed pair is aligned to one naming: every module of both inputs lines up (none duplicated).
    out = load_adapter(tmp_path / "api")
    assert len(out) == len(load_adapter(src[0])) == len(load_adapter(src[1]))


@pytest.mark.parametrize("family", ["peft", "kohya", "diffusers", "kohya+diffusers"])
def test_route_is_the_same_through_every_entry_point_and_exact_at_full_top_k(tmp_path, families, family):
    src = families[family]
    _all_entry_points(tmp_path, src, "route", {"top_k": 64}, ["route", "--top-k", "64"],
                      lambda s, o: route(s, o, {"top_k": 64}, [0.5, 0.5], options=make_options(seed=3)))
    # top-k ≥ R keeps every unit: read as an adapter, the routed output at route's default strength (`sum`:
    # the weights scaled to sum to n, every unit at full strength) is exactly ΔW_1 + ΔW_2.
    routed = load_adapter(tmp_path / "api")
    merge(src, "linear", tmp_path / "lin", weights=[1.0, 1.0])
    lin = load_adapter(tmp_path / "lin")
    assert sorted(routed.module_names()) == sorted(lin.module_names())
    for n in lin.module_names():
        a, b = routed.units(n).delta(), lin.units(n).delta()
        assert torch.allclose(a, b, atol=1e-5 * max(1.0, float(b.abs().max()))), n


def test_route_refuses_conv_modules_at_plan_time(tmp_path, monkeypatch):
    """Routing takes linear modules only: said by plan() from the headers, before any tensor is read."""
    from mergekit_lora import LoraMergeError
    from mergekit_lora.adapter import Adapter

    k = save(tmp_path / "k.safetensors", kohya_state_dict(seed=1))  # has conv modules
    read = []
    monkeypatch.setattr(Adapter, "units", lambda self, *a, **kw: read.append(a) or None)
    with pytest.raises(LoraMergeError, match="routing supports linear"):
        route([str(k)], tmp_path / "o", {"top_k": 2})
    assert read == [] and not (tmp_path / "o").exists()


def test_route_fits_hierarchical_profiles_from_the_cli(tmp_path):
    """--router hierarchical --profile-data A.jsonl --profile-data B.jsonl: each adapter's input Gaussians are fitted on
    its own file, stored in the routed adapter, and the card says so; profile misuse is one error line."""
    import json

    from safetensors import safe_open

    shift, double, base = "examples/tiny-llama-shift", "examples/tiny-llama-double", "examples/tiny-llama"
    files = []
    for i, name in enumerate(("a", "b")):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"input_ids": [(3 * j + i) % 17 + 1 for j in range(6)]}) + "\n"
                             for _ in range(4)))
        files.append(str(f))
    out = tmp_path / "hier"
    _cli("route", shift, double, "--top-k", "4", "--router", "hierarchical", "--base", base,
         "--profile-data", files[0], "--profile-data", files[1], "-o", out)
    with safe_open(str(out / "routed_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert any(k.endswith(".profile_mean") for k in keys) and any(k.endswith(".profile_var") for k in keys)
    assert "## Profiles" in (out / "README.md").read_text()
    for args, message in ((["--profile-data", files[0]], "1 profile files for 2 adapters"),
                          (["--router", "implicit", "--profile-data", files[0], "--profile-data", files[1]],
                           "(--profile-data) are for the hierarchical router"),
                          (["--profile", files[0]], "route --profile is deprecated")):  # old spelling: warns
        cmd = ["route", shift, double, "--top-k", "4", "--base", base, "-o", str(tmp_path / "x")]
        if "--router" not in args:
            cmd += ["--router", "hierarchical"]
        r = runner.invoke(app, [*cmd, *args])
        assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "x").exists()
