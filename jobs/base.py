"""The job contract (DESIGN.md §4): params model, typed slots, version, run function.

A job module builds one `JobType` and the registry (`jobs.registry`) lists it. Jobs know
nothing of Prefect or SQL: `run(params, inputs, ctx)` is callable from a plain script.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from jobs.artifacts import Artifact
from kernels.symmetry import point_group

if TYPE_CHECKING:
    from jobs.context import JobContext


def _point_group_symbol(v: str) -> str:
    point_group(v)
    return v.strip().upper()


#: A point-group param ("C1", "C4", "D7"), validated and upper-cased.
PointGroup = Annotated[str, AfterValidator(_point_group_symbol)]


class JobParams(BaseModel):
    """Base of every job's parameters: frozen, unknown fields rejected; units in field names."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    seed: int = Field(0, description="Random seed; the same seed gives the same result")


@dataclass(frozen=True)
class Slot:
    """An input slot: the artifact kind it takes and what that artifact must provide."""

    kind: type[Artifact]
    requires: frozenset[str] = frozenset()
    optional: bool = False
    help: str = ""

    def kind_name(self) -> str:
        return self.kind.model_fields["kind"].default


@dataclass(frozen=True)
class Interaction:
    """A human choice a job needs before it runs (Select 2D classes, for example).

    `needs_input(params)` says whether the params still lack the choice; `form(params, inputs,
    project_dir)` returns a pydantic model whose fields are the params to fill (with defaults
    proposed from the inputs) and a markdown description (pictures as data URIs). The answer
    becomes params, so it enters the job key and the provenance.
    """

    needs_input: Callable[[JobParams], bool]
    form: Callable[[JobParams, Mapping[str, Artifact], Path], tuple[type[BaseModel], str]]


RunFn = Callable[[JobParams, Mapping[str, Artifact], "JobContext"], Mapping[str, Artifact]]


@dataclass(frozen=True)
class JobType:
    """Everything the orchestrator needs to know about one job type."""

    name: str
    params: type[JobParams]
    inputs: Mapping[str, Slot]
    outputs: Mapping[str, type[Artifact]]
    version: int
    run: RunFn
    summary: str = ""
    #: Output slot -> capabilities the output provides beyond its input's (for validation).
    adds: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: Output slot -> input slot whose capabilities it passes through.
    passes: Mapping[str, str] = field(default_factory=dict)
    gpu: bool = False
    interaction: Interaction | None = None

    def output_kind(self, slot: str) -> str:
        return self.outputs[slot].model_fields["kind"].default
