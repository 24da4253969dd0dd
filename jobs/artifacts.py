"""Typed artifact handles passed between jobs: small pydantic models naming files, never arrays.

Paths inside an artifact are relative to the project directory (so a project can be moved),
and name the *final* job directory even while the job still writes into its temporary one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class Artifact(BaseModel, ABC):
    """Base of every artifact kind: a set of files plus a small summary."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: str
    #: Columns/capabilities that slot requirements can ask for (e.g. "ctf", "alignments3D").
    provides: frozenset[str] = frozenset()
    summary: dict[str, float | int | str | list[float] | list[int]] = Field(default_factory=dict)

    #: Kinds registered by subclasses, for deserialising handles by their `kind` field.
    registry: ClassVar[dict[str, type[Artifact]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: object) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("kind")
        if field is not None and isinstance(field.default, str):
            Artifact.registry[field.default] = cls

    @abstractmethod
    def files(self) -> list[str]:
        """Every file (relative to the project) this artifact consists of; checksummed."""

    @staticmethod
    def load(data: dict) -> Artifact:
        """Rebuild a handle from its JSON dict, choosing the class by `kind`."""
        return Artifact.registry[data["kind"]].model_validate(data)


class ParticleSet(Artifact):
    """RELION 3.1 STAR (optics + particles) and the MRC stacks its rlnImageName points into.

    provides: "ctf", "alignments2D", "alignments3D", "class", "coordinates", "latent".
    """

    kind: Literal["ParticleSet"] = "ParticleSet"
    star: str
    stacks: list[str]
    count: int
    box: int
    pixel_size: float  # Å/px

    def files(self) -> list[str]:
        return [self.star, *self.stacks]


class Micrographs(Artifact):
    """Motion-corrected micrographs (MRC) with their CTF, listed in a micrographs STAR."""

    kind: Literal["Micrographs"] = "Micrographs"
    star: str
    micrographs: list[str]
    pixel_size: float

    def files(self) -> list[str]:
        return [self.star, *self.micrographs]


class ClassAverages2D(Artifact):
    """K 2D class averages in one MRC stack, with a STAR of per-class statistics."""

    kind: Literal["ClassAverages2D"] = "ClassAverages2D"
    stack: str
    star: str
    num_classes: int
    box: int
    pixel_size: float

    def files(self) -> list[str]:
        return [self.stack, self.star]


class Volume(BaseModel):
    """One map with its optional half-maps, mask and FSC curve (a STAR table)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    map: str
    half_a: str | None = None
    half_b: str | None = None
    mask: str | None = None
    fsc: str | None = None
    resolution_A: float | None = None

    def files(self) -> list[str]:
        return [p for p in (self.map, self.half_a, self.half_b, self.mask, self.fsc) if p]


class VolumeSet(Artifact):
    """One or K maps (MRC with voxel size in the header)."""

    kind: Literal["VolumeSet"] = "VolumeSet"
    volumes: list[Volume]
    box: int
    pixel_size: float

    def files(self) -> list[str]:
        return [f for v in self.volumes for f in v.files()]


class Mask(Artifact):
    """A soft real-space mask (MRC, values in [0, 1])."""

    kind: Literal["Mask"] = "Mask"
    map: str
    box: int
    pixel_size: float

    def files(self) -> list[str]:
        return [self.map]


class VariabilityModel(Artifact):
    """3DVA result: mean map, K component maps, per-particle latents (in the particles STAR)."""

    kind: Literal["VariabilityModel"] = "VariabilityModel"
    mean: str
    components: list[str]
    particles_star: str
    box: int
    pixel_size: float

    def files(self) -> list[str]:
        return [self.mean, *self.components, self.particles_star]


def resolve(project_dir: Path, rel: str) -> Path:
    """Absolute path of an artifact file given relative to the project directory."""
    p = Path(rel)
    return p if p.is_absolute() else project_dir / p
