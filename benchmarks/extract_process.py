"""One extraction in a fresh process, timed from the moment its parent launched it.

    HISTOCLUSTER_BENCH_T0=<parent's time.time() at launch> \\
        .venv/bin/python benchmarks/extract_process.py CONFIG.json      # -> one JSON line

``CONFIG.json`` holds ``engine.extract.ExtractConfig`` fields. The process imports
``engine.extract`` (as ``python -m engine.extract`` does), runs it and prints seconds since
launch at: interpreter up, ``engine.extract`` imported, tissue stage started, encode loop started
(workers not yet started), first batch encoded, end; the summary's tiles/s; CPU seconds of the
encode loop and of the whole process (with its reader workers); peak RSS in MiB of this process
and of its largest reader worker (sampled from /proc, see ``ReaderPeak``). Used by
``benchmarks/extract.py`` for start-up and peak RSS.
"""

import os
import resource
import time

T0 = float(os.environ.get("HISTOCLUSTER_BENCH_T0", time.time()))
marks = {"interpreter": time.time() - T0}

import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

from engine.extract import ExtractConfig, run  # noqa: E402

marks["imported"] = time.time() - T0


class ReaderPeak:
    """The largest peak RSS (``VmHWM``) of this process's reader workers, sampled every 100 ms.

    Not ``getrusage(RUSAGE_CHILDREN)``: that is the peak of any child, and a short-lived helper
    forked from this process (``ldconfig -p``, run by ``ctypes.util.find_library`` in torch's
    CUDA loader) reports this process's own size at the fork. A worker's high-water mark only
    grows, so a sample shortly before it exits holds its peak.
    """

    def __init__(self) -> None:
        self.mib = 0.0
        self._python = os.path.realpath(sys.executable)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.1):
            for task in os.listdir(f"/proc/{me}/task"):
                try:
                    kids = open(f"/proc/{me}/task/{task}/children").read().split()
                except OSError:
                    continue
                for pid in kids:
                    self.mib = max(self.mib, self._peak_mib(pid))

    def _peak_mib(self, pid: str) -> float:
        try:
            if os.path.realpath(f"/proc/{pid}/exe") != self._python:
                return 0.0  # a helper that exec'd another program
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:  # it exited meanwhile
            pass
        return 0.0

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.mib


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

    readers = ReaderPeak()
    s = run(cfg, progress=progress)
    reader_mib = readers.stop()
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
        "rss_worker_mib": reader_mib,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
