"""One extraction in a fresh process, timed from the moment its parent launched it.

    HISTOCLUSTER_BENCH_T0=<parent's time.time() at launch> \\
        .venv/bin/python benchmarks/extract_process.py CONFIG.json      # -> one JSON line

``CONFIG.json`` holds ``engine.extract.ExtractConfig`` fields. The process imports
``engine.extract`` (as ``python -m engine.extract`` does), runs it and prints seconds since
launch at: interpreter up, ``engine.extract`` imported, tissue stage started, encode loop started
(workers not yet started), first batch encoded, end; the summary's tiles/s; CPU seconds of the
encode loop and of the whole process (with its reader workers); peak RSS in MiB of this process
and of its largest reader worker. Used by ``benchmarks/extract.py`` for start-up and peak RSS.
"""

import os
import resource
import time

T0 = float(os.environ.get("HISTOCLUSTER_BENCH_T0", time.time()))
marks = {"interpreter": time.time() - T0}

import json  # noqa: E402
import sys  # noqa: E402

from engine.extract import ExtractConfig, run  # noqa: E402

marks["imported"] = time.time() - T0


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def main() -> int:
    cfg = ExtractConfig(**json.loads(open(sys.argv[1]).read()))
    cpu_at_loop = 0.0

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal cpu_at_loop
        now = time.time() - T0
        if stage == "tissue":
            marks.setdefault("tissue", now)
        elif done == 0 and "encode" not in marks:
            marks["encode"] = now
            cpu_at_loop = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
        elif done > 0:
            marks.setdefault("first_batch", now)

    s = run(cfg, progress=progress)
    marks["end"] = time.time() - T0
    cpu = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
    out = {
        **{k: round(v, 3) for k, v in marks.items()},
        "tiles": s.tiles,
        "loop": s.encode_tiles_per_s,
        "run": s.tiles_per_s,
        "precision": s.precision,
        "loop_cpu_per_tile": (cpu - cpu_at_loop) / max(1, s.tiles),
        "cpu_per_tile": cpu / max(1, s.tiles),
        "rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
