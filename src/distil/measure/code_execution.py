"""Running model-written Python against unit tests (HumanEval's pass@1), each program in its own process.

A completion is untrusted code. Each runs in a fresh `python -I -S -B` (no site-packages, no environment, no user
site) in an empty scratch directory that is deleted afterwards, with limits on memory (RLIMIT_AS), CPU time,
file size and wall-clock time (its whole process group is killed), and a Python audit hook, installed before the
program is read, that refuses what a solution never needs: writing, deleting or renaming anything outside the
scratch directory, sockets, starting processes and loading C libraries with ctypes. An audit hook cannot be
removed from Python code once added. It is a guard against accidents and careless generations, not a container
against a determined attacker (native code could escape it); run benchmarks of unknown models in a throw-away
machine or container too.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# The program the child runs before the solution: the audit hook, then the solution read from stdin.
GUARD = r'''
import os, sys
scratch = os.path.realpath(os.getcwd())
program = sys.stdin.read()
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
PATH_EVENTS = {"os.remove": 1, "os.rename": 2, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
               "os.symlink": 2, "os.link": 2, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1,
               "shutil.copyfile": 2, "shutil.move": 2, "os.chdir": 1}
REFUSED = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.system",
           "os.kill", "os.killpg", "ctypes.", "pty.", "os.putenv", "os.unsetenv", "resource.setrlimit",
           "sys.addaudithook", "signal.")

def inside(path):
    if isinstance(path, int):
        return True  # an open file descriptor: what it names was checked when it was opened
    real = os.path.realpath(os.fsdecode(path))
    return real == scratch or real.startswith(scratch + os.sep)

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        if writing and path is not None and not inside(path):
            raise PermissionError(f"distil sandbox: writing {path!r} outside the scratch directory is refused")
    elif event in PATH_EVENTS:
        for path in args[:PATH_EVENTS[event]]:
            if path is not None and not inside(path):
                raise PermissionError(f"distil sandbox: {event} on {path!r} outside the scratch directory is refused")
    elif event.startswith(REFUSED):
        raise PermissionError(f"distil sandbox: {event} is refused")

sys.addaudithook(hook)
del hook
exec(compile(program, "solution.py", "exec"), {"__name__": "__main__"})
'''


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed", "failed" (an exception, a failed assertion, a refused action) or "timeout"
    detail: str = ""  # the last line of the error output

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(memory_bytes: int, cpu_s: int) -> None:
    """In the child, before it starts: its resource limits."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run `program` (a solution and the tests that check it) in a sandboxed child; passed = it exits 0."""
    with tempfile.TemporaryDirectory(prefix="distil-exec-") as scratch:
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", GUARD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, cwd=scratch, env=env, start_new_session=True,
            preexec_fn=lambda: _limits(memory_mb << 20, int(timeout_s) + 1))
        try:
            _, err = child.communicate(program.encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return Outcome("timeout", f"no result within {timeout_s:g} s")
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        if child.returncode == 0:
            return Outcome("passed")
        lines = err.decode(errors="replace").strip().splitlines()
        if child.returncode == -signal.SIGXCPU:
            return Outcome("timeout", "CPU time limit")
        return Outcome("failed", lines[-1] if lines else f"exit status {child.returncode}")


def humaneval_program(problem: dict, completion: str) -> str:
    """HumanEval's check: the prompt (signature and docstring), the completion, the tests, then check(entry_point)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_1(problems: list[dict], completions: list[str], **limits: float) -> tuple[float, list[Outcome]]:
    """pass@1 of one (greedy) completion per problem, and each outcome."""
    outcomes = [run_program(humaneval_program(p, c), **limits) for p, c in zip(problems, completions, strict=True)]
    return sum(o.passed for o in outcomes) / max(len(outcomes), 1), outcomes
