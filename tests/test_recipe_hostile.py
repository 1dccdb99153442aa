"""Hostile and mistaken recipes: each is refused quickly with a short RecipeError that names the
file (and line), the step, the compressor and the field, never with a hang, a MemoryError or a
bare parser exception."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import netshrink as ns
from netshrink import recipe, registry
from netshrink.errors import ConfigError, RecipeError
from netshrink.recipe import MAX_RECIPE_BYTES, MAX_VALUE_CHARS, Recipe, short_repr

#: No line of a refusal is longer than this (a value is cut to MAX_VALUE_CHARS characters).
MAX_LINE = 2 * MAX_VALUE_CHARS + 400

BOMB = """\
steps:
  - compressor: magnitude
    config:
      a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
      d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
      e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
      f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
      g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
      h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
      i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.fixture
def lookup() -> Iterator[None]:
    """Steps checked against the registry's compressors (what the registry installs)."""
    previous = recipe.set_compressor_lookup(registry.get_compressor)
    try:
        yield
    finally:
        recipe.set_compressor_lookup(previous)


def _refused(call, *, within: float = 2.0) -> str:
    """Run ``call``, which must raise a RecipeError within ``within`` seconds with readable
    lines; return the message."""
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        call()
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < within, f"took {elapsed:.1f}s: {message[:200]}"
    assert all(len(line) <= MAX_LINE for line in message.splitlines()), message[:2000]
    return message


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_alias_bomb_refused_fast_naming_file_and_line(tmp_path):
    path = _write(tmp_path, "bomb.yaml", BOMB)
    message = _refused(lambda: Recipe.from_file(path))
    assert f"recipe {path}, line " in message and "billion laughs" in message
    line = int(message.split(", line ")[1].split(":")[0])
    assert 4 <= line <= 12  # the line of the collection that went over the limit


def test_recursive_yaml_alias_refused(tmp_path):
    path = _write(tmp_path, "r.yaml", "steps: &s [{compressor: magnitude, config: {x: *s}}]\n")
    message = _refused(lambda: Recipe.from_file(path))
    assert "line 1" in message and "recursive alias" in message


def test_ordinary_aliases_and_merge_keys_still_load(tmp_path):
    path = _write(
        tmp_path,
        "r.yaml",
        "steps:\n"
        "  - compressor: magnitude\n    config: &half {sparsity: 0.5}\n"
        "    finetune: &tune {epochs: 1, lr: 0.01}\n"
        "  - compressor: magnitude\n    config: *half\n"
        "    finetune:\n      <<: *tune\n      epochs: 2\n",
    )
    steps = Recipe.from_file(path).steps
    assert steps[1].config == {"sparsity": 0.5}
    assert (steps[1].finetune.epochs, steps[1].finetune.lr) == (2, 0.01)


def test_oversized_recipe_file_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"steps: []\n" + b"#" * MAX_RECIPE_BYTES)
    message = _refused(lambda: Recipe.from_file(path))
    assert "larger than 2 MiB" in message and str(path) in message


def test_a_directory_or_device_is_refused_unread(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    assert "is not a regular file" in _refused(lambda: Recipe.from_file(tmp_path / "d.yaml"))
    if Path("/dev/zero").exists():  # endless: must never be read
        assert "is not a regular file" in _refused(lambda: Recipe.from_file("/dev/zero"))


def test_non_utf8_recipe_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"steps:\n  - compressor: magnitude\n    label: \xff\xfe\n")
    assert "not UTF-8" in _refused(lambda: Recipe.from_file(path))


def test_duplicate_yaml_key_names_key_and_lines(tmp_path):
    path = _write(
        tmp_path,
        "r.yaml",
        "steps:\n  - compressor: magnitude\n    config: {sparsity: 0.5}\n"
        "    config: {sparsity: 0.9}\n",
    )
    message = _refused(lambda: Recipe.from_file(path))
    assert f"recipe {path}, line 4: duplicate key 'config' (first on line 3" in message


def test_duplicate_yaml_key_inside_a_flow_mapping(tmp_path):
    path = _write(
        tmp_path, "r.yaml", "steps:\n  - compressor: magnitude\n    config: {sparsity: 0.5,\n"
        "      sparsity: 0.9}\n"
    )
    assert "line 4: duplicate key 'sparsity'" in _refused(lambda: Recipe.from_file(path))


def test_duplicate_json_key_names_the_key(tmp_path):
    path = _write(
        tmp_path,
        "r.json",
        '{"steps": [{"compressor": "magnitude", "config": {"sparsity": 0.5, "sparsity": 0.9}}]}',
    )
    message = _refused(lambda: Recipe.from_file(path))
    assert "duplicate key 'sparsity' in a JSON object" in message and str(path) in message


def test_duplicate_toml_key_is_a_recipe_error(tmp_path):
    path = _write(tmp_path, "r.toml", '[[steps]]\ncompressor = "magnitude"\ncompressor = "svd"\n')
    message = _refused(lambda: Recipe.from_file(path))
    assert str(path) in message and "line 3" in message


def test_deeply_nested_json_is_a_recipe_error(tmp_path):
    path = _write(tmp_path, "r.json", "[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in _refused(lambda: Recipe.from_file(path))


def test_huge_value_in_an_error_is_cut(tmp_path):
    huge = "y" * 1_000_000
    path = _write(
        tmp_path, "r.json", json.dumps({"steps": [{"compressor": "magnitude", "label": [huge]}]})
    )
    message = _refused(lambda: Recipe.from_file(path))
    assert "step 0 (magnitude): field 'label'" in message and "..." in message
    assert len(message) < 1000


def test_short_repr_never_renders_a_huge_value():
    shared = [0.5] * 10
    for _ in range(12):  # 10**13 numbers by reference: repr() would never finish
        shared = [shared] * 10
    start = time.perf_counter()
    texts = [short_repr(shared), short_repr("x" * 10**7), short_repr(10**10000), short_repr({})]
    assert time.perf_counter() - start < 0.5
    assert all(len(t) <= MAX_VALUE_CHARS for t in texts)
    assert texts[1].endswith("...") or "..." in texts[1]
    assert texts[3] == "{}"


def test_every_steps_problems_are_reported_at_once(lookup):
    data = {
        "steps": [
            {"compressor": "magnitude", "config": {"sparsity": 1.5}},
            {"compressor": "quantize", "config": {"bits": 1}, "finetune": {"epochs": -1}},
            {"compressor": "svd", "config": {"nope": 1}},
        ]
    }
    lines = _refused(lambda: Recipe.parse(data)).splitlines()
    assert [line.split(": field ")[0] for line in lines] == [
        "recipe: step 0 (magnitude)",
        "recipe: step 1 (quantize)",
        "recipe: step 1 (quantize)",
        "recipe: step 2 (svd)",
    ]
    assert "field 'config.sparsity'" in lines[0] and "(got 1.5)" in lines[0]
    assert {"field 'finetune.epochs'", "field 'config.bits'"} == {
        line.split(": ")[2] for line in lines[1:3]
    }
    assert "field 'config.nope'" in lines[3]


def test_step_fails_on_the_line_that_builds_it(lookup):
    message = _refused(lambda: ns.step("magnitude", sparsity=1.5))
    assert message == (
        "step (magnitude): field 'config.sparsity': Input should be less than 1 (got 1.5)"
    )


def test_step_with_a_huge_shared_value_fails_fast_and_short(lookup):
    shared = [0.5] * 10
    for _ in range(12):
        shared = [shared] * 10
    message = _refused(lambda: ns.step("magnitude", sparsity=shared), within=1.0)
    assert "field 'config.sparsity'" in message and "..." in message


def test_unknown_compressor_lists_the_registered_ones(lookup):
    for call in (
        lambda: ns.step("magnitud"),
        lambda: Recipe.parse({"steps": [{"compressor": "magnitud"}]}),
    ):
        message = _refused(call)
        assert "field 'compressor': Unknown compressor 'magnitud'" in message
        assert "Did you mean 'magnitude'?" in message and "Registered compressors:" in message
        assert "quantize" in message


def test_bad_override_fails_when_the_step_is_built(lookup):
    assert registry.get_compressor("bioclust").layer_fields[0] == "bits"
    message = _refused(
        lambda: ns.step("bioclust", overrides={"fc1": {"bits": 99}, "fc2": {"nope": 1}})
    )
    lines = message.splitlines()
    assert lines[0].startswith("step (bioclust): field 'overrides.fc1.bits': ")
    assert "(got 99)" in lines[0]
    assert lines[1].startswith("step (bioclust): field 'overrides.fc2.nope': ")


def test_recipe_errors_are_config_errors(lookup):
    with pytest.raises(ConfigError):
        ns.step("magnitude", sparsity=-1)


def test_valid_steps_pass_the_early_check(lookup, tmp_path):
    made = ns.step("bioclust", bits=3, overrides={"fc1": {"bits": 2}})
    assert made.config == {"bits": 3}
    path = _write(tmp_path, "r.yaml", "steps:\n  - compressor: magnitude\n    config: {}\n")
    assert Recipe.from_file(path).steps[0].compressor == "magnitude"


def test_without_an_installed_lookup_the_registry_is_used():
    previous = recipe.set_compressor_lookup(None)
    try:
        with pytest.raises(ns.RecipeError, match="no-such-method"):
            ns.step("no-such-method", sparsity=7)
        with pytest.raises(ns.RecipeError, match="sparsity"):
            ns.step("magnitude", sparsity=7)
    finally:
        recipe.set_compressor_lookup(previous)


def test_a_fresh_interpreter_checks_steps_early():
    code = (
        "import netshrink as ns\n"
        "try:\n    ns.step('magnitude', sparsity=1.5)\n"
        "except ns.RecipeError as exc:\n    print('refused:', exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "refused: step (magnitude): field 'config.sparsity'" in out.stdout
