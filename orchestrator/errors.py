"""Errors of the orchestrator with their exit codes (DESIGN.md §9)."""


class UsageError(Exception):
    """Invalid workflow, parameter or command line: exit code 2, nothing runs.

    `problems` lists every finding, each naming the job and field (or file).
    """

    exit_code = 2

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))
