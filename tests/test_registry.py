"""The model registry: LRU eviction under a memory budget, pinning, and load spans."""

from __future__ import annotations

from collections.abc import Callable

import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gpu_inference.pipeline import DiffusersRunner, GenerationRequest
from gpu_inference.registry import ModelRegistry, pipeline_bytes

MIB = 1024 * 1024


def _model(mib: int) -> torch.nn.Module:
    # float32 parameters: 4 bytes each.
    return torch.nn.Linear(mib * MIB // 4, 1, bias=False)


def test_pipeline_bytes_counts_parameters() -> None:
    assert pipeline_bytes(_model(2)) == 2 * MIB


def test_registry_evicts_least_recently_used() -> None:
    registry = ModelRegistry(budget_bytes=5 * MIB)
    loads: list[str] = []

    def loader(name: str) -> Callable[[], torch.nn.Module]:
        def load() -> torch.nn.Module:
            loads.append(name)
            return _model(2)
        return load

    registry.get("a", loader("a"))
    registry.get("b", loader("b"))
    registry.get("a", loader("a"))
    registry.get("c", loader("c"))

    assert loads == ["a", "b", "c"]
    assert registry.models() == ["a", "c"]
    assert registry.used_bytes() == 4 * MIB


def test_registry_keeps_pinned_model() -> None:
    evicted: list[object] = []
    registry = ModelRegistry(budget_bytes=3 * MIB, on_evict=evicted.append)

    with registry.use("a", lambda: _model(2)):
        registry.get("b", lambda: _model(2))
        assert registry.models() == ["a", "b"]
    registry.get("c", lambda: _model(2))

    assert registry.models() == ["c"]
    assert len(evicted) == 2


def test_registry_traces_load_and_evict() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = ModelRegistry(budget_bytes=3 * MIB, tracer=provider.get_tracer("test"))

    registry.get("a", lambda: _model(2))
    registry.get("b", lambda: _model(2))

    finished = exporter.get_finished_spans()
    spans = [(span.name, dict(span.attributes or {})["gen_ai.request.model"])
             for span in finished]
    assert spans == [("model_load", "a"), ("model_evict", "a"), ("model_load", "b")]
    stages = {dict(span.attributes or {})["slotforge.stage"] for span in finished}
    assert stages == {"model_load", "model_evict"}


def test_runner_reports_registry_as_warm_models() -> None:
    # One random pipeline is about 5.4 MiB in float64, so a 4 MiB budget keeps only the last.
    runner = DiffusersRunner(device="cpu", memory_budget_mb=4)
    request = GenerationRequest(model="M1", prompt="", steps=1, width=32, height=32, seed=1)

    runner.generate(request)
    runner.generate(GenerationRequest(model="M2", prompt="", steps=1, width=32, height=32,
                                      seed=1))

    assert runner.warm_models() == ["M2"]
