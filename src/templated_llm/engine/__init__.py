"""The continuous-batching engine: one scheduler thread per loaded model, sequences joining and
leaving the running batch at every step (see docs/architecture.md)."""

from templated_llm.engine.adapters import HuggingFaceAdapter, ModelAdapter
from templated_llm.engine.cache import SlotCache, StepBatch
from templated_llm.engine.config import EngineConfig
from templated_llm.engine.scheduler import Engine
from templated_llm.engine.sequence import Sequence
from templated_llm.engine.stats import EngineStats, LatencySummary
from templated_llm.errors import EngineClosedError, EngineFullError, SequenceFailedError
from templated_llm.runtime.completions import CANCELLED

__all__ = [
    "CANCELLED",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineFullError",
    "EngineStats",
    "HuggingFaceAdapter",
    "LatencySummary",
    "ModelAdapter",
    "Sequence",
    "SequenceFailedError",
    "SlotCache",
    "StepBatch",
]
