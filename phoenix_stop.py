"""Clean stops: SIGTERM or Ctrl-C ends a training run between two steps, never in the middle of a save.

    @phoenix_stop.command_line          # a command-line entry (run_train.cli)
    def cli(): ...                      # training inside: fit polls stop_requested() between steps

Only a command-line entry installs the handlers (`stop_on_signals`, which restores the previous ones
on exit); importing this module changes nothing. The first SIGTERM or SIGINT asks for a stop:
  - inside `deferred()` (fit's training loop, Trainer.save) it is only recorded: fit finishes the
    step in flight, saves a step checkpoint if it keeps them, and raises TrainingStopped; a save in
    progress is finished first;
  - anywhere else (reading data, building batches, compiling, evaluating) the handler raises
    TrainingStopped at once: there is nothing to save there.
The entry prints TrainingStopped.line() (what was saved and the command that resumes) as its one
line on stderr and exits with status 128 + signal: 143 for SIGTERM, 130 for SIGINT.

A second Ctrl-C aborts at once: ABORT_AFTER_S after the first arrived, a helper thread (which sees
each signal arrive, through signal.set_wakeup_fd) gives SIGINT back to the kernel's default action,
which ends the process even inside a compile or a device step: no Python code has to run then. (The
helper needs the GIL for a moment; XLA's compile and execute calls release it.) The delay exists
because `uv run` without a terminal forwards the SIGINT it gets to its child 0.2 s later, so one
Ctrl-C sent to the process group arrives twice. Further SIGTERMs are ignored (a scheduler's SIGTERM
may reach both `uv` and Python); a stop already under way goes on. docs/resume.md has the details.

Like KeyboardInterrupt, a TrainingStopped raised from the handler can land where Python ignores
exceptions (a garbage-collection callback, a __del__). There it is not printed, and it is raised
again from the main thread moments later (RERAISE_AFTER_S), so the stop still happens.
"""

import _thread
import contextlib
import ctypes
import functools
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from typing import Callable, Optional

__all__ = [
    "TrainingStopped", "command_line", "stop_on_signals", "stop_requested", "deferred", "invoked_as",
    "SIGNALS", "ABORT_AFTER_S", "SIGINT_COPY_S", "RERAISE_AFTER_S",
]

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Longer than `uv run`'s 0.2 s delay in forwarding a SIGINT (module docstring), short enough that an
# impatient second Ctrl-C still works.
ABORT_AFTER_S = 1.0
# After a stop by SIGINT, how long the handlers stay (from the first signal) before the previous ones
# are restored: `uv run`'s copy of the Ctrl-C comes 0.2 s after it, and would otherwise meet
# Python's default handler while the process exits (a KeyboardInterrupt traceback).
SIGINT_COPY_S = 0.5
# The default action of a signal, as the C library's signal() takes it.
_SIG_DFL = 0
# After a TrainingStopped was swallowed (module docstring): when to raise it again, once the
# callback that swallowed it is likely over.
RERAISE_AFTER_S = 0.01


class TrainingStopped(BaseException):
    """A run ended by SIGTERM / SIGINT (a BaseException, like KeyboardInterrupt, so that no `except
    Exception` between the signal and the command line can swallow it).

    signum: the signal. step, end_step: the step the run had reached and its last (None: stopped
    outside a training loop). saved: the step checkpoint holding that step (None: none kept).
    stage: what was training. For the command line's line, experiments add what they know: kept
    (descriptions of what is saved, replacing `saved`), resume_argv (the arguments of the command that
    continues the run; None: nothing resumable), why_not (why nothing, or not everything, is resumable).
    """

    def __init__(self, signum: int, step: Optional[int] = None, end_step: Optional[int] = None,
                 saved: Optional[str] = None, stage: Optional[str] = None):
        super().__init__(signum, step, saved)
        self.signum, self.step, self.end_step, self.saved, self.stage = signum, step, end_step, saved, stage
        self.kept: list[str] = []
        self.resume_argv: Optional[list[str]] = None
        self.why_not = ""

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The exit status of a process ended by the signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum

    def _head(self) -> str:
        where = f" after step {self.step} of {self.end_step}" if self.step is not None else ""
        return f"stopped by {self.signal_name}{where}" + (f" ({self.stage})" if self.stage else "")

    def __str__(self) -> str:
        return self._head() + (f": saved {self.saved}" if self.saved else ": no checkpoint saved")

    def line(self, program: Optional[list[str]] = None) -> str:
        """The command line's one line: what stopped, what was saved, the command that resumes
        (`program` + resume_argv, shell-quoted; program defaults to invoked_as())."""
        saved = self.kept or ([self.saved] if self.saved else [])
        if self.resume_argv is not None:
            command = shlex.join([*(invoked_as() if program is None else program), *self.resume_argv])
            return (f"{self._head()}: " + (f"saved {', '.join(saved)}" if saved else "nothing saved yet")
                    + (f" ({self.why_not})" if self.why_not else "") + f"; resume with: {command}")
        return (f"{self._head()}: nothing resumable was saved" + (f" ({self.why_not})" if self.why_not else "")
                + (f"; kept {', '.join(saved)}" if saved else ""))


class _State:
    """The process's stop state (one per process: signal handlers are process-wide)."""

    def __init__(self):
        self.signum: Optional[int] = None  # the signal that asked for a stop
        self.first_at = 0.0  # when it was handled (time.monotonic)
        self.reraise = False  # the stop's TrainingStopped was swallowed: raise it again
        self.installed = 0  # the current stop_on_signals block's number (0: outside one)
        self.blocks = 0  # stop_on_signals blocks entered so far
        self.deferring = 0  # depth of deferred() blocks
        self.in_hook = False  # inside the unraisable hook (it must not raise: the stop is rescheduled there)
        self.lock = threading.Lock()  # orders the helper threads against leaving stop_on_signals


_STATE = _State()


def stop_requested() -> Optional[int]:
    """The signal that asked this process to stop, or None (always None outside stop_on_signals).
    A Python attribute read: cheap enough to poll between steps, with no device sync."""
    return _STATE.signum


def _handle(signum, frame) -> None:
    if _STATE.signum is None:
        _STATE.signum, _STATE.first_at = signum, time.monotonic()
    elif not _STATE.reraise or _STATE.in_hook:
        return  # already stopping: a repeated SIGTERM, uv's copy of the Ctrl-C, or the re-raise is being set up
    _STATE.reraise = False
    if not _STATE.deferring:
        raise TrainingStopped(_STATE.signum)


def _unraisable(hook, block: int):
    """sys.unraisablehook that takes a swallowed TrainingStopped silently and has it raised again
    (module docstring); anything else goes to `hook`."""

    def unraisable(info):
        if not isinstance(info.exc_value, TrainingStopped):
            return hook(info)
        _STATE.in_hook = True  # a signal arriving meanwhile is left to the timer (a raise here would be lost)
        try:
            _STATE.reraise = True
            again = threading.Timer(RERAISE_AFTER_S, _raise_again, args=(block,))
            again.daemon = True
            again.start()
        finally:
            _STATE.in_hook = False

    return unraisable


def _raise_again(block: int) -> None:
    """Runs the handler again in the main thread (from the timer's thread), if still called for."""
    with _STATE.lock:
        if _STATE.installed == block and _STATE.reraise:
            _thread.interrupt_main(_STATE.signum)


def _watch(read_fd: int, block: int) -> None:
    """The abort of a second Ctrl-C (module docstring), in a thread of its own: Python writes a byte to
    the wakeup fd the moment a signal arrives, even while the main thread is inside a compile or a
    device step and cannot run the handler; ABORT_AFTER_S after the first, SIGINT's kernel disposition
    goes back to the default action (terminate). Ends when the fd is closed."""
    armed = False
    while True:
        try:
            if not os.read(read_fd, 64):
                break
        except OSError:
            break
        if not armed:
            armed = True
            time.sleep(ABORT_AFTER_S)
            _default_sigint(block)
    os.close(read_fd)


def _default_sigint(block: int) -> None:
    with _STATE.lock:
        if _STATE.installed != block:
            return
        try:  # the C library's signal(): Python's signal.signal works only in the main thread
            libc = ctypes.CDLL(None)
            libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
            libc.signal(int(signal.SIGINT), _SIG_DFL)
        except (OSError, AttributeError):  # no C library to call (not Unix): a second Ctrl-C is ignored
            pass


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT ask for a clean stop while inside (module docstring); the previous handlers
    are restored on exit. For command-line entries only, in the main thread; nested use is a no-op."""
    if _STATE.installed:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop_on_signals: must be entered in the main thread (signal handlers are installed "
                           "there only)")
    previous, hook = {s: signal.getsignal(s) for s in SIGNALS}, sys.unraisablehook
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # signal.set_wakeup_fd's requirement
    _STATE.blocks += 1
    block = _STATE.blocks
    _STATE.signum, _STATE.reraise, _STATE.deferring, _STATE.installed = None, False, 0, block
    _STATE.in_hook = False
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd, block), name="phoenix-stop", daemon=True).start()
    try:
        sys.unraisablehook = _unraisable(hook, block)
        for s in SIGNALS:
            signal.signal(s, _handle)
        yield
    finally:
        if _STATE.signum == signal.SIGINT:  # let uv's copy of the Ctrl-C come (SIGINT_COPY_S)
            time.sleep(max(0.0, _STATE.first_at + SIGINT_COPY_S - time.monotonic()))
        with _STATE.lock:
            _STATE.installed = 0
            for s, handler in previous.items():
                signal.signal(s, signal.SIG_DFL if handler is None else handler)
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)  # the watcher reads the end of its fd and stops
            sys.unraisablehook = hook
            _STATE.signum, _STATE.reraise = None, False


@contextlib.contextmanager
def deferred():
    """Within, a stop signal is only recorded: the code inside is not cut short (fit polls
    stop_requested() between steps; a save finishes). Leaving the outermost block with a stop
    recorded raises TrainingStopped. Costs nothing outside stop_on_signals."""
    _STATE.deferring += 1
    try:
        yield
    finally:
        _STATE.deferring -= 1
    if not _STATE.deferring and _STATE.signum is not None:
        raise TrainingStopped(_STATE.signum)


def invoked_as() -> list[str]:
    """The start of a command that runs this process's program again: `uv run SCRIPT.py` under uv,
    `PYTHON SCRIPT.py` otherwise, or the console script (by its name when PATH finds that one)."""
    script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c") else ""
    if script.endswith(".py"):
        return ["uv", "run", script] if os.environ.get("UV") else [sys.executable, script]
    if not script:
        return [sys.executable]
    name = os.path.basename(script)
    found = shutil.which(name)
    return [name] if found and os.path.realpath(found) == os.path.realpath(script) else [script]


def command_line(main: Callable) -> Callable:
    """Decorates a command-line entry: it runs under stop_on_signals(), and a TrainingStopped ends the
    process with its line() on stderr and exit status 128 + signal, without a traceback."""

    @functools.wraps(main)
    def entry(*args, **kwargs):
        with stop_on_signals():
            try:
                return main(*args, **kwargs)
            except TrainingStopped as stop:
                print(stop.line(), file=sys.stderr, flush=True)
                raise SystemExit(stop.exit_code) from None

    return entry
