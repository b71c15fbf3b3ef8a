"""trioflow core: a JSON-defined graph engine for Trio programs.

Everything an embedding program needs is re-exported here; other modules are
internal and may change.
"""

from __future__ import annotations

from .context import RunContext as RunContext
from .document import GraphDocument as GraphDocument
from .engine import Engine as Engine
from .engine import EngineLimits as EngineLimits
from .engine import open_engine as open_engine
from .errors import CapacityError as CapacityError
from .errors import ConditionError as ConditionError
from .errors import EngineError as EngineError
from .errors import EngineStoppingError as EngineStoppingError
from .errors import ExpressionBudgetError as ExpressionBudgetError
from .errors import ExpressionError as ExpressionError
from .errors import ExpressionEvaluationError as ExpressionEvaluationError
from .errors import GraphConflictError as GraphConflictError
from .errors import GraphValidationError as GraphValidationError
from .errors import InputValidationError as InputValidationError
from .errors import LeaseHeldError as LeaseHeldError
from .errors import LeaseLostError as LeaseLostError
from .errors import LimitExceededError as LimitExceededError
from .errors import Problem as Problem
from .errors import RegistryError as RegistryError
from .errors import RunStalledError as RunStalledError
from .errors import RunStateError as RunStateError
from .errors import StaleRequestError as StaleRequestError
from .errors import StateValidationError as StateValidationError
from .errors import StoreConflictError as StoreConflictError
from .errors import StoreError as StoreError
from .errors import StoreLockedError as StoreLockedError
from .errors import UnknownGraphError as UnknownGraphError
from .errors import UnknownRunError as UnknownRunError
from .graph import Graph as Graph
from .graph import compile_graph as compile_graph
from .host import StoreHealth as StoreHealth
from .logs import Event as Event
from .logs import Level as Level
from .logs import LogEntry as LogEntry
from .registry import Registry as Registry
from .registry import Tool as Tool
from .registry import default_registry as default_registry
from .runs import TERMINAL as TERMINAL
from .runs import RunRecord as RunRecord
from .runs import RunStatus as RunStatus
from .state import JsonState as JsonState
from .stores import MemoryStore as MemoryStore
from .stores import Page as Page
from .stores import Store as Store
from .stores import open_store_from_url as open_store_from_url

__version__ = "0.1.0"
