"""Pins the public surface of ``core``: changing it must change this test."""

from __future__ import annotations

import subprocess
import sys
import types

import core

EXPECTED = {
    # engine and embedding
    "Engine",
    "EngineLimits",
    "StoreHealth",
    "open_engine",
    "RunContext",
    # graphs
    "GraphDocument",
    "Graph",
    "compile_graph",
    "Registry",
    "Tool",
    "default_registry",
    "JsonState",
    # runs and logs
    "RunRecord",
    "RunStatus",
    "TERMINAL",
    "Event",
    "Level",
    "LogEntry",
    # stores
    "Store",
    "MemoryStore",
    "Page",
    "open_store_from_url",
    # errors
    "EngineError",
    "CapacityError",
    "ConditionError",
    "ExpressionError",
    "ExpressionBudgetError",
    "ExpressionEvaluationError",
    "GraphConflictError",
    "GraphValidationError",
    "LimitExceededError",
    "Problem",
    "RegistryError",
    "RunStalledError",
    "RunStateError",
    "StateValidationError",
    "StoreConflictError",
    "StoreError",
    "UnknownGraphError",
    "UnknownRunError",
}

#: ``from __future__ import annotations`` binds this name in every module; it is
#: a compiler feature flag, not an export.
_NOT_EXPORTS = {"annotations"}


def public_names() -> set[str]:
    return {
        name
        for name in dir(core)
        if not name.startswith("_")
        and not isinstance(getattr(core, name), types.ModuleType)
        and name not in _NOT_EXPORTS
    }


def test_public_names_are_pinned() -> None:
    names = public_names()
    assert names - EXPECTED == set(), "new public names: add them here on purpose"
    assert EXPECTED - names == set(), "public names removed: a breaking change"


def test_exports_come_from_core_modules() -> None:
    for name in public_names():
        value = getattr(core, name)
        module = getattr(value, "__module__", None)
        if module is None:  # constants such as TERMINAL
            continue
        assert module == "core" or module.startswith("core."), (name, module)


def test_errors_share_one_root() -> None:
    for name in public_names():
        value = getattr(core, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, core.EngineError), name


def test_terminal_statuses() -> None:
    assert isinstance(core.TERMINAL, frozenset)
    assert {s.value for s in core.TERMINAL} == {"completed", "failed", "cancelled"}


def test_version_is_a_string() -> None:
    assert isinstance(core.__version__, str) and core.__version__


def test_importing_core_does_not_import_web() -> None:
    code = (
        "import sys, core\n"
        "leaked = sorted(m for m in sys.modules if m == 'web' or m.startswith('web.'))\n"
        "print(','.join(leaked))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
