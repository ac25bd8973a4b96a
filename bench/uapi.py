"""Benchmark: /dev/liveupdate served by ``luo run`` against the same requests on luo's socket.

One C program (bench/uapi_bench.c, built here with gcc) measures both sides in the same run, so
the machine's noise hits them alike:

- per-call cost (median, p99 over ``--iterations`` calls): an ioctl the supervisor answers
  alone (GET_NAME), GET_STATE, an ioctl that needs one request to luod (RFC v2 FD_UNPRESERVE of
  an unknown token: ENOENT from luod) and the same requests sent straight to luod's socket;
- ``--files`` memfds preserved into one session by PRESERVE_FD and into another by the socket
  protocol; a real ``luo update``; then both retrieved (RETRIEVE_FD against ``retrieve_fd``),
  checked, and finished.

    python bench/uapi.py                        # 3 rounds, 2000 calls, 500 files
    python bench/uapi.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import emit, facts_line, machine_facts, median, short_runtime_dir, table

from luo.testing.host import HostProcess

HERE = Path(__file__).parent


def build(out: Path) -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("bench/uapi.py needs gcc (scripts/setup.sh installs it)")
    exe = out / "uapi_bench"
    subprocess.run([gcc, "-O2", "-Wall", "-o", str(exe), str(HERE / "uapi_bench.c")], check=True)
    return str(exe)


def parse(text: str) -> dict[str, dict[str, float]]:
    """``name n median p99 total`` lines (names may hold spaces) into a dict."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        parts = line.rsplit(" ", 4)
        if len(parts) == 5 and parts[1].isdigit():
            out[parts[0]] = {"n": int(parts[1]), "median_us": float(parts[2]), "p99_us": float(parts[3]),
                             "total_ms": float(parts[4])}
    return out


def one_round(exe: str, root: Path, iterations: int, files: int) -> dict[str, dict[str, float]]:
    with HostProcess(root) as host:
        luo_run = [*host.command, "--runtime-dir", str(root), "run", "--", exe]
        sock = str(host.rt.socket)
        got = parse(subprocess.run([*luo_run, "calls", sock, str(iterations)], capture_output=True, text=True,
                                   check=True, timeout=300).stdout)
        holder = subprocess.Popen([*luo_run, "preserve", sock, str(files)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdin is not None
        lines = []
        for line in holder.stdout:
            if line.strip() == "ready":
                break
            lines.append(line)
        else:
            raise SystemExit(f"the preserving program ended early: {''.join(lines)}")
        got.update(parse("".join(lines)))
        update = host.update()
        holder.stdin.close()
        holder.wait(60)
        got.update(parse(subprocess.run([*luo_run, "retrieve", sock, str(files)], capture_output=True, text=True,
                                        check=True, timeout=300).stdout))
        got["luo update (total)"] = {"n": 1, "median_us": update["total_ms"] * 1000.0, "p99_us": float("nan"),
                                     "total_ms": update["total_ms"]}
        host.luo("finish")
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--json")
    args = ap.parse_args()
    facts = machine_facts()
    print(facts_line(facts), flush=True)
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        for i in range(args.rounds):
            with short_runtime_dir() as d:
                rounds.append(one_round(exe, d / "rt", args.iterations, args.files))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v['median_us']:.1f} µs" for k, v in rounds[-1].items()
                                                 if v["n"] > 1), flush=True)
    names = list(rounds[0])
    rows = []
    for name in names:
        ms = [r[name] for r in rounds if name in r]
        rows.append([name, ms[0]["n"], round(median([m["median_us"] for m in ms]), 1),
                     round(median([m["p99_us"] for m in ms]), 1), round(median([m["total_ms"] for m in ms]), 2)])
    text = table(["call", "n per round", "median µs", "p99 µs", "total ms"], rows)
    text += (f"\n\nmedians over {args.rounds} rounds of the per-round median and p99; {args.files} files per "
             "session; ioctls under `luo run`, socket requests straight from the same C program")
    emit(text, args.json, facts, args.rounds, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
