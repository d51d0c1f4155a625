"""The generation engine: per-row sampling, the shared prefix cache and continuous batching."""

from gkt.engine.generation import EngineRequest, EngineResult, Generation, GenerationFailed
from gkt.engine.sampling import RowSampler, Sampler
from gkt.engine.scheduler import Engine

__all__ = [
    "Engine",
    "EngineRequest",
    "EngineResult",
    "Generation",
    "GenerationFailed",
    "RowSampler",
    "Sampler",
]
