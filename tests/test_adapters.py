"""LoRA adapters on the random-weight pipeline: files, merging, LRU eviction and spans."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from safetensors.torch import save_file

from gpu_inference.adapters import (
    LoraAdapter,
    LoraLayer,
    PipelineAdapters,
    adapter_path,
    load_adapter,
    random_adapter,
    save_adapter,
)
from gpu_inference.pipeline import (
    BatchItem,
    DiffusersRunner,
    GenerationRequest,
    build_random_pipeline,
)
from gpu_inference.registry import pipeline_bytes
from schemas.errors import PermanentError


def _request(seed: int = 3, loras: tuple[str, ...] = (), **changes: Any) -> GenerationRequest:
    values: dict[str, Any] = {"model": "M1", "prompt": "", "steps": 2, "width": 32,
                              "height": 32, "seed": seed, "loras": loras}
    values.update(changes)
    return GenerationRequest(**values)


def _pixels(runner: DiffusersRunner, request: GenerationRequest) -> np.ndarray:
    return np.asarray(runner.generate(request).image).astype(np.int16)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A folder with two random adapters for model M1, written as safetensors files."""
    pipe = build_random_pipeline("M1", 32, 32)
    for adapter_id in ("style-a", "style-b"):
        save_adapter(random_adapter(pipe, adapter_id), tmp_path / "adapters")
    return tmp_path / "adapters"


def test_adapter_changes_output(adapter_dir: Path) -> None:
    runner = DiffusersRunner(device="cpu", adapter_dir=adapter_dir)

    base = _pixels(runner, _request())
    adapted = _pixels(runner, _request(loras=("style-a",)))
    again = _pixels(runner, _request(loras=("style-a",)))
    other = _pixels(runner, _request(loras=("style-b",)))
    restored = _pixels(runner, _request())

    assert np.abs(adapted - base).mean() > 5
    assert np.array_equal(adapted, again)
    assert not np.array_equal(adapted, other)
    # Removing the adapters restores the model's own weights exactly.
    assert np.array_equal(restored, base)


def test_adapter_file_matches_random_adapter(adapter_dir: Path) -> None:
    from_files = DiffusersRunner(device="cpu", adapter_dir=adapter_dir)
    generated = DiffusersRunner(device="cpu")

    assert np.array_equal(_pixels(from_files, _request(loras=("style-a",))),
                          _pixels(generated, _request(loras=("style-a",))))


def test_adapters_stack_in_order(adapter_dir: Path) -> None:
    runner = DiffusersRunner(device="cpu", adapter_dir=adapter_dir)

    single = _pixels(runner, _request(loras=("style-a",)))
    both = _pixels(runner, _request(loras=("style-a", "style-b")))

    assert not np.array_equal(single, both)
    assert runner.warm_models() == ["M1", "style-a", "style-b"]


def test_batched_adapter_images_match_alone(adapter_dir: Path) -> None:
    runner = DiffusersRunner(device="cpu", adapter_dir=adapter_dir)
    requests = [_request(seed=seed, loras=("style-b",)) for seed in (1, 2)]

    batched = runner.generate_batch([BatchItem(request) for request in requests])
    alone = [_pixels(runner, request) for request in requests]

    for outcome, expected in zip(batched, alone, strict=True):
        assert not isinstance(outcome, BaseException)
        assert np.array_equal(np.asarray(outcome.image).astype(np.int16), expected)


def test_concurrent_adapter_sets_do_not_mix(adapter_dir: Path) -> None:
    runner = DiffusersRunner(device="cpu", adapter_dir=adapter_dir)
    sets = [(), ("style-a",), ("style-b",)]
    expected = [_pixels(runner, _request(loras=loras)) for loras in sets]
    # Slow steps make the calls overlap, so a wrong merge would show in the images.
    runner.before_step = lambda _batch_size, _step: time.sleep(0.01)
    images: dict[int, np.ndarray] = {}

    def generate(index: int) -> None:
        images[index] = _pixels(runner, _request(loras=sets[index]))

    threads = [threading.Thread(target=generate, args=(index,)) for index in range(len(sets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    for index in range(len(sets)):
        assert np.array_equal(images[index], expected[index]), sets[index]


def test_lru_evicts_adapters(adapter_dir: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runner = DiffusersRunner(device="cpu", adapter_dir=adapter_dir)
    runner.set_tracer(provider.get_tracer("test"))
    model_bytes = pipeline_bytes(build_random_pipeline("M1", 32, 32).to(torch.float64))
    adapter_bytes = load_adapter(adapter_dir, "style-a").size_bytes()
    # Room for the model and one adapter, not two.
    runner.registry.budget_bytes = model_bytes + adapter_bytes * 3 // 2

    first = _pixels(runner, _request(loras=("style-a",)))
    assert runner.registry.models() == ["M1", "style-a"]
    runner.generate(_request(loras=("style-b",)))
    assert runner.registry.models() == ["M1", "style-b"]
    # The evicted adapter loads again and gives the same image.
    assert np.array_equal(_pixels(runner, _request(loras=("style-a",))), first)
    assert runner.registry.models() == ["M1", "style-a"]

    spans = [(span.name, dict(span.attributes or {}).get("slotforge.adapter_id"))
             for span in exporter.get_finished_spans() if span.name.startswith("adapter")]
    assert spans == [("adapter_load", "style-a"), ("adapter_evict", "style-a"),
                     ("adapter_load", "style-b"), ("adapter_evict", "style-b"),
                     ("adapter_load", "style-a")]


def test_missing_adapter_fails_permanently(adapter_dir: Path) -> None:
    runner = DiffusersRunner(device="cpu", adapter_dir=adapter_dir)

    (outcome,) = runner.generate_batch([BatchItem(_request(loras=("no-such",)))])

    assert isinstance(outcome, PermanentError)
    assert "not found" in str(outcome)
    assert not runner.is_retriable(outcome)
    # The model still serves requests without the adapter.
    runner.generate(_request())


def test_adapter_for_other_model_rejected(adapter_dir: Path) -> None:
    pipe = build_random_pipeline("M1", 32, 32)
    stray = LoraAdapter("stray", {"unet.no_such_block.to_q": LoraLayer(
        torch.zeros(4, 8), torch.zeros(8, 4), 1.0)})
    state = PipelineAdapters(pipe)

    with pytest.raises(PermanentError, match="does not fit"):
        with state.activate([stray]):
            pass

    assert state.active == ()


def test_adapter_with_wrong_shape_rejected(adapter_dir: Path) -> None:
    pipe = build_random_pipeline("M1", 32, 32)
    good = load_adapter(adapter_dir, "style-a")
    name = sorted(good.layers)[-1]
    # The last layer's update has the wrong input size, so the check runs before any merge.
    wrong = LoraAdapter("wrong", {**good.layers, name: LoraLayer(
        torch.zeros(4, 7), torch.zeros(good.layers[name].up.shape[0], 4), 1.0)})
    before = {key: value.clone() for key, value in pipe.unet.state_dict().items()}
    state = PipelineAdapters(pipe)

    with pytest.raises(PermanentError, match="weight has shape"):
        with state.activate([wrong]):
            pass

    after = pipe.unet.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_adapter_file_without_up_matrix_rejected(tmp_path: Path) -> None:
    path = adapter_path(tmp_path, "half")
    path.parent.mkdir(parents=True)
    save_file({"unet.mid_block.attentions.0.to_q.lora_A.weight": torch.zeros(4, 64)}, str(path))

    with pytest.raises(PermanentError, match="only one of lora_A and lora_B"):
        load_adapter(tmp_path, "half")


@pytest.mark.parametrize("adapter_id", ["", "..", "a/b", "../etc"])
def test_adapter_id_cannot_leave_folder(tmp_path: Path, adapter_id: str) -> None:
    with pytest.raises(PermanentError, match="invalid adapter id"):
        adapter_path(tmp_path, adapter_id)


def test_path_model_without_adapter_dir_rejects_adapters(tmp_path: Path) -> None:
    build_random_pipeline("M1", 32, 32).save_pretrained(tmp_path / "model")
    runner = DiffusersRunner(model_path=str(tmp_path / "model"), device="cpu")

    (outcome,) = runner.generate_batch([BatchItem(_request(loras=("style-a",)))])

    assert isinstance(outcome, PermanentError)
    assert "SLOTFORGE_WORKER__ADAPTER_DIR" in str(outcome)
