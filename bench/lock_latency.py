#!/usr/bin/env python3
"""Lock latency benchmark helper for bench/locks.sh (python3 standard library only).

Subcommands:
  ports N                 print N free TCP ports on 127.0.0.1 (one line, space-separated)
  connected               read `peerfs status --json` on stdin; exit 0 iff it lists at least one
                          peer and every peer is "connected": true; print NAME=RTT_MS pairs
  prepare DIR N           create DIR/first/doc-000001.txt .. doc-N.txt and DIR/reopen.txt
  measure [options] LABEL=DIR...
                          time open(O_RDWR) + close() in every DIR (prepared with `prepare`),
                          two cases, the targets interleaved open by open in a rotating
                          order, in rounds; print a text table and a markdown report on stdout

The first LABEL=DIR is the plain-folder baseline, the second the lone drive; the others are
drives with peers. `measure` exits 1 if any open failed (the failures are listed).
"""

import argparse
import gc
import json
import os
import platform
import random
import socket
import sys
import time

FIRST = "first"
REOPEN = "reopen.txt"
TARGET_P50_US = 500.0
TARGET_P99_US = 2000.0


def cmd_ports(args):
    socks = []
    try:
        for _ in range(args.n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        print(" ".join(str(s.getsockname()[1]) for s in socks))
    finally:
        for s in socks:
            s.close()
    return 0


def cmd_connected(_args):
    try:
        status = json.load(sys.stdin)
    except ValueError:
        return 1
    peers = status.get("peers") or []
    if not peers or not all(p.get("connected") is True for p in peers):
        return 1
    print(" ".join(f"{p.get('name')}={p.get('rtt_ms')}" for p in peers))
    return 0


def file_names(n):
    return [f"doc-{i:06d}.txt" for i in range(1, n + 1)]


def cmd_prepare(args):
    first = os.path.join(args.dir, FIRST)
    os.makedirs(first, exist_ok=True)
    paths = [os.path.join(first, n) for n in file_names(args.n)]
    for path in paths + [os.path.join(args.dir, REOPEN)]:
        with open(path, "wb") as f:
            f.write(b"x\n")
    return 0


def percentile(sorted_us, q):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_us:
        return float("nan")
    k = max(1, min(len(sorted_us), int(-(-q * len(sorted_us) // 100))))
    return sorted_us[k - 1]


class Target:
    def __init__(self, label, path, others):
        self.label = label
        self.path = path
        self.others = others  # other peers: None for the plain folder
        self.samples = {"first": [], "reopen": []}
        self.rounds = {"first": [], "reopen": []}  # per-round (p50, p99)
        self.failures = []


def open_close(path):
    """One timed open(O_RDWR) + close(), in microseconds."""
    t0 = time.perf_counter_ns()
    fd = os.open(path, os.O_RDWR)
    os.close(fd)
    return (time.perf_counter_ns() - t0) / 1000.0


def cpu_pressure_total():
    """Microseconds some task waited for a CPU (/proc/pressure/cpu), or None."""
    try:
        with open("/proc/pressure/cpu", encoding="ascii") as f:
            for line in f:
                if line.startswith("some "):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def summarize(samples):
    s = sorted(samples)
    return percentile(s, 50), percentile(s, 99)


def fmt(v, signed=False):
    if v != v:  # NaN
        return "-"
    return f"{v:+.0f}" if signed else f"{v:.0f}"


def run_segment(targets, case, step_paths, steps, offset):
    """Runs `steps` steps; each step times one open+close on every target, the targets in an
    order rotated by the step (so none always follows another and machine noise hits all of
    them alike). step_paths(t, i) is the path target t opens at step i. Returns the per-target
    samples and the CPU pressure (share of wall time some task waited for a CPU)."""
    got = {t.label: [] for t in targets}
    n = len(targets)
    psi0, w0 = cpu_pressure_total(), time.monotonic()
    for i in range(steps):
        k = (i + offset) % n
        for t in targets[k:] + targets[:k]:
            path = step_paths(t, i)
            try:
                if case == "first":
                    os.stat(path)  # untimed: the kernel's dentry is fresh, the open is timed
                got[t.label].append(open_close(path))
            except OSError as e:
                t.failures.append(f"{t.label}: {path}: {e}")
    psi1, w1 = cpu_pressure_total(), time.monotonic()
    pressure = None
    if psi0 is not None and psi1 is not None and w1 > w0:
        pressure = (psi1 - psi0) / 1e6 / (w1 - w0)
    return got, pressure


def cmd_measure(args):
    targets = []
    for i, spec in enumerate(args.targets):
        label, sep, path = spec.partition("=")
        if not sep or not os.path.isdir(os.path.join(path, FIRST)):
            print(f"lock_latency: bad target {spec!r} (LABEL=DIR, DIR prepared)", file=sys.stderr)
            return 2
        others = None if i == 0 else (args.others[i - 1] if i - 1 < len(args.others) else "?")
        targets.append(Target(label, path, others))
    if len(targets) < 2:
        print("lock_latency: need at least the baseline and the lone drive", file=sys.stderr)
        return 2

    rng = random.Random(args.seed)
    names = file_names(args.files)
    orders = {}
    for t in targets:
        order = [os.path.join(t.path, FIRST, n) for n in names]
        rng.shuffle(order)  # a fresh order per target: no linger and no readahead can help
        orders[t.label] = order
    reopen = {t.label: os.path.join(t.path, REOPEN) for t in targets}
    # Split the work into rounds: per-round percentiles show how noisy the machine is.
    bounds = [(args.files * r // args.rounds, args.files * (r + 1) // args.rounds)
              for r in range(args.rounds)]
    reopens = [args.reopens * (r + 1) // args.rounds - args.reopens * r // args.rounds
               for r in range(args.rounds)]
    pressures = []  # while measuring
    idle_pressures = []  # during the pauses: the other load of the machine

    gc.disable()
    for r in range(args.rounds):
        for case in ("first", "reopen"):
            # The previous segment's lingering locks are released to the peers meanwhile.
            psi0, w0 = cpu_pressure_total(), time.monotonic()
            time.sleep(args.settle)
            psi1, w1 = cpu_pressure_total(), time.monotonic()
            if psi0 is not None and psi1 is not None:
                idle_pressures.append((psi1 - psi0) / 1e6 / (w1 - w0))
            if case == "first":
                lo, hi = bounds[r]
                got, pressure = run_segment(
                    targets, case, lambda t, i, lo=lo: orders[t.label][lo + i], hi - lo, r)
            else:
                for t in targets:  # untimed warm-up: the first open of the round acquires
                    try:
                        for _ in range(3):
                            os.close(os.open(reopen[t.label], os.O_RDWR))
                    except OSError as e:
                        t.failures.append(f"{t.label}: warm-up {reopen[t.label]}: {e}")
                got, pressure = run_segment(
                    targets, case, lambda t, i: reopen[t.label], reopens[r], r)
            if pressure is not None:
                pressures.append(pressure)
            line = []
            for t in targets:
                t.samples[case].extend(got[t.label])
                p50, p99 = summarize(got[t.label])
                t.rounds[case].append((p50, p99))
                line.append(f"{t.label} {fmt(p50)}/{fmt(p99)}")
            cpu = "" if pressure is None else f"  (cpu pressure {pressure:.0%})"
            print(f"  round {r + 1}/{args.rounds} {case:<6} p50/p99 us: " + ", ".join(line) + cpu,
                  file=sys.stderr)
    gc.enable()

    report(args, targets, pressures, idle_pressures)
    failures = [f for t in targets for f in t.failures]
    if failures:
        print(f"\n{len(failures)} open(s) failed:", file=sys.stderr)
        for f in failures[:20]:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


def machine_facts():
    model = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, load average {load} at the end"


CASES = {
    "first": "1 first acquisition",
    "reopen": "2 re-open (linger)",
}


def rows(targets):
    base, lone = targets[0], targets[1]
    out = []
    for case in ("first", "reopen"):
        b50, b99 = summarize(base.samples[case])
        l50, l99 = summarize(lone.samples[case])
        for t in targets:
            p50, p99 = summarize(t.samples[case])
            r50 = [x[0] for x in t.rounds[case]]
            r99 = [x[1] for x in t.rounds[case]]
            spread = (f"{fmt(min(r50))}–{fmt(max(r50))} / {fmt(min(r99))}–{fmt(max(r99))}"
                      if r50 else "-")
            verdict = ""
            if t.others not in (None, "0"):
                ok = p50 - l50 <= TARGET_P50_US and p99 - l99 <= TARGET_P99_US
                verdict = "met" if ok else "MISSED"
            out.append({
                "case": CASES[case],
                "target": t.label,
                "peers": "-" if t.others is None else t.others,
                "n": str(len(t.samples[case])),
                "p50": fmt(p50),
                "p99": fmt(p99),
                "d50b": "" if t is base else fmt(p50 - b50, True),
                "d99b": "" if t is base else fmt(p99 - b99, True),
                "d50l": "" if t in (base, lone) else fmt(p50 - l50, True),
                "d99l": "" if t in (base, lone) else fmt(p99 - l99, True),
                "spread": spread,
                "verdict": verdict,
            })
    return out


COLUMNS = [
    ("case", "case", False),
    ("target", "target", False),
    ("peers", "other peers", True),
    ("n", "opens", True),
    ("p50", "p50 µs", True),
    ("p99", "p99 µs", True),
    ("d50b", "+p50 vs backing", True),
    ("d99b", "+p99 vs backing", True),
    ("d50l", "+p50 vs lone", True),
    ("d99l", "+p99 vs lone", True),
    ("spread", "rounds p50 / p99 µs", True),
    ("verdict", "lock target", False),
]


def report(args, targets, pressures, idle_pressures):
    table = rows(targets)
    # Plain text table.
    widths = {k: max(len(h), *(len(r[k]) for r in table)) for k, h, _ in COLUMNS}
    line = "  ".join(h.rjust(widths[k]) if right else h.ljust(widths[k]) for k, h, right in COLUMNS)
    print(line)
    print("-" * len(line))
    last_case = None
    for r in table:
        if last_case is not None and r["case"] != last_case:
            print()
        last_case = r["case"]
        print("  ".join(r[k].rjust(widths[k]) if right else r[k].ljust(widths[k])
                        for k, _, right in COLUMNS))
    print()

    # Markdown report.
    md = ["### Lock latency: open(O_RDWR) + close()", ""]
    md.append(f"Machine: {machine_facts()}.  ")
    md.append(f"Command: `{args.command}`")
    md.append("")
    md.append("| " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    md.append("|" + "|".join("---:" if right else "---" for _, _, right in COLUMNS) + "|")
    for r in table:
        md.append("| " + " | ".join(r[k] for k, _, _ in COLUMNS) + " |")
    md.append("")
    md.append(
        f"Case 1 opens each of {args.files} pre-created files once, in a shuffled order (an "
        f"untimed `stat` just before warms the kernel's dentry): every open on a drive with "
        f"peers is a lock round trip. Case 2 opens one file {args.reopens} times after an "
        f"untimed warm-up open: the lock stays local (linger). The targets are interleaved "
        f"open by open (each step opens once on every target, in an order rotated every step), "
        f"so the machine's noise hits all of them alike; the work is split into {args.rounds} "
        f"rounds, each segment after a {args.settle:g} s pause in which the previous segment's "
        f"lingering locks are released. \"+\" columns are differences of percentiles. The lock "
        f"target (the lock adds ≤ {TARGET_P50_US:.0f} µs at p50 and ≤ {TARGET_P99_US:.0f} µs "
        f"at p99) is judged against the lone drive, which makes the same FUSE requests without "
        f"a lock. \"rounds\" gives the range of the per-round p50 and p99: the run's noise.")
    if pressures and idle_pressures:
        md.append("")
        md.append(
            f"CPU pressure (/proc/pressure/cpu \"some\": the share of the time some task waited "
            f"for a CPU) while measuring: {sum(pressures) / len(pressures):.0%} on average, "
            f"{min(pressures):.0%}–{max(pressures):.0%} per segment; during the pauses, with the "
            f"benchmark idle (the machine's other load): "
            f"{sum(idle_pressures) / len(idle_pressures):.0%} on average, "
            f"{min(idle_pressures):.0%}–{max(idle_pressures):.0%}.")
    for n in args.note:
        md.append("")
        md.append(n)
    print("\n".join(md))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(md) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cpu_pressure": pressures, "cpu_pressure_idle": idle_pressures,
                       "targets": {t.label: {"others": t.others, "samples_us": t.samples,
                                             "rounds": t.rounds} for t in targets}}, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ports")
    p.add_argument("n", type=int)
    p.set_defaults(func=cmd_ports)
    p = sub.add_parser("connected")
    p.set_defaults(func=cmd_connected)
    p = sub.add_parser("prepare")
    p.add_argument("dir")
    p.add_argument("n", type=int)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("measure")
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--reopens", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--settle", type=float, default=1.5,
                   help="seconds of pause before each target's segment")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--others", action="append", default=[],
                   help="other peers of each drive target, in order (lone first)")
    p.add_argument("--command", default="bench/locks.sh")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--markdown", help="also write the markdown report here")
    p.add_argument("--json", help="write every sample (µs) here")
    p.add_argument("targets", nargs="+", metavar="LABEL=DIR")
    p.set_defaults(func=cmd_measure)
    args = ap.parse_args()
    if args.cmd == "measure" and (args.files < 1 or args.reopens < 1 or args.rounds < 1):
        ap.error("--files, --reopens and --rounds must be positive")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
