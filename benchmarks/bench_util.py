"""What the benchmark scripts share: each measurement in a fresh child interpreter (so peak memory
and compile caches of one row never leak into the next), its result passed back as one JSON line,
and a description of the machine for the tables."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys


def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def rss_peak_bytes() -> int:
    """This process' peak resident set size (monotone over the process' life)."""
    try:
        import resource
    except ImportError:  # not POSIX
        import psutil
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


def last_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])


def parse_child_output(stdout: str, marker: str) -> dict | None:
    """The JSON object on the last line that starts with `marker`, or None."""
    found = None
    for line in stdout.splitlines():
        if line.startswith(marker):
            found = json.loads(line[len(marker):])
    return found


def run_child(script: str, argv: list[str], marker: str, *, timeout: float, env=None) -> dict:
    """Runs `python script argv...` and returns the JSON it printed after `marker`; a failure
    (exception, out-of-memory kill, timeout) becomes {"error": why}."""
    cmd = [sys.executable, os.path.abspath(script), *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or None, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    result = parse_child_output(proc.stdout, marker)
    if result is not None:
        return result
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        why = f"exited with code {proc.returncode}"
    return {"error": f"child process {why}: {last_lines(proc.stderr or proc.stdout) or 'no output'}"}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "system": platform.system(), "load_average": load}


def error_text(e: BaseException) -> str:
    """An exception as one line, for a table cell or a JSON row."""
    return " ".join(f"{type(e).__name__}: {e}".split())


def format_header(columns, left: int) -> str:
    """A table's header and rule from (name, width, formatter) columns; the first `left` are
    left-aligned, the rest right-aligned."""
    head = "  ".join(f"{name:<{w}}" if i < left else f"{name:>{w}}" for i, (name, w, _) in enumerate(columns))
    return head + "\n" + "  ".join("-" * w for _, w, _ in columns)


def write_json_record(path: str, command: str, args, machine: dict, **fields) -> None:
    """Writes a benchmark's `--json` file: the command, date, flags, XLA_FLAGS, machine and `fields`."""
    import datetime

    record = {"command": command, "date": datetime.date.today().isoformat(),
              "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "json"},
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "machine": machine, **fields}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"rows written to {path}")
