"""Hostile recipes (issue 14): alias bombs, deep nesting, recursive aliases, non-UTF-8 bytes, huge
recipes of unknown keys — each one `error:` line (or one error listing at most 50 problems), exit 2."""

from __future__ import annotations

import pytest
from reliab_helpers import assert_one_error, write_peft
from typer.testing import CliRunner

from mergekit_lora import LoraMergeError
from mergekit_lora.cli.main import app
from mergekit_lora.recipe import validate_recipe
from mergekit_lora.recipe.problems import MAX_SHOWN, Problems
from mergekit_lora.recipe.yaml_lines import MAX_DEPTH, load_yaml_with_lines

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))

HOSTILE = {
    "alias-bomb": (BOMB.encode(), ["aliases (*a) are not allowed", "line 2"]),
    "recursive-alias": (b"method: linear\nadapters: &x [*x]\n", ["aliases (*x) are not allowed"]),
    "self-merge-alias": (b"base: &b {seed: 1}\nmore:\n  <<: *b\n", ["aliases (*b) are not allowed"]),
    "deep-flow": (b"method: " + b"[" * 200 + b"]" * 200 + b"\n", [f"nested deeper than {MAX_DEPTH} levels"]),
    "deeper-flow": (b"method: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", ["not valid YAML", "line 1"]),
    "deep-block": ("".join("  " * i + f"k{i}:\n" for i in range(200)).encode() + b"  " * 200 + b"v\n",
                   [f"nested deeper than {MAX_DEPTH} levels"]),
    "latin-1": ("method: linéar\n".encode("latin-1"), ["not UTF-8 text", "byte 0xe9 on line 1", "save it as UTF-8"]),
    "binary": (b"\x00\x01\xff\xfe" * 10, ["not UTF-8 text"]),
    "complex-key": (b"? [a, b]\n: 1\nmethod: linear\n", ["recipe"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_recipe_is_one_error(tmp_path, case):
    body, fragments = HOSTILE[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(body)
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert_one_error(result, [recipe.name, *fragments])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_anchors_without_aliases_and_moderate_nesting_still_load():
    data, lines, dups = load_yaml_with_lines("a: &x 1\nb: " + "[" * 20 + "]" * 20 + "\n", "r")
    assert data["a"] == 1 and lines[("b",)] == 2 and not dups


def test_problems_are_deduplicated_in_order_and_capped():
    p = Problems("r.yaml", {("k",): 3})
    for i in range(200):
        p.add(("k", i), "unknown key")
        p.add(("k", i), "unknown key")  # duplicates collapse
    assert len(p.items) == 200
    with pytest.raises(LoraMergeError) as e:
        p.raise_if_any()
    msg = str(e.value)
    assert msg.startswith("r.yaml: 200 problems in the recipe:")
    assert msg.count("\n  - ") == MAX_SHOWN == 50
    assert msg.endswith("… and 150 more (fix these first)")


def test_a_quarter_megabyte_of_unknown_keys_is_one_short_error(tmp_path):
    """~250 kB of unknown top-level keys: collected linearly, printed as 50 rows and a count."""
    a = write_peft(tmp_path / "a")
    extra = "".join(f"unknown_key_{i}: {i}\n" for i in range(12_000))
    text = f"method: linear\nadapters: [{{source: {a}}}]\noutput: {{path: {tmp_path / 'o'}}}\n{extra}"
    assert len(text) > 200_000
    with pytest.raises(LoraMergeError) as e:
        validate_recipe(text, "big.yaml")
    msg = str(e.value)
    assert msg.startswith("big.yaml: 12000 problems in the recipe:")
    assert len(msg.splitlines()) == 1 + MAX_SHOWN + 1
    assert "unknown_key_0 (line 4): unknown key" in msg
