"""The demo over several realizations: a workflow on the `demo` dataset run with its default `seed`
set to each of --seeds (another phantom and particle set of the same design, and other job seeds),
each in its own project, then one table of the demo's checks (`flow summary`).

    .venv/bin/python bench/demo_realizations.py [--workflow workflows/standard_pipeline.yaml]
        [--seeds 0,1,2,3] [--root demo_realizations] [--parallel 2] [--set JOB.PARAM=VALUE ...]

Each seed gets ROOT/seed_N/ with the workflow copy (workflow.yaml, `defaults.seed` = N) and its
project; `--set` passes overrides to every run. A project already there is reused job by job (as
`flow run` does), so re-tabulating finished runs costs only the summaries. Runs are `flow run`
subprocesses, --parallel at a time (2 on 2 cores: each run then takes about twice as long).
Columns: the checked number of each checked job (ARI, FSC-to-truth resolution in Å, best
|corr(latent, t)|) with PASS / FAIL (the ARI of hetero_refine and class_3d without: one of them
passing is the "(all)" states check), whether the demo passed (every PASS / FAIL check), and the
run's wall time. One realization that passes says little; a design, a default or a rule is judged
over several.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FLOW = [str(Path(sys.executable).parent / "flow")]


def workflow_for_seed(workflow: Path, seed: int, out: Path) -> Path:
    """A copy of the workflow at out/workflow.yaml with ``defaults.seed`` = seed."""
    spec = yaml.safe_load(workflow.read_text())
    spec.setdefault("defaults", {})["seed"] = seed
    out.mkdir(parents=True, exist_ok=True)
    path = out / "workflow.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_seed(workflow: Path, seed: int, root: Path, sets: list[str]) -> tuple[int, float, list[dict] | str]:
    """(seed, wall s, summary rows or the failure's last output lines) of one realization."""
    out = root / f"seed_{seed}"
    wf = workflow_for_seed(workflow, seed, out)
    opts = [f"--set={s}" for s in sets] + ["--project", str(out / "project")]
    t0 = time.perf_counter()
    run = subprocess.run([*FLOW, "run", str(wf), *opts], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "run.log").write_text(run.stdout + run.stderr)
    summ = subprocess.run([*FLOW, "summary", str(wf), *opts, "--json"], cwd=ROOT, capture_output=True, text=True)
    if summ.returncode != 0:
        tail = (run.stdout + run.stderr + summ.stderr).strip().splitlines()[-3:]
        return seed, wall, " / ".join(tail)
    return seed, wall, json.loads(summ.stdout)


def _verdict(row: dict) -> str:
    """'PASS ' / 'FAIL ' of a summary row's check, '' for the ARI cell of a classification job."""
    word = row["check"].split()[0]
    return f"{word} " if word in ("PASS", "FAIL") else ""


def _cell(row: dict) -> str:
    """A checked row's table cell: verdict and number, or the check text without a number."""
    return row["check"] if row["value"] is None else f"{_verdict(row)}{row['value']:.3f}"


def table(results: list[tuple[int, float, list[dict] | str]]) -> str:
    """Markdown table: one row per seed, one column per checked job (module doc)."""
    jobs: list[str] = []
    for _, _, rows in results:
        for r in rows if isinstance(rows, list) else []:
            if r["check"] and r["job"] not in jobs:
                jobs.append(r["job"])
    lines = ["| seed | " + " | ".join(jobs) + " | demo passed | wall (s) |", "|---" * (len(jobs) + 3) + "|"]
    for seed, wall, rows in sorted(results):
        if isinstance(rows, str):
            lines.append(f"| {seed} | failed: {rows} |")
            continue
        checked = [r for r in rows if r["check"]]
        cells = {r["job"]: _cell(r) for r in checked}
        ok = all(_verdict(r) == "PASS " for r in checked if _verdict(r))
        row = " | ".join(cells.get(j, "") for j in jobs)
        lines.append(f"| {seed} | {row} | {'yes' if ok else 'no'} | {wall:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workflow", type=Path, default=ROOT / "workflows/standard_pipeline.yaml")
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds")
    ap.add_argument("--root", type=Path, default=ROOT / "demo_realizations", help="one folder per seed in here")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="JOB.PARAM=VALUE for every run")
    args = ap.parse_args()
    if not args.workflow.is_file():
        sys.exit(f"--workflow: {args.workflow} is not a file")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        sys.exit(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    root = args.root.resolve()
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        results = list(pool.map(lambda s: run_seed(args.workflow.resolve(), s, root, args.sets), seeds))
    print(f"{args.workflow.name}, seeds {seeds}{', ' + ' '.join(args.sets) if args.sets else ''}\n")
    print(table(results))


if __name__ == "__main__":
    main()
