"""One line for every failure: what the ``kdcore`` command prints when a command fails.

Known errors — bad input (exit 2) and runtime failures of a correct setup (exit 1) — print
``kdcore: error: <one line>``. Anything else is a bug or an unforeseen situation: it prints
one line naming the exception plus the file that holds its full traceback (in the run
folder when there is one, else the temp dir), exit 1. Ctrl-C prints one line naming the last
good checkpoint, exit 130 (the shell's code for SIGINT); SIGTERM the same, exit 143 (128 + 15).
A bad-input error that another layer wrapped (a DataError inside a TrainingError) keeps exit 2.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from kdcore.infra.exceptions import clip, find_in_chain
from kdcore.storage.checkpoint import find_latest

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a killed command reports; schedulers know it

# (module, class, exit code): matched only when the module is loaded (an error of a module
# that was never imported cannot be raised), so this file imports nothing heavy
KNOWN_ERRORS: tuple[tuple[str, str, int], ...] = (
    ("kdcore.recipe.loading", "RecipeError", EXIT_BAD_INPUT),
    ("kdcore.storage.run_folder", "RunFolderError", EXIT_BAD_INPUT),
    ("kdcore.storage.resume", "ResumeMismatchError", EXIT_BAD_INPUT),
    ("kdcore.plugin_system.registry", "PluginError", EXIT_BAD_INPUT),
    ("kdcore.plugin_system.registry", "UnknownAlgorithmError", EXIT_BAD_INPUT),
    ("kdcore.modeling.paths", "ModelNotFoundError", EXIT_BAD_INPUT),
    ("kdcore.data", "DataError", EXIT_BAD_INPUT),
    ("kdcore.modeling.tokenizers", "TokenizerLoadError", EXIT_BAD_INPUT),
    ("kdcore.modeling.vocab", "VocabMismatchError", EXIT_BAD_INPUT),
    ("kdcore.commands.evaluate", "EvalInputError", EXIT_BAD_INPUT),
    ("kdcore.modeling.student", "StudentInitError", EXIT_BAD_INPUT),
    ("kdcore.commands.plot", "PlotError", EXIT_BAD_INPUT),
    ("kdcore.commands.evaluate", "EvaluatorError", EXIT_FAILED),
    ("kdcore.training.types", "TrainingError", EXIT_FAILED),
    ("kdcore.storage.checkpoint", "CheckpointError", EXIT_FAILED),
    ("kdcore.infra.channel", "ChannelError", EXIT_FAILED),
    ("kdcore.engines.protocol", "RolloutError", EXIT_FAILED),
    ("kdcore.engines.protocol", "TeacherError", EXIT_FAILED),
    ("builtins", "PermissionError", EXIT_BAD_INPUT),  # a read-only or foreign output folder
    ("builtins", "FileNotFoundError", EXIT_BAD_INPUT),
    ("builtins", "IsADirectoryError", EXIT_BAD_INPUT),
    ("builtins", "NotADirectoryError", EXIT_BAD_INPUT),
    ("builtins", "MemoryError", EXIT_FAILED),
    ("builtins", "OSError", EXIT_FAILED),  # disk full and the like: the OS's reason says it
)


# errors that only carry another one's message across a layer (train() turns a DataError into a
# TrainingError): the error they were raised from decides the exit code, so bad data exits 2
WRAPPERS: tuple[tuple[str, str], ...] = (("kdcore.training.types", "TrainingError"),)


def classify(exc: BaseException) -> int | None:
    """The exit code of a known error, None for an unexpected one. A wrapper raised ``from`` a
    known error takes that error's code."""
    cause = exc.__cause__
    if cause is not None and _is_any(exc, WRAPPERS):
        inner = classify(cause)
        if inner is not None:
            return inner
    for module, name, code in KNOWN_ERRORS:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            return code
    return None


LINE_CHARS = 4000  # the most one error line prints: values inside it are clipped before this


def _is_any(exc: BaseException, names) -> bool:
    for module, name in names:
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a RecipeError's problems joined with '; '), cut to
    :data:`LINE_CHARS` (a message may quote a value or a file of any size)."""
    return clip(_first_line(exc), LINE_CHARS)


def _first_line(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors and hasattr(exc, "source"):
        return f"{clip(exc.source)}: " + "; ".join(clip(str(e), 1000) for e in errors)
    if isinstance(exc, OSError) and exc.strerror:
        where = f": '{clip(exc.filename)}'" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    return lines[0] if len(lines) == 1 else f"{lines[0]} (+{len(lines) - 1} more lines)"


def write_traceback(exc: BaseException, folder: str | os.PathLike | None) -> Path:
    """Write ``exc``'s full traceback to ``<folder>/crash-<time>-<pid>.log`` (the temp dir
    when ``folder`` is None or not writable); return the file."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"kdcore-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for d in ([Path(folder)] if folder else []) + [Path(tempfile.gettempdir())]:
        try:
            d.mkdir(parents=True, exist_ok=True)
            path = d / name
            path.write_text(text)
            return path
        except OSError:  # a full disk: leave no empty log behind, try the next folder
            try:
                (d / name).unlink(missing_ok=True)
            except OSError:
                pass
            continue
    raise RuntimeError("no writable folder for the traceback")  # pragma: no cover


def last_checkpoint_text(output_dir: str | os.PathLike | None) -> str:
    if output_dir:
        try:
            found = find_latest(Path(output_dir) / "checkpoints")
        except Exception:
            found = None
        if found is not None:
            return f"the last good checkpoint is '{found}' (continue with --resume)"
    return "no checkpoint was written"


_signal_received: int | None = None  # set by the handler below: a library may swallow the KeyboardInterrupt


def _on_stop_signal(signum, frame):
    global _signal_received
    _signal_received = signum
    raise KeyboardInterrupt


def watch_sigint() -> None:
    """Remember that Ctrl-C (SIGINT) or SIGTERM arrived, even when the KeyboardInterrupt it raises
    is turned into another error on the way (torch.save inside DCP's writer reports a C++
    "unexpected pos" instead). SIGTERM (what ``kill``, schedulers and container runtimes send)
    stops the run exactly as Ctrl-C does, so it too ends with one line and the teacher processes
    closed instead of a silent exit 143. A handler someone else installed is left alone; main
    thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(sig) is default:
            signal.signal(sig, _on_stop_signal)


def _interrupt_code(exc: BaseException) -> int | None:
    """The exit code of a stop by signal (130 for SIGINT, 143 for SIGTERM), None otherwise."""
    import signal

    if _signal_received == signal.SIGTERM:
        return EXIT_TERMINATED
    if _signal_received is not None or find_in_chain(exc, KeyboardInterrupt) is not None:
        return EXIT_INTERRUPTED
    return None


def report(exc: BaseException, *, output_dir: str | os.PathLike | None = None) -> int:
    """Print the one line for ``exc`` to stderr and return the exit code."""
    stopped = _interrupt_code(exc)
    if stopped is not None:
        how = "terminated (SIGTERM)" if stopped == EXIT_TERMINATED else "interrupted"
        print(f"kdcore: {how}; {last_checkpoint_text(output_dir)}", file=sys.stderr)
        return stopped
    code = classify(exc)
    line = one_line(exc)
    if code is not None and not line.endswith("more lines)"):
        print(f"kdcore: error: {line}", file=sys.stderr)
        return code
    where = write_traceback(exc, output_dir)
    if code is not None:
        print(f"kdcore: error: {line}; full message in {where}", file=sys.stderr)
        return code
    print(f"kdcore: error: unexpected {type(exc).__name__}: {line}; full traceback in {where}", file=sys.stderr)
    return EXIT_FAILED
