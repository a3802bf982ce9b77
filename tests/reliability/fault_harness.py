"""Running the real CLI in child processes, with faults injected at chosen moments.

Children are forked from a multiprocessing forkserver that has already imported torch (with torch._dynamo, which
the first AdamW imports), distil and scikit-learn: a child starts in milliseconds instead of the ~3 s of CPU an
interpreter start costs, so a test can afford many processes. Each child runs `distil.cli.main(argv)` -- what
`python -m distil` runs -- with its own environment, stdout and stderr going to a log file.

Faults are placed by *events*: calls of the functions that matter for durability (each optimizer step, metric write,
checkpoint tensor or JSON write, fsync, rename, folder removal), each forward pass of a causal LM (one per generated
token) and the start of each training stage. A plan says what to do just before event number N: `kill_at` (a real
SIGKILL sent by the process to itself: no handler, no `finally`, no flush runs; `kill_on` [kind, text, n]: just
before the n-th event of that kind whose detail contains the text, e.g. a resumed run's 2nd optimizer step) or
`pause_at` (write a marker file, then wait until a release file appears, so a test can send signals from outside
while the run is at a known point; `pause_on` pauses at the first event whose detail contains that text, e.g. the
last rename of every run). `record` writes the list of events when the run ends. `file_size_limit` kills the process
inside a write, at a chosen byte: the write that would take any file past that many bytes stores what fits and then
dies of SIGXFSZ, as the kernel sends it (RLIMIT_FSIZE). `address_space_mb` caps the child's address space that far
above what it maps at start, so a large allocation fails for real (RLIMIT_AS: refused up front, never touching the
machine's memory).

`python -m distil` subprocesses get the same injection through tests/reliability/inject/sitecustomize.py when
DISTIL_TEST_FAULTS holds a JSON plan.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

import distil.cli  # noqa: F401
import distil.runner  # noqa: F401
import distil.measure.cost  # noqa: F401
from distil.tasks import classification
from distil.train import checkpoint as ckpt
from distil.train import loop
from distil.train.metrics import MetricsLog

try:  # imported on first use by torch.optim; preloading it saves every child ~1 s
    import torch._dynamo  # noqa: F401
except ImportError:
    pass
try:
    import sklearn.datasets  # noqa: F401
except ImportError:
    pass

SRC = Path(__file__).resolve().parents[2] / "src"


class _Injector:
    def __init__(self, plan: dict[str, Any]):
        self.plan, self.count, self.stage, self.events, self.matches = plan, 0, "-", [], 0

    def event(self, kind: str, detail: str = "") -> None:
        self.count += 1
        if self.plan.get("record"):
            self.events.append([self.count, kind, detail, self.stage])
        if self.count == self.plan.get("kill_at"):
            os.kill(os.getpid(), signal.SIGKILL)
        target = self.plan.get("kill_on")  # [kind, text in the detail, n]: before the n-th such event
        if target and kind == target[0] and target[1] in detail:
            self.matches += 1
            if self.matches == target[2]:
                os.kill(os.getpid(), signal.SIGKILL)
        if self.count == self.plan.get("pause_at") or self.plan.get("pause_on", "\0") in detail:
            Path(self.plan["marker"]).write_text(f"{kind} {detail} {self.stage}")
            deadline = time.monotonic() + 60
            while not Path(self.plan["release"]).exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # signal handlers run here (a second Ctrl-C raises out of this sleep)


_injector: _Injector | None = None


def _replace_everywhere(original: Any, replacement: Any) -> None:
    """Rebind `original` wherever a loaded module holds it (modules that did `from x import f` hold their own name)."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not namespace or not (getattr(module, "__name__", "").startswith(("distil", "os", "shutil", "posix"))):
            continue
        for name, value in list(namespace.items()):
            if value is original:
                setattr(module, name, replacement)


def install(plan: dict[str, Any]) -> _Injector:
    """Wrap the durability-relevant functions so each call is an event of `plan`."""
    global _injector
    injector = _injector = _Injector(plan)

    def wrap(function: Any, kind: str, describe: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            injector.event(kind, describe(*args, **kwargs))
            return function(*args, **kwargs)

        wrapped.__wrapped__ = function
        return wrapped

    path_of = lambda *a, **k: str(a[0]) if a else ""  # noqa: E731
    for function, kind, describe in [
        (os.replace, "replace", lambda src, dst, *a, **k: f"{src} -> {dst}"),
        (os.fsync, "fsync", lambda *a, **k: ""),
        (shutil.rmtree, "rmtree", path_of),
        (ckpt.save_tensors, "save_tensors", path_of),
        (ckpt.write_json, "write_json", path_of),
    ]:
        _replace_everywhere(function, wrap(function, kind, describe))

    original_train = loop.train

    def train(stage: loop.Stage, **kwargs: Any) -> Any:
        injector.stage = stage.name
        injector.event("stage", stage.name)
        return original_train(stage, **kwargs)

    _replace_everywhere(original_train, train)
    original_write = MetricsLog.write

    def write(self: MetricsLog, record: dict[str, Any]) -> None:
        injector.event("metrics", f"{record.get('arm')} {record.get('step')}")
        original_write(self, record)

    MetricsLog.write = write  # type: ignore[method-assign]
    register_optimizer_step_post_hook(lambda *a: injector.event("step"))

    def forward(module: torch.nn.Module, args: Any) -> None:
        if type(module).__name__.endswith("ForCausalLM"):  # one per generated token: a kill lands mid-generation
            injector.event("forward", type(module).__name__)

    register_module_forward_pre_hook(forward)
    return injector


def install_from_env() -> None:
    plan = os.environ.get("DISTIL_TEST_FAULTS")
    if plan:
        install(json.loads(plan))


# ------------------------------------------------------------------------------------------------ child processes
def _child(argv: list[str], env: dict[str, str], log: str, plan: dict[str, Any], result: str) -> None:
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    # Free heap pages inherited from the server go back to the OS, so that the run's peak counts what it allocates.
    distil.measure.cost._trim_heap()
    injector = install(plan)
    if plan.get("file_size_limit"):  # a write past this many bytes of any file kills the process (SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it, turning the kill into an OSError
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (plan["file_size_limit"], hard))
    if plan.get("address_space_mb"):  # a real allocation failure: allow only this much beyond what is mapped now
        mapped = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize:")))
        limit = mapped * 1024 + plan["address_space_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    # The peak of the training stages: the maximum of VmHWM, sampled while the run goes on (the kernel's mark can
    # drop when memory is returned, so one reading at the end could miss it), until training ends: the first
    # measurement of a trained model (classification's _measure, or any pipeline's peak-RSS reset), patched here to
    # take a last reading first. What follows (inference measurements, the report's plots) is not training memory.
    peak_kb, done, reset = [0], threading.Event(), threading.Event()

    def record_peak() -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak_kb[0] = max(peak_kb[0], int(line.split()[1]))

    def sample_peak() -> None:
        while not done.wait(0.002) and not reset.is_set():
            record_peak()

    def training_ends_before(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not reset.is_set():
                record_peak()
                reset.set()
            return function(*args, **kwargs)
        return wrapper

    distil.measure.cost._reset_peak_rss = training_ends_before(distil.measure.cost._reset_peak_rss)
    classification.ClassificationRun._measure = training_ends_before(classification.ClassificationRun._measure)
    sampler = threading.Thread(target=sample_peak, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        code = distil.cli.main(argv)
    finally:
        done.set()
        sampler.join()
    if not reset.is_set():
        record_peak()
    training_peak = peak_kb[0]
    Path(result).write_text(json.dumps({
        "events": injector.events,
        "maxrss_kb": training_peak,
        "seconds": time.monotonic() - started,  # the run itself, without the process start
    }))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_context: Any = None


def _forkserver() -> Any:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        # Also what the language-model scenarios import (a missing one is skipped): seconds saved in every child.
        _context.set_forkserver_preload([__name__, "matplotlib.backends.backend_agg", "transformers.generation.utils",
                                         "transformers.models.llama.modeling_llama"])
    return _context


@dataclass
class Child:
    process: Any
    log: Path
    result: Path

    def wait(self, timeout: float = 120) -> int:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"child did not finish within {timeout} s; log:\n{self.output()}")
        return self.process.exitcode

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def outcome(self) -> dict[str, Any]:
        return json.loads(self.result.read_text()) if self.result.exists() else {}


_counter = 0


def start(argv: list[str], *, env: dict[str, str], logs: Path, plan: dict[str, Any] | None = None) -> Child:
    """Start `distil <argv>` in a forked child; its output goes to a fresh log file under `logs`."""
    global _counter
    _counter += 1
    logs.mkdir(parents=True, exist_ok=True)
    log, result = logs / f"child-{_counter}.log", logs / f"child-{_counter}.json"
    # The forkserver, started on first use, inherits the environment: single-threaded kernels (the same arithmetic
    # in every child, and kind to a shared CI machine), and a PYTHONPATH that finds this module to preload it
    # (Python 3.11's forkserver ignores the parent's sys.path).
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH")}
    os.environ.update({k: "1" for k in saved if k != "PYTHONPATH"})
    os.environ["PYTHONPATH"] = subprocess_env()["PYTHONPATH"]
    try:
        process = _forkserver().Process(target=_child, args=(argv, env, str(log), plan or {}, str(result)))
        process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return Child(process, log, result)


def run(argv: list[str], *, env: dict[str, str], logs: Path, plan: dict[str, Any] | None = None,
        timeout: float = 120) -> tuple[int, Child]:
    child = start(argv, env=env, logs=logs, plan=plan)
    return child.wait(timeout), child


def subprocess_env(plan: dict[str, Any] | None = None, **extra: str) -> dict[str, str]:
    """Environment for a real `python -m distil` subprocess, with the injector loaded by sitecustomize."""
    inject = Path(__file__).resolve().parent / "inject"
    paths = [str(inject), str(Path(__file__).resolve().parent), str(SRC), os.environ.get("PYTHONPATH", "")]
    paths = list(dict.fromkeys(p for part in paths for p in part.split(os.pathsep) if p))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", **extra}
    if plan:
        env["DISTIL_TEST_FAULTS"] = json.dumps(plan)
    return env
