"""The one command runner: ``Config`` dataclass -> argparse, config JSON, progress, errors, exit codes.

Every ``python -m engine.<command>`` has the same shape::

    @dataclass(frozen=True)
    class ClusterConfig:
        store: str = option(positional=True, help="the feature store")
        k: int = option(8, help="number of clusters")

    def run(cfg: ClusterConfig, *, progress: Progress = no_progress) -> ClusterResult: ...

    def main(argv=None) -> int:
        return cli.main(ClusterConfig, run, argv, description=..., report=report)

Each field's default, help text and choices are written once, in :func:`option`; the parser is
generated from the dataclass. The runner parses, writes the config JSON where the config says
(``Config.config_path()``), shows tqdm bars on a terminal (none with ``--quiet`` or when stderr is
not a terminal, and only on rank 0 under torchrun), turns every error a user can cause into one
line, and returns the exit status, which means the same in every command:

====  ===================================================================
0     success
1     finished, but some inputs failed (each named on stderr)
2     bad input or usage (one line: the file, what is wrong, the fix)
130   interrupted (Ctrl-C or Cancel); what was finished is kept
====  ===================================================================
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from engine.errors import HistoclusterError, one_line
from engine.files import atomic_write_json
from engine.launcher_env import env_int
from engine.progress import Cancelled, Progress

__all__ = [
    "BAD_INPUT",
    "INTERRUPTED",
    "OK",
    "SOME_FAILED",
    "TerminalProgress",
    "build_parser",
    "describe_os_error",
    "main",
    "option",
    "parse_config",
    "write_config",
]

OK = 0
SOME_FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 130

C = TypeVar("C")
R = TypeVar("R")

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | None = None,
    choices: Sequence[Any] | None = None,
    flag: str | None = None,
    short: str | None = None,
    positional: bool = False,
    nargs: str | int | None = None,
    metavar: str | None = None,
    parse: Callable[[str], Any] | None = None,
    cli: bool = True,
    show_default: bool = True,
    sep: str | None = None,
) -> Any:
    """A ``Config`` field with its command-line flag described once.

    Args:
        default / default_factory: the field's default (omit both for a required flag).
        help: the ``--help`` text; "(default: X)" is appended unless ``show_default`` is false
            or the default is None / False.
        choices: allowed values (a ``Literal`` annotation gives them too).
        flag: the long flag (default ``--`` + the field name with ``-`` for ``_``).
        short: an optional short flag, e.g. ``"-k"``.
        positional: a positional argument instead of a flag.
        nargs / metavar: as in argparse (list annotations default to ``nargs="+"``).
        parse: converts the command-line string (default: from the annotation).
        cli: False for fields that are not command-line flags (library-only knobs).
        sep: for list/tuple fields, the flag takes ONE token split on ``sep`` (``--clusters 3,5``)
            instead of several tokens; each part is converted by ``parse`` or the item type, and
            blank parts are dropped unless the item type is ``str``.
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "flag": flag,
        "short": short,
        "positional": positional,
        "nargs": nargs,
        "metavar": metavar,
        "parse": parse,
        "cli": cli,
        "show_default": show_default,
        "sep": sep,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ------------------------------------------------------------------------------ parser


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _splitter(
    sep: str, convert: Callable[[str], Any], keep_blank: bool
) -> Callable[[str], list[Any]]:
    """An argparse ``type`` turning ``"a,b"`` into ``[convert("a"), convert("b")]``."""

    def split(text: str) -> list[Any]:
        parts = text.split(sep) if keep_blank else [p for p in text.split(sep) if p.strip()]
        try:
            return [convert(p if keep_blank else p.strip()) for p in parts]
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"expected {sep!r}-separated values, got {text!r}"
            ) from None

    return split


def build_parser(
    config_cls: type,
    *,
    prog: str,
    description: str,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` generated from the fields of ``config_cls`` (see :func:`option`)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if not meta or not meta.get("cli", True):
            continue
        tp = _unwrap_optional(hints[f.name])
        has_default = f.default is not _MISSING or f.default_factory is not _MISSING
        default = (
            f.default
            if f.default is not _MISSING
            else (f.default_factory() if f.default_factory is not _MISSING else None)
        )
        kwargs: dict[str, Any] = {"help": meta["help"]}
        choices = meta.get("choices")
        if typing.get_origin(tp) is Literal:
            choices = choices or typing.get_args(tp)
            tp = type(typing.get_args(tp)[0])
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
            kwargs["default"] = bool(default)
        else:
            container = typing.get_origin(tp) in (list, tuple, Sequence)
            item = typing.get_args(tp)[0] if container and typing.get_args(tp) else tp
            convert = meta.get("parse") or (item if item in (int, float, str) else str)
            if container and meta.get("sep") is not None:
                convert = _splitter(meta["sep"], convert, keep_blank=item is str)
            elif container:
                kwargs["nargs"] = meta.get("nargs") or "+"
            elif meta.get("nargs") is not None:
                kwargs["nargs"] = meta["nargs"]
            kwargs["type"] = convert
            if choices:
                kwargs["choices"] = list(choices)
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if has_default:
                kwargs["default"] = list(default) if isinstance(default, tuple) else default
        show = (
            meta.get("show_default", True)
            and default is not None
            and default is not False
            and has_default
        )
        if show and "%(default)" not in kwargs["help"]:
            kwargs["help"] += " (default: %(default)s)"
        if meta.get("positional"):
            if has_default and "nargs" not in kwargs:
                kwargs["nargs"] = "?"
            kwargs.setdefault("metavar", f.name.upper())
            parser.add_argument(f.name, **kwargs)
        else:
            names = [meta["short"]] if meta.get("short") else []
            names.append(_flag_name(f))
            kwargs["dest"] = f.name
            if not has_default:
                kwargs["required"] = True
            parser.add_argument(*names, **kwargs)
    return parser


def parse_config(
    config_cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    prog: str = "histocluster",
    description: str = "",
    epilog: str | None = None,
) -> C:
    """Parse ``argv`` into a ``config_cls`` instance (argparse exits with 2 on bad usage)."""
    args = build_parser(config_cls, prog=prog, description=description, epilog=epilog).parse_args(
        argv
    )
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(config_cls)
    values = {}
    for k, v in vars(args).items():
        if k in names:
            tp = _unwrap_optional(hints[k])
            if isinstance(v, list) and typing.get_origin(tp) is tuple:
                v = tuple(v)
            values[k] = v
    return config_cls(**values)


def write_config(path: str | Path, cfg: Any, **extra: Any) -> Path:
    """Write ``cfg`` (a dataclass) and any resolved ``extra`` values as JSON to ``path``, atomically."""
    data = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return atomic_write_json(path, {**data, **({"resolved": extra} if extra else {})})


# ------------------------------------------------------------------------------ progress


def _is_main_rank() -> bool:
    return env_int("RANK", 0) == 0


class TerminalProgress:
    """A :data:`~engine.progress.Progress` that draws one tqdm bar per stage on stderr.

    Each stage keeps its bar (stacked in the order the stages first report), so stages that
    alternate (``cells`` and ``train``) update their own lines instead of printing new ones.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self._bars.get(stage)
        if bar is None:
            from tqdm import tqdm

            bar = self._bars[stage] = tqdm(
                total=total, desc=stage, file=sys.stderr, smoothing=0.1, position=len(self._bars)
            )
        if bar.total != total:
            bar.total = total
        if done != bar.n:
            bar.update(done - bar.n)

    def close(self) -> None:
        for bar in reversed(list(self._bars.values())):
            bar.close()
        self._bars = {}


# ------------------------------------------------------------------------------ errors


_OS_FIXES = {
    errno.ENOSPC: "free disk space or choose another location, then rerun the same command to resume",
    errno.EDQUOT: "free space within your quota or choose another location, then rerun to resume",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or choose another location, then rerun to resume",
    errno.EROFS: "the file system is read-only — choose a writable location",
    errno.EACCES: "no permission — choose a location you can write, or fix its permissions",
    errno.EPERM: "not permitted — choose a location you can write, or fix its permissions",
    errno.ENOENT: "no such file or directory — check the path",
    errno.ELOOP: "a symbolic link loop — point at the real file",
    errno.EMFILE: "too many open files — raise the limit (ulimit -n) or use fewer workers",
    errno.ENOMEM: "out of memory — use a smaller batch or fewer workers",
}


def describe_os_error(e: OSError) -> str:
    """One line for an ``OSError``: the path, what the system said, and the fix."""
    where = e.filename if e.filename is not None else "(unknown path)"
    what = e.strerror or one_line(e)
    fix = _OS_FIXES.get(e.errno or -1, "check the path and the disk, then rerun")
    return f"{where}: {what} — {fix}"


def _failure_lines(result: Any) -> list[str]:
    failures = getattr(result, "failures", None) or []
    lines = []
    for f in failures:
        if isinstance(f, Mapping):
            lines.append(str(f.get("error") or f))
        else:
            lines.append(str(f))
    return lines


# ------------------------------------------------------------------------------ runner


def _module_prog(config_cls: type) -> str:
    """``python -m <the module defining config_cls>``, also when that module runs as ``__main__``."""
    module = config_cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else Path(sys.argv[0]).stem
    return f"python -m {module}"


def main(
    config_cls: type[C],
    run: Callable[..., R],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str = "",
    epilog: str | None = None,
    report: Callable[[C, R], str | None] | None = None,
    report_stream: Literal["stdout", "stderr"] = "stderr",
    interrupted_hint: str = "run the same command again to resume",
) -> int:
    """Parse ``argv`` into ``config_cls``, call ``run(cfg, progress=...)``, print, return the exit status.

    ``prog`` defaults to ``python -m <the module defining config_cls>``.
    ``report(cfg, result)`` gives the summary line printed on success (not with ``--quiet``).
    ``result.failures`` (when the result has it) lists inputs that failed: each is printed as
    ``error: ...`` and the status is then 1. ``result.warnings`` are printed as ``warning: ...``,
    also with ``--quiet``.
    """
    prog = prog or _module_prog(config_cls)
    cfg = parse_config(config_cls, argv, prog=prog, description=description, epilog=epilog)
    quiet = bool(getattr(cfg, "quiet", False))
    main_rank = _is_main_rank()
    progress: Progress = TerminalProgress(enabled=not quiet and main_rank and sys.stderr.isatty())
    try:
        try:
            config_path = getattr(cfg, "config_path", None)
            path = config_path() if callable(config_path) else None
            if path is not None and main_rank:
                write_config(path, cfg)
            result = run(cfg, progress=progress)
        finally:
            progress.close()  # type: ignore[attr-defined]
            if "torch.distributed" in sys.modules:
                from engine.distributed import cleanup

                cleanup()
    except (KeyboardInterrupt, Cancelled):
        if main_rank:  # under torchrun every rank stops alike; rank 0 speaks for them
            print(f"{prog}: interrupted — {interrupted_hint}", file=sys.stderr)
        return INTERRUPTED
    except HistoclusterError as e:
        if main_rank:
            print(f"error: {one_line(e)}", file=sys.stderr)
        return BAD_INPUT
    except OSError as e:
        if main_rank:
            print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return BAD_INPUT
    failures = _failure_lines(result)
    if main_rank:
        for line in getattr(result, "warnings", None) or []:
            print(f"warning: {line}", file=sys.stderr)  # shown even with --quiet
        for line in failures:
            print(f"error: {line}", file=sys.stderr)
        if report is not None and not quiet:
            text = report(cfg, result)
            if text:
                print(text, file=sys.stdout if report_stream == "stdout" else sys.stderr)
    return SOME_FAILED if failures else OK


def main_subcommands(
    commands: Mapping[
        str, tuple[type, Callable[..., Any], Callable[[Any, Any], str | None] | None, str]
    ],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    description: str,
) -> int:
    """``prog SUBCOMMAND ...``: each of ``commands`` is ``name -> (Config, run, report, one-line help)``,
    run through :func:`main` with ``prog SUBCOMMAND`` as its program name."""
    args = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:<10} {text}" for name, (_, _, _, text) in commands.items())
    usage = f"usage: {prog} {{{','.join(commands)}}} ...\n\n{description}\n\ncommands:\n{listing}\n"
    if not args or args[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if args else sys.stderr)
        return OK if args else BAD_INPUT
    name, rest = args[0], args[1:]
    if name not in commands:
        print(
            f"{prog}: unknown command {name!r} — choose one of {', '.join(commands)}",
            file=sys.stderr,
        )
        return BAD_INPUT
    config_cls, run, report, text = commands[name]
    return main(config_cls, run, rest, prog=f"{prog} {name}", description=text, report=report)
