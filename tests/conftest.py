"""Fixtures shared by the whole suite. Area-specific fixtures live next to their tests."""

from __future__ import annotations

import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from trioflow import Engine, Registry, default_registry, open_engine

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


@pytest.fixture
def spec_graph() -> dict[str, Any]:
    """The specification's sample graph, exactly as shipped in samples/."""
    return json.loads((SAMPLES / "code_review.json").read_text())


@pytest.fixture
def registry() -> Registry:
    return default_registry()


@pytest.fixture
async def engine(registry: Registry) -> AsyncIterator[Engine]:
    async with open_engine(registry=registry) as eng:
        yield eng
