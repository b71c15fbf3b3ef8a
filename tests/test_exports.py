"""Pins the public surface of ``trioflow``: changing it must change this test."""

from __future__ import annotations

import subprocess
import sys
import types

import trioflow

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
    "EngineStoppingError",
    "CapacityError",
    "ConditionError",
    "ExpressionError",
    "ExpressionBudgetError",
    "ExpressionEvaluationError",
    "GraphConflictError",
    "InputValidationError",
    "GraphValidationError",
    "LeaseHeldError",
    "LeaseLostError",
    "LimitExceededError",
    "Problem",
    "RegistryError",
    "RunStalledError",
    "RunStateError",
    "StaleRequestError",
    "StateValidationError",
    "StoreConflictError",
    "StoreError",
    "StoreLockedError",
    "UnknownGraphError",
    "UnknownRunError",
}

#: ``from __future__ import annotations`` binds this name in every module; it is
#: a compiler feature flag, not an export.
_NOT_EXPORTS = {"annotations"}


def public_names() -> set[str]:
    return {
        name
        for name in dir(trioflow)
        if not name.startswith("_")
        and not isinstance(getattr(trioflow, name), types.ModuleType)
        and name not in _NOT_EXPORTS
    }


def test_public_names_are_pinned() -> None:
    names = public_names()
    assert names - EXPECTED == set(), "new public names: add them here on purpose"
    assert EXPECTED - names == set(), "public names removed: a breaking change"


def test_exports_come_from_engine_modules() -> None:
    for name in public_names():
        value = getattr(trioflow, name)
        module = getattr(value, "__module__", None)
        if module is None:  # constants such as TERMINAL
            continue
        assert module == "trioflow" or module.startswith("trioflow."), (name, module)
        assert not module.startswith("trioflow.web"), (name, module)


def test_errors_share_one_root() -> None:
    for name in public_names():
        value = getattr(trioflow, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, trioflow.EngineError), name


def test_terminal_statuses() -> None:
    assert isinstance(trioflow.TERMINAL, frozenset)
    assert {s.value for s in trioflow.TERMINAL} == {"completed", "failed", "cancelled"}


def test_version_is_a_string() -> None:
    assert isinstance(trioflow.__version__, str) and trioflow.__version__


def test_importing_the_engine_does_not_import_the_service() -> None:
    code = (
        "import sys, trioflow\n"
        "leaked = sorted(m for m in sys.modules if m.startswith(('trioflow.web', 'starlette',"
        " 'hypercorn')))\n"
        "print(','.join(leaked))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
