"""Write a JSON Schema file per event, for producers and consumers in other languages."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.events import EVENT_TYPES


def export_json_schemas(directory: Path) -> list[Path]:
    """Write ``<event_type>.v<version>.schema.json`` for every event; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for event_type, model in sorted(EVENT_TYPES.items()):
        schema = model.model_json_schema(mode="serialization")
        version = model.model_fields["schema_version"].default
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"slotforge/{event_type}.v{version}.schema.json"
        path = directory / f"{event_type}.v{version}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
