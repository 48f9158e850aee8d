"""engine.cli: argparse generated from a Config dataclass, the exit statuses, the progress bars."""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from engine import cli
from engine.errors import HistoclusterError
from engine.progress import Cancelled, Progress, Throttle, no_progress


@dataclass(frozen=True)
class ToyConfig:
    inputs: list[str] = cli.option(positional=True, help="input files")
    out: str = cli.option(help="where to write")
    k: int = cli.option(8, short="-k", help="clusters")
    mode: Literal["fast", "exact"] = cli.option("fast", help="how")
    ratio: float | None = cli.option(None, help="a ratio")
    overlays: bool = cli.option(True, help="draw overlays")
    quiet: bool = cli.option(False, help="no progress")
    tags: tuple[str, ...] = cli.option((), nargs="*", help="tags")
    hidden: float = cli.option(1.5, cli=False, help="library only")

    def config_path(self) -> Path:
        return Path(self.out) / "config.json"


@dataclass
class ToyResult:
    failures: list[dict[str, str]] = field(default_factory=list)


def _parse(*argv: str) -> ToyConfig:
    return cli.parse_config(ToyConfig, list(argv))


def test_parser_takes_defaults_types_choices_and_booleans_from_the_fields() -> None:
    cfg = _parse("a", "b", "--out", "o")
    assert cfg == ToyConfig(inputs=["a", "b"], out="o")
    cfg = _parse(
        "a",
        "--out",
        "o",
        "-k",
        "3",
        "--mode",
        "exact",
        "--ratio",
        "0.5",
        "--no-overlays",
        "--tags",
        "x",
        "y",
    )
    assert (cfg.k, cfg.mode, cfg.ratio, cfg.overlays, cfg.tags) == (
        3,
        "exact",
        0.5,
        False,
        ("x", "y"),
    )
    assert cfg.hidden == 1.5


@pytest.mark.parametrize(
    "argv", [["a"], ["a", "--out", "o", "--mode", "slow"], ["a", "--out", "o", "-k", "x"]]
)
def test_bad_usage_exits_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(*argv)
    assert info.value.code == cli.BAD_INPUT


def test_help_lists_every_flag_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("--help")
    text = capsys.readouterr().out
    for flag in (
        "--out",
        "-k",
        "--mode",
        "--ratio",
        "--overlays",
        "--no-overlays",
        "--quiet",
        "--tags",
    ):
        assert flag in text
    assert "(default: 8)" in text and "--hidden" not in text


def _main(run, argv: list[str]) -> int:  # noqa: ANN001
    return cli.main(
        ToyConfig, run, argv, prog="toy", description="a toy command", report=lambda c, r: "done"
    )


def test_exit_statuses_mean_the_same_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["a", "--out", str(tmp_path)]

    def ok(cfg: ToyConfig, *, progress: Progress = no_progress) -> ToyResult:
        progress("work", 1, 1)
        return ToyResult()

    def some_failed(cfg: ToyConfig, *, progress: Progress = no_progress) -> ToyResult:
        return ToyResult([{"slide": "a", "error": "a: unreadable — re-copy it"}])

    def bad(cfg: ToyConfig, *, progress: Progress = no_progress) -> ToyResult:
        raise HistoclusterError("a: not a slide\n— give a slide")

    def full_disk(cfg: ToyConfig, *, progress: Progress = no_progress) -> ToyResult:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f.zarr"))

    def interrupted(cfg: ToyConfig, *, progress: Progress = no_progress) -> ToyResult:
        raise KeyboardInterrupt

    def cancelled(cfg: ToyConfig, *, progress: Progress = no_progress) -> ToyResult:
        raise Cancelled

    assert _main(ok, argv) == cli.OK
    assert "done" in capsys.readouterr().err
    assert json.loads((tmp_path / "config.json").read_text())["k"] == 8
    assert _main(some_failed, argv) == cli.SOME_FAILED
    assert "error: a: unreadable — re-copy it" in capsys.readouterr().err
    assert _main(bad, argv) == cli.BAD_INPUT
    err = capsys.readouterr().err
    assert err.strip() == "error: a: not a slide — give a slide"
    assert _main(full_disk, argv) == cli.BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "f.zarr") in err and "free disk space" in err
    assert _main(interrupted, argv) == cli.INTERRUPTED
    assert _main(cancelled, argv) == cli.INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


def test_quiet_prints_no_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def ok(cfg: ToyConfig, *, progress: Progress = no_progress) -> ToyResult:
        return ToyResult()

    assert _main(ok, ["a", "--out", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_terminal_progress_draws_one_bar_per_stage(capsys: pytest.CaptureFixture[str]) -> None:
    bars = cli.TerminalProgress(enabled=True)
    for i in range(3):
        bars("kmeans", i + 1, 3)
    bars("exemplars", 1, 2)
    bars.close()
    err = capsys.readouterr().err
    assert "kmeans" in err and "3/3" in err and "exemplars" in err and "1/2" in err
    silent = cli.TerminalProgress(enabled=False)
    silent("x", 1, 2)
    silent.close()
    assert capsys.readouterr().err == ""


def test_throttle_reports_first_last_and_at_most_every_interval() -> None:
    calls: list[int] = []
    throttle = Throttle(lambda s, d, t: calls.append(d), interval_s=3600)
    for i in range(100):
        throttle("x", i, 99)
    assert calls == [0, 99]


def test_os_error_lines_name_the_path_and_the_fix() -> None:
    for code, word in [
        (errno.EFBIG, "ulimit -f"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission"),
    ]:
        line = cli.describe_os_error(OSError(code, "x", "/data/f.zarr"))
        assert line.startswith("/data/f.zarr: x — ") and word in line
