"""Canonical JSON and content hashes: stable across processes, machines and YAML formatting."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any


def _normalise(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number {value!r} cannot be part of a job key")
        return value
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_normalise(v) for v in value)
    return value


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, no whitespace, shortest round-trip floats (Python repr)."""
    return json.dumps(
        _normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def job_key(job_type: str, version: int, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Key of a job (DESIGN.md §5): type, VERSION, params with defaults (seed included), input keys."""
    return sha256_text(
        canonical_json(
            {
                "schema": "cryodag.job/v1",
                "type": job_type,
                "version": version,
                "params": params,
                "inputs": inputs,
            }
        )
    )


def artifact_key(job_key_: str, slot: str) -> str:
    """Key of the artifact a job writes in one output slot."""
    return sha256_text(canonical_json({"schema": "cryodag.artifact/v1", "job": job_key_, "slot": slot}))
