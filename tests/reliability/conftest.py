from __future__ import annotations

from collections.abc import Callable

import pytest

from reliability_runs import CASES, COUNTS, Run, reference_run


@pytest.fixture(scope="session")
def make_reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """The uninterrupted run of a case, made once per session."""
    made: dict[str, Run] = {}

    def get(name: str) -> Run:
        pytest.importorskip("sklearn", reason="digits-kd needs scikit-learn (pip install 'distil[classic]')")
        if name not in made:
            made[name] = reference_run(CASES[name], tmp_path_factory.mktemp(f"reference-{name}"))
        return made[name]

    return get


@pytest.fixture
def reference(make_reference: Callable[[str], Run]) -> Run:
    return make_reference("digits-kd")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if COUNTS["scenarios"]:
        terminalreporter.write_line(f"reliability: {COUNTS['delivered']} kills delivered over "
                                    f"{COUNTS['scenarios']} passing kill scenarios, each resumed to a bitwise-equal run")
    if COUNTS["time_kills"]:
        terminalreporter.write_line(f"reliability: {COUNTS['time_kills']} kills at random times, "
                                    f"{COUNTS['time_kills_at_backstop']} of them at the run's last rename (it got "
                                    "there first), the others mid-run")
    for line in COUNTS.get("estimates", []):
        terminalreporter.write_line(f"reliability: memory {line}")
    if COUNTS["fuzzed"]:
        terminalreporter.write_line(f"reliability: {COUNTS['fuzzed']} malformed recipe inputs fuzzed through the CLI")
