"""Meta-tests: every hookspec is documented in docs/plugins/hooks.md under a heading with its
exact signature, and has a ``test_hook_<name>`` test; no heading documents a hook that no
longer exists."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from netshrink.registry import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS_MD = ROOT / "docs" / "plugins" / "hooks.md"
TESTS = Path(__file__).resolve().parent


def _hookspecs() -> dict[str, object]:
    return {name: func for name, func in vars(hookspecs).items()
            if callable(func) and hasattr(func, "netshrink_spec")}


def _annotation(value: object) -> str:
    # The hookspecs module uses `from __future__ import annotations`: annotations are the source
    # text already; otherwise let inspect format the object.
    return value if isinstance(value, str) else inspect.formatannotation(value)


def signature_text(func) -> str:
    """``name(arg: Type, ...) -> Return`` as written in the hookspec's source."""
    sig = inspect.signature(func)
    params = ", ".join(
        p.name if p.annotation is inspect.Parameter.empty
        else f"{p.name}: {_annotation(p.annotation)}"
        for p in sig.parameters.values())
    ret = ("" if sig.return_annotation is inspect.Signature.empty
           else f" -> {_annotation(sig.return_annotation)}")
    return f"{func.__name__}({params}){ret}"


def _headings() -> list[str]:
    return [line for line in HOOKS_MD.read_text().splitlines() if line.startswith("#")]


def test_there_are_hookspecs():
    assert set(_hookspecs()) >= {"register_compressors", "register_layer_selectors",
                                 "register_model_adapters", "register_datasets",
                                 "register_commands"}


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_hook_is_documented_with_its_signature(name):
    expected = f"## `{signature_text(_hookspecs()[name])}`"
    matching = [h for h in _headings() if h.strip() == expected]
    assert matching, (f"docs/plugins/hooks.md has no heading with {expected}; headings: "
                      f"{_headings()}")


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_hook_has_a_test(name):
    pattern = re.compile(rf"^def test_hook_{name}\(", re.MULTILINE)
    files = [p.name for p in TESTS.glob("test_*.py") if pattern.search(p.read_text())]
    assert files, f"no test named test_hook_{name} in tests/"


def test_documented_hooks_exist():
    specs = _hookspecs()
    # Hook headings are the level-2 headings that start with a code span.
    documented = {m.group(1) for h in _headings() for m in [re.match(r"## `(\w+)\(", h)] if m}
    stale = sorted(documented - set(specs))
    assert not stale, f"docs/plugins/hooks.md documents hooks that do not exist: {stale}"


def test_signature_text_is_exact():
    # Guards the helper itself: a wrong rendering would make the doc check meaningless.
    assert signature_text(hookspecs.register_compressors) == \
        "register_compressors(register: Callable[[type], None]) -> None"
