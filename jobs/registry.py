"""The registry of job types. Adding a job type = writing its module and listing it here."""

from __future__ import annotations

import importlib
import os

from jobs.base import JobType

#: Extra job types from the environment: "name=package.module[:ATTR],..." (ATTR defaults to JOB).
ENV_VAR = "CRYODAG_JOB_MODULES"

#: Job type name -> module that defines `JOB`.
_MODULES: dict[str, str] = {
    "import_particles": "jobs.import_particles",
    "class_2d": "jobs.class_2d",
    "remove_duplicates": "jobs.remove_duplicates",
    "select_2d": "jobs.select_2d",
    "rebalance_2d": "jobs.rebalance_2d",
    "ab_initio": "jobs.ab_initio",
    "hetero_refine": "jobs.hetero_refine",
    "homo_refine": "jobs.homo_refine",
    "class_3d": "jobs.class_3d",
    "var_3d": "jobs.var_3d",
    "var_3d_display": "jobs.var_3d_display",
    "select_3d": "jobs.select_3d",
    "combine_volumes": "jobs.combine_volumes",
}


def _modules() -> dict[str, str]:
    extra = os.environ.get(ENV_VAR, "")
    pairs = (item.split("=", 1) for item in extra.split(",") if "=" in item)
    return {**_MODULES, **{k.strip(): v.strip() for k, v in pairs}}


def names() -> list[str]:
    return sorted(_modules())


def get(name: str) -> JobType:
    """The JobType called `name`; KeyError if there is none."""
    module_name, _, attr = _modules()[name].partition(":")
    job: JobType = getattr(importlib.import_module(module_name), attr or "JOB")
    return job


def all_types() -> dict[str, JobType]:
    return {n: get(n) for n in names()}
