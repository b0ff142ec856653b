#!/usr/bin/env python3
"""Replication benchmark helper for bench/replication.sh (python3 standard library only).

Subcommand:
  measure [options]   with peers A and B mounted under DIR/a and DIR/b (DIR/X/{backing,mnt,
                      state,peerfs.toml}) and an rsync daemon module at --rsync-url serving
                      DIR/rsync/dst: makes the same edits to a big file on A's drive and in
                      DIR/rsync/src, measures what each costs on the wire and how long until
                      the other side has it, times new 4 KiB files on A's drive until B has
                      them, optionally replicates a very big file while sampling the daemons'
                      RSS; prints a text table and a markdown report on stdout.

peerfs bytes are the change of `bytes_sent` + `bytes_received` in A's `peerfs status --json`
for peer B (TCP payload both ways, TLS records included) from just before the edit until
everything is settled again (B has the new version, both queues are empty, the lock is
released); content bytes are the change of `content_bytes_sent`. rsync bytes are its
"Total bytes sent" + "Total bytes received". Times: for peerfs, from the return of the edit's
last call (close, or truncate) to the first poll of B's backing file that sees the new
version (a new inode, size or mtime whose sha256 is the expected one: the poll's time counts,
the hashing that confirms it does not); for rsync, the wall time of the rsync command.
Exits 1 if a replica ever ends up with the wrong content.
"""

import argparse
import hashlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time

MiB = 1 << 20
KiB = 1 << 10
BLOCK = MiB
FILE_SEED = 20261125

# Targets from the replication issue.
QUARTER_ROWS = ("a", "a_pwrite", "b", "e")
LATENCY_ROWS = ("a", "a_pwrite")
TARGET_EDIT_MS = 50.0
TARGET_SMALL_MS = 5.0
TARGET_RSS_MIB = 256.0


class BenchError(Exception):
    pass


def now():
    return time.monotonic()


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(4 * MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


def fmt_int(n):
    return f"{int(round(n)):,}"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def percentile(xs, q):
    """Nearest-rank percentile."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(1, min(len(s), int(-(-q * len(s) // 100))))
    return s[k - 1]


# ---------------------------------------------------------------- peerfs

class Peer:
    def __init__(self, peerfs, root, name):
        self.peerfs = peerfs
        self.name = name
        self.config = os.path.join(root, "peerfs.toml")
        self.backing = os.path.join(root, "backing")
        self.mnt = os.path.join(root, "mnt")
        self.state = os.path.join(root, "state")
        with open(os.path.join(self.state, "peerfs.pid"), encoding="ascii") as f:
            self.pid = int(f.read().split()[0])

    def cli(self, *args):
        r = subprocess.run([self.peerfs, *args, "--config", self.config, "--json"],
                           capture_output=True, text=True, timeout=30, check=False)
        if r.returncode != 0:
            raise BenchError(f"`peerfs {' '.join(args)}` of {self.name} exited {r.returncode}: "
                             f"{r.stderr.strip()}")
        return json.loads(r.stdout)

    def link(self, other):
        """This peer's status entry for peer `other`."""
        for p in self.cli("status").get("peers") or []:
            if p.get("name") == other:
                return p
        raise BenchError(f"{self.name}'s status does not list {other}")

    def locks(self):
        return self.cli("locks").get("locks") or []

    def proc_status(self, key):
        """A value in kB from /proc/PID/status (VmRSS, VmHWM), as MiB."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        raise BenchError(f"no {key} in /proc/{self.pid}/status")


class Pair:
    def __init__(self, peerfs, bench_dir):
        self.a = Peer(peerfs, os.path.join(bench_dir, "a"), "peer-a")
        self.b = Peer(peerfs, os.path.join(bench_dir, "b"), "peer-b")

    def counters(self):
        """A's counters for B: (wire bytes sent, wire bytes received, content bytes sent)."""
        p = self.a.link(self.b.name)
        return {
            "sent": int(p.get("bytes_sent") or 0),
            "received": int(p.get("bytes_received") or 0),
            "content": int(p.get("content_bytes_sent") or 0),
        }

    def settle(self, timeout=120.0):
        """Waits until neither peer has anything queued for the other and no lock is listed."""
        deadline = now() + timeout
        while True:
            la = self.a.link(self.b.name)
            lb = self.b.link(self.a.name)
            busy = []
            if not la.get("connected") or not lb.get("connected"):
                busy.append("not connected")
            for who, l in (("A", la), ("B", lb)):
                if l.get("queue") or l.get("queue_bytes"):
                    busy.append(f"{who} queue {l.get('queue')} ({l.get('queue_bytes')} B)")
            if not busy:
                locks = self.a.locks() + self.b.locks()
                if locks:
                    busy.append(f"{len(locks)} lock(s) listed")
            if not busy:
                return
            if now() > deadline:
                raise BenchError(f"not settled after {timeout:.0f} s: {', '.join(busy)}; "
                                 f"A: {la}; B: {lb}")
            time.sleep(0.02)


def stat_key(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def wait_gone(path, timeout):
    """Waits until `path` no longer exists (a removal reached B: the drive holds a removal back
    for the lock's linger + 0.5 s first, in case a save puts a new file at the name)."""
    deadline = now() + timeout
    while os.path.lexists(path):
        if now() > deadline:
            raise BenchError(f"{path} still exists {timeout:.0f} s after its removal on A")
        time.sleep(0.02)


def wait_version(path, old_key, size, sha, t_close, poll, timeout):
    """Polls `path` until it holds content of `size` bytes with sha256 `sha`. Returns the
    seconds from `t_close` to the poll that first saw that version."""
    deadline = t_close + timeout
    seen_wrong = []
    while True:
        t = now()
        key = stat_key(path)
        if key is not None and key != old_key:
            if key[1] == size:
                got = sha256_file(path)
                if got == sha:
                    return t - t_close
                seen_wrong.append(got[:12])
            old_key = key
        if t > deadline:
            raise BenchError(f"{path}: no version of {size} bytes with sha256 {sha[:12]}… after "
                             f"{timeout:.0f} s (last seen {key}; wrong contents seen: "
                             f"{seen_wrong or 'none'})")
        time.sleep(poll)


# ---------------------------------------------------------------- edits

# An edit is a list of file operations that turn the current content into the new one:
#   ("rewrite",)            open(O_WRONLY|O_TRUNC), write the whole new content, close
#   ("pwrite", [(off, b)])  open(O_RDWR), pwrite each piece, close
#   ("append", b)           open(O_WRONLY|O_APPEND), write, close
#   ("truncate", n)         truncate(path, n)
#   ("create",)             open(O_WRONLY|O_CREAT|O_EXCL), write the whole content, close

ROWS = [
    # key, label
    ("create", "new file, {size} (full copy)"),
    ("a", "(a) 1 byte at {mid}, app rewrite (O_TRUNC + write all)"),
    ("a_pwrite", "(a') 1 byte at {mid}, pwrite in place (O_RDWR)"),
    ("b", "(b) insert 100 B at offset 1000, app rewrite"),
    ("c", "(c) 100 × 4 KiB pwrite at seeded offsets"),
    ("d", "(d) append 1 MiB (O_APPEND)"),
    ("e", "(e) truncate the last {quarter} (truncate(2))"),
]
EDIT_KEYS = [k for k, _ in ROWS if k != "create"]


def plan(key, model):
    """Applies edit `key` to `model` (a bytearray) and returns the operations that do it."""
    size = len(model)
    if key == "a":
        pos = size // 2
        model[pos] ^= 0x5A
        return [("rewrite",)]
    if key == "a_pwrite":
        pos = size // 2
        model[pos] ^= 0xA5
        return [("pwrite", [(pos, bytes(model[pos:pos + 1]))])]
    if key == "b":
        model[1000:1000] = random.Random("insert").randbytes(100)
        return [("rewrite",)]
    if key == "c":
        rng = random.Random("scattered")  # the same offsets every repetition
        pieces = []
        for _ in range(100):
            off = rng.randrange(0, size - 4 * KiB)
            data = rng.randbytes(4 * KiB)
            model[off:off + 4 * KiB] = data
            pieces.append((off, data))
        return [("pwrite", pieces)]
    if key == "d":
        data = random.Random("append").randbytes(MiB)
        model += data
        return [("append", data)]
    if key == "e":
        n = size - size // 4
        del model[n:]
        return [("truncate", n)]
    raise ValueError(key)


def write_all(fd, content):
    view = memoryview(content)
    for at in range(0, len(view), BLOCK):
        part = view[at:at + BLOCK]
        while part:
            n = os.write(fd, part)
            part = part[n:]


def perform(ops, path, model):
    """Performs the operations on `path`; returns the monotonic time after the last call."""
    for op in ops:
        kind = op[0]
        if kind in ("rewrite", "create"):
            flags = os.O_WRONLY | (os.O_TRUNC if kind == "rewrite" else os.O_CREAT | os.O_EXCL)
            fd = os.open(path, flags, 0o644)
            try:
                write_all(fd, model)
            finally:
                os.close(fd)
        elif kind == "pwrite":
            fd = os.open(path, os.O_RDWR)
            try:
                for off, data in op[1]:
                    if os.pwrite(fd, data, off) != len(data):
                        raise BenchError(f"short pwrite to {path}")
            finally:
                os.close(fd)
        elif kind == "append":
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                write_all(fd, op[1])
            finally:
                os.close(fd)
        elif kind == "truncate":
            os.truncate(path, op[1])
        else:
            raise ValueError(kind)
    return now()


# ---------------------------------------------------------------- rsync

STAT_RE = {
    "sent": re.compile(r"^Total bytes sent:\s*([\d,]+)", re.M),
    "received": re.compile(r"^Total bytes received:\s*([\d,]+)", re.M),
    "literal": re.compile(r"^Literal data:\s*([\d,]+)", re.M),
}


class Rsync:
    def __init__(self, bench_dir, url):
        self.src = os.path.join(bench_dir, "rsync", "src")
        self.dst = os.path.join(bench_dir, "rsync", "dst")
        self.url = url
        self.mtime = int(time.time()) - 3600

    def bump_mtime(self, path):
        # Strictly increasing whole-second mtimes, so rsync's quick check (size + mtime) can
        # never skip an edit that keeps the size and lands in the same second as the last one.
        self.mtime = max(self.mtime + 1, int(time.time()))
        os.utime(path, (self.mtime, self.mtime))

    def sync(self, name, size, sha):
        cmd = ["rsync", "-a", "--stats", os.path.join(self.src, name), self.url]
        t0 = now()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        dt = now() - t0
        if r.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
        out = {}
        for k, rx in STAT_RE.items():
            m = rx.search(r.stdout)
            if not m:
                raise BenchError(f"no {k!r} in rsync --stats output:\n{r.stdout}")
            out[k] = int(m.group(1).replace(",", ""))
        dst = os.path.join(self.dst, name)
        if os.path.getsize(dst) != size or sha256_file(dst) != sha:
            raise BenchError(f"rsync left {dst} with the wrong content")
        out["time"] = dt
        return out


# ---------------------------------------------------------------- cross-checks

def ss_bytes(pid, local_port, remote_port):
    """Sum of bytes_acked + bytes_received over process `pid`'s TCP sockets whose local port is
    `local_port` (connections accepted from the peer) or remote port `remote_port` (dialled)."""
    r = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                       text=True, timeout=30, check=True)
    total = 0
    sockets = 0
    current = None
    for line in r.stdout.splitlines() + [""]:
        if line and line[0].isspace() and current is not None:
            current[1].append(line)
            continue
        if current is not None:
            head, info = current
            addrs = [t for t in head.split() if re.match(r"^\S+:\d+$", t)]
            if len(addrs) >= 2 and re.search(rf"pid={pid},", head):
                lport = int(addrs[0].rsplit(":", 1)[1])
                rport = int(addrs[1].rsplit(":", 1)[1])
                if lport == local_port or rport == remote_port:
                    text = " ".join(info)
                    a = re.search(r"bytes_acked:(\d+)", text)
                    b = re.search(r"bytes_received:(\d+)", text)
                    total += (int(a.group(1)) if a else 0) + (int(b.group(1)) if b else 0)
                    sockets += 1
        current = (line, []) if line else None
    return total, sockets


def lo_bytes():
    try:
        with open("/sys/class/net/lo/statistics/tx_bytes", encoding="ascii") as f:
            return int(f.read())
    except OSError:
        return None


def listen_port(config):
    with open(config, encoding="utf-8") as f:
        m = re.search(r'^listen\s*=\s*"[^"]*:(\d+)"', f.read(), re.M)
    if not m:
        raise BenchError(f"no listen port in {config}")
    return int(m.group(1))


def cpu_pressure_total():
    try:
        with open("/proc/pressure/cpu", encoding="ascii") as f:
            for line in f:
                if line.startswith("some "):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------- the runs

class Bench:
    def __init__(self, args):
        self.args = args
        self.pair = Pair(args.peerfs, args.dir)
        self.rsync = Rsync(args.dir, args.rsync_url)
        self.poll = args.poll_ms / 1000.0
        self.samples = {k: {"peerfs_wire": [], "peerfs_sent": [], "peerfs_received": [],
                            "peerfs_content": [], "peerfs_ms": [], "rsync_bytes": [],
                            "rsync_literal": [], "rsync_s": []} for k, _ in ROWS}
        self.crosscheck = []
        self.small = {"ms": [], "wire": None, "content": None}
        self.big = None
        self.idle = None
        self.pa = listen_port(self.pair.a.config)
        self.pb = listen_port(self.pair.b.config)

    def measure_idle(self, seconds=5.0):
        self.pair.settle()
        c0 = self.pair.counters()
        time.sleep(seconds)
        c1 = self.pair.counters()
        self.idle = (c1["sent"] + c1["received"] - c0["sent"] - c0["received"]) / seconds

    def peerfs_row(self, key, ops, name, model, sha, rep, crosscheck):
        pair = self.pair
        a_path = os.path.join(pair.a.mnt, name)
        b_path = os.path.join(pair.b.backing, name)
        pair.settle()
        old = stat_key(b_path)
        c0 = pair.counters()
        if crosscheck:
            ss0 = ss_bytes(pair.a.pid, self.pa, self.pb)
            lo0 = lo_bytes()
        t_close = perform(ops, a_path, model)
        dt = wait_version(b_path, old, len(model), sha, t_close, self.poll,
                          timeout=max(120.0, len(model) / MiB))
        pair.settle()
        c1 = pair.counters()
        s = self.samples[key]
        sent, received = c1["sent"] - c0["sent"], c1["received"] - c0["received"]
        s["peerfs_sent"].append(sent)
        s["peerfs_received"].append(received)
        s["peerfs_wire"].append(sent + received)
        s["peerfs_content"].append(c1["content"] - c0["content"])
        s["peerfs_ms"].append(dt * 1000.0)
        if crosscheck:
            ss1 = ss_bytes(pair.a.pid, self.pa, self.pb)
            lo1 = lo_bytes()
            self.crosscheck.append({
                "row": key, "status": sent + received, "ss": ss1[0] - ss0[0],
                "ss_sockets": ss1[1], "lo": None if lo0 is None else lo1 - lo0})
        progress(f"  peerfs {key:9s} rep {rep}: {fmt_int(sent + received)} B on the wire "
                 f"({fmt_int(c1['content'] - c0['content'])} B content), {dt * 1000:.1f} ms")

    def rsync_row(self, key, ops, name, model, sha, rep):
        path = os.path.join(self.rsync.src, name)
        perform(ops, path, model)
        self.rsync.bump_mtime(path)
        r = self.rsync.sync(name, len(model), sha)
        s = self.samples[key]
        s["rsync_bytes"].append(r["sent"] + r["received"])
        s["rsync_literal"].append(r["literal"])
        s["rsync_s"].append(r["time"])
        progress(f"  rsync  {key:9s} rep {rep}: {fmt_int(r['sent'] + r['received'])} B, "
                 f"{r['time']:.2f} s")

    def edits(self):
        size = self.args.size_mib * MiB
        for rep in range(1, self.args.reps + 1):
            name = f"data-{rep}.bin"
            rng = random.Random(FILE_SEED)
            model = bytearray(b"".join(rng.randbytes(MiB) for _ in range(size // MiB)))
            progress(f"repetition {rep}/{self.args.reps}: {name}")
            for key, _ in ROWS:
                ops = [("create",)] if key == "create" else plan(key, model)
                sha = hashlib.sha256(model).hexdigest()
                crosscheck = rep == 1 and key in ("create", "a_pwrite")
                # Alternate which system goes first, so neither always runs right after the
                # other's burst of disk writes.
                if (rep + EDIT_KEYS.index(key) if key in EDIT_KEYS else rep) % 2:
                    self.peerfs_row(key, ops, name, model, sha, rep, crosscheck)
                    self.rsync_row(key, ops, name, model, sha, rep)
                else:
                    self.rsync_row(key, ops, name, model, sha, rep)
                    self.peerfs_row(key, ops, name, model, sha, rep, crosscheck)
            # Free the disk: the file leaves A's drive (B moves it to its trash) and rsync's.
            os.unlink(os.path.join(self.pair.a.mnt, name))
            for d in (self.rsync.src, self.rsync.dst):
                os.unlink(os.path.join(d, name))
            del model
            wait_gone(os.path.join(self.pair.b.backing, name), 60)
            self.pair.settle()

    def small_files(self):
        pair = self.pair
        n = self.args.small
        os.mkdir(os.path.join(pair.a.mnt, "small"))
        b_dir = os.path.join(pair.b.backing, "small")
        deadline = now() + 30
        while not os.path.isdir(b_dir):
            if now() > deadline:
                raise BenchError(f"{b_dir} did not appear on B")
            time.sleep(0.01)
        pair.settle()
        rng = random.Random("small")
        c0 = pair.counters()
        for i in range(n):
            data = rng.randbytes(4 * KiB)
            sha = hashlib.sha256(data).hexdigest()
            name = f"doc-{i:04d}.bin"
            b_path = os.path.join(b_dir, name)
            fd = os.open(os.path.join(pair.a.mnt, "small", name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
            t_close = now()
            dt = wait_version(b_path, None, len(data), sha, t_close, self.poll, timeout=30)
            self.small["ms"].append(dt * 1000.0)
            time.sleep(0.05)
        pair.settle()
        c1 = pair.counters()
        self.small["wire"] = (c1["sent"] + c1["received"] - c0["sent"] - c0["received"]) / n
        self.small["content"] = (c1["content"] - c0["content"]) / n
        ms = self.small["ms"]
        progress(f"  small files: median {median(ms):.1f} ms, p90 {percentile(ms, 90):.1f} ms")

    def big_file(self):
        pair = self.pair
        size = self.args.big_mib * MiB
        name = "big.bin"
        a_path = os.path.join(pair.a.mnt, name)
        b_path = os.path.join(pair.b.backing, name)
        pair.settle()
        rss0 = {p.name: p.proc_status("VmRSS") for p in (pair.a, pair.b)}
        for p in (pair.a, pair.b):
            with open(f"/proc/{p.pid}/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # reset VmHWM to the current RSS
        peak = {pair.a.name: 0.0, pair.b.name: 0.0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                for p in (pair.a, pair.b):
                    try:
                        peak[p.name] = max(peak[p.name], p.proc_status("VmRSS"))
                    except (OSError, BenchError):
                        pass
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        c0 = pair.counters()
        h = hashlib.sha256()
        t0 = now()
        fd = os.open(a_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for _ in range(size // MiB):
                b = os.urandom(MiB)
                h.update(b)
                write_all(fd, b)
        finally:
            os.close(fd)
        t_close = now()
        progress(f"  big file: {self.args.big_mib} MiB written on A in {t_close - t0:.1f} s")
        dt = wait_version(b_path, None, size, h.hexdigest(), t_close, 0.02, timeout=1800)
        pair.settle(timeout=300)
        c1 = pair.counters()
        stop.set()
        sampler.join()
        hwm = {p.name: p.proc_status("VmHWM") for p in (pair.a, pair.b)}
        self.big = {
            "mib": self.args.big_mib, "seconds": dt,
            "wire": c1["sent"] + c1["received"] - c0["sent"] - c0["received"],
            "content": c1["content"] - c0["content"],
            "rss_before_mib": rss0, "hwm_mib": hwm, "sampled_peak_mib": peak,
        }
        progress(f"  big file: on B {dt:.1f} s after the close; peak RSS A "
                 f"{hwm[pair.a.name]:.0f} MiB, B {hwm[pair.b.name]:.0f} MiB")
        os.unlink(a_path)
        wait_gone(b_path, 300)
        pair.settle(timeout=300)


# ---------------------------------------------------------------- report

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
    return (f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, load average "
            f"{load} at the end")


def verdict(ok):
    return "met" if ok else "MISSED"


def row_table(bench):
    args = bench.args
    size = args.size_mib * MiB
    labels = {"size": f"{args.size_mib} MiB", "mid": f"{size // 2 // MiB} MiB",
              "quarter": f"{size // 4 // MiB} MiB"}
    out = []
    for key, label in ROWS:
        s = bench.samples[key]
        if not s["peerfs_wire"]:
            continue
        wire = median(s["peerfs_wire"])
        rs = median(s["rsync_bytes"])
        ratio = wire / rs if rs else float("nan")
        goals = []
        if key != "create":
            goal = 0.25 if key in QUARTER_ROWS else 1.0
            ok = wire <= goal * rs if goal < 1 else wire < rs
            goals.append(f"{'≤ ¼' if goal < 1 else '<'} rsync: {verdict(ok)}")
        ms = median(s["peerfs_ms"])
        if key in LATENCY_ROWS:
            goals.append(f"≤ {TARGET_EDIT_MS:.0f} ms: {verdict(ms <= TARGET_EDIT_MS)}")
        out.append({
            "row": label.format(**labels),
            "pwire": fmt_int(wire),
            "pcontent": fmt_int(median(s["peerfs_content"])),
            "rbytes": fmt_int(rs),
            "ratio": f"{ratio:.3f}" if ratio < 0.1 else f"{ratio:.2f}",
            "pms": f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}",
            "rs": f"{median(s['rsync_s']):.2f}",
            "target": "; ".join(goals),
        })
    return out


COLUMNS = [
    ("row", "edit", False),
    ("pwire", "peerfs bytes (wire)", True),
    ("pcontent", "peerfs content bytes", True),
    ("rbytes", "rsync bytes", True),
    ("ratio", "peerfs/rsync", True),
    ("pms", "peerfs close→B ms", True),
    ("rs", "rsync s", True),
    ("target", "targets", False),
]


def text_table(rows, columns):
    widths = {k: max(len(h), *(len(r[k]) for r in rows)) for k, h, _ in columns}
    lines = ["  ".join(h.rjust(widths[k]) if right else h.ljust(widths[k])
                       for k, h, right in columns)]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append("  ".join(r[k].rjust(widths[k]) if right else r[k].ljust(widths[k])
                               for k, _, right in columns))
    return lines


def md_table(rows, columns):
    md = ["| " + " | ".join(h for _, h, _ in columns) + " |",
          "|" + "|".join("---:" if right else "---" for _, _, right in columns) + "|"]
    for r in rows:
        md.append("| " + " | ".join(r[k] for k, _, _ in columns) + " |")
    return md


def report(bench, pressure):
    args = bench.args
    rows = row_table(bench)
    print()
    print("\n".join(text_table(rows, COLUMNS)))
    ms = bench.small["ms"]
    if ms:
        print()
        print(f"new 4 KiB file, close→B ({len(ms)} files): median {median(ms):.1f} ms, "
              f"p90 {percentile(ms, 90):.1f} ms, min {min(ms):.1f}, max {max(ms):.1f}; "
              f"{fmt_int(bench.small['wire'])} B on the wire per file; "
              f"target median ≤ {TARGET_SMALL_MS:.0f} ms: {verdict(median(ms) <= TARGET_SMALL_MS)}")
    if bench.big:
        b = bench.big
        print(f"big file {b['mib']} MiB: peak RSS (VmHWM) B {b['hwm_mib']['peer-b']:.0f} MiB, "
              f"A {b['hwm_mib']['peer-a']:.0f} MiB; target B < {TARGET_RSS_MIB:.0f} MiB: "
              f"{verdict(b['hwm_mib']['peer-b'] < TARGET_RSS_MIB)}")
    print()

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = [f"### Replication {date}", ""]
    md.append(f"Machine: {machine_facts()}.  ")
    md.append(f"Command: `{args.command}`")
    md.append("")
    md += md_table(rows, COLUMNS)
    md.append("")
    md.append(
        f"A {args.size_mib} MiB file of random bytes is written on A's drive, then edited "
        f"there row by row; rsync's source folder gets the same edits made the same way. Each "
        f"value is the median of {args.reps} repetition(s) of the whole sequence (a new file "
        f"each time). peerfs bytes: Δ(`bytes_sent` + `bytes_received`) in A's "
        f"`peerfs status --json` for peer B, both directions, TCP payload (TLS records, lock "
        f"messages, acknowledgements and heartbeats included) from just before the edit until "
        f"B has the new version, both queues are empty and the write lock is released; content "
        f"bytes: Δ`content_bytes_sent` (chunk data only). rsync bytes: \"Total bytes sent\" + "
        f"\"Total bytes received\" of `rsync -a --stats` (its own stream; no TCP/TLS framing "
        f"counted). peerfs time: from the return of the edit's last call (close, or truncate) "
        f"to the first poll (every {args.poll_ms:g} ms) of B's backing file that sees the new "
        f"version, confirmed by sha256 (the hashing is not counted); nothing is subtracted, so a "
        f"time is the true one rounded up to the next poll (up to {args.poll_ms:g} ms more). "
        f"rsync time: wall time of the rsync command (edit excluded).")
    if bench.idle is not None:
        md.append("")
        md.append(f"Idle traffic between A and B (heartbeats, both directions): "
                  f"{bench.idle:.0f} B/s, included in the peerfs bytes above.")
    if ms:
        md.append("")
        md.append(
            f"**New 4 KiB file** on A's drive (open O_CREAT|O_EXCL, write, close), time until "
            f"B's backing folder has it, {len(ms)} files 50 ms apart: median **{median(ms):.1f} "
            f"ms**, p90 {percentile(ms, 90):.1f} ms (min {min(ms):.1f}, max {max(ms):.1f}); "
            f"{fmt_int(bench.small['wire'])} B on the wire per file "
            f"({fmt_int(bench.small['content'])} B content). Target median ≤ "
            f"{TARGET_SMALL_MS:.0f} ms: {verdict(median(ms) <= TARGET_SMALL_MS)}.")
    if bench.big:
        b = bench.big
        md.append("")
        md.append(
            f"**Bounded memory**: a {b['mib']} MiB random file written on A's drive reached B "
            f"{b['seconds']:.1f} s after the close ({b['mib'] / b['seconds']:.0f} MiB/s incl. "
            f"A's chunking and B's fsync), {fmt_int(b['wire'])} B on the wire. Peak RSS "
            f"(VmHWM, reset before the write) of B's daemon **{b['hwm_mib']['peer-b']:.0f} MiB** "
            f"(RSS before {b['rss_before_mib']['peer-b']:.0f} MiB), of A's "
            f"{b['hwm_mib']['peer-a']:.0f} MiB (before {b['rss_before_mib']['peer-a']:.0f} MiB). "
            f"Target B < {TARGET_RSS_MIB:.0f} MiB: {verdict(b['hwm_mib']['peer-b'] < TARGET_RSS_MIB)}.")
    if bench.crosscheck:
        md.append("")
        parts = []
        for c in bench.crosscheck:
            lo = "" if c["lo"] is None else f", loopback interface tx {fmt_int(c['lo'])} B"
            parts.append(f"{c['row']}: status {fmt_int(c['status'])} B, `ss -tin` of A's "
                         f"{c['ss_sockets']} socket(s) to B {fmt_int(c['ss'])} B{lo}")
        md.append("Cross-check of the byte counts (repetition 1): " + "; ".join(parts) +
                  ". The loopback counter also carries IP/TCP headers and every other process's "
                  "loopback traffic.")
    if pressure is not None:
        md.append("")
        md.append(f"CPU pressure (/proc/pressure/cpu \"some\") over the run: {pressure:.0%}.")
    for n in args.note:
        md.append("")
        md.append(n)
    md.append("")
    md.append("<details><summary>every sample, in repetition order</summary>")
    md.append("")
    md.append("| edit | peerfs wire B (A→B + B→A) | peerfs content B | peerfs ms | rsync B | rsync s |")
    md.append("|---|---|---|---|---|---|")
    for key, _ in ROWS:
        s = bench.samples[key]
        if not s["peerfs_wire"]:
            continue
        wire = " ".join(f"{fmt_int(a + b)} ({fmt_int(a)} + {fmt_int(b)})"
                        for a, b in zip(s["peerfs_sent"], s["peerfs_received"]))
        md.append(f"| {key} | {wire} | "
                  f"{' '.join(fmt_int(x) for x in s['peerfs_content'])} | "
                  f"{' '.join(f'{x:.1f}' for x in s['peerfs_ms'])} | "
                  f"{' '.join(fmt_int(x) for x in s['rsync_bytes'])} | "
                  f"{' '.join(f'{x:.2f}' for x in s['rsync_s'])} |")
    if ms:
        md.append("")
        md.append("New 4 KiB files, ms: " + " ".join(f"{x:.1f}" for x in ms))
    md.append("")
    md.append("</details>")
    print("\n".join(md))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(md) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"samples": bench.samples, "small_ms": ms, "small": bench.small,
                       "big": bench.big, "idle_bytes_per_s": bench.idle,
                       "crosscheck": bench.crosscheck, "cpu_pressure": pressure}, f, indent=1)


def cmd_measure(args):
    bench = Bench(args)
    p0, t0 = cpu_pressure_total(), now()
    try:
        progress("idle traffic...")
        bench.measure_idle()
        bench.edits()
        if args.small:
            progress(f"{args.small} new 4 KiB files...")
            bench.small_files()
        if args.big_mib:
            progress(f"a {args.big_mib} MiB file...")
            bench.big_file()
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    p1, t1 = cpu_pressure_total(), now()
    pressure = None if p0 is None or p1 is None else (p1 - p0) / 1e6 / (t1 - t0)
    report(bench, pressure)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("measure")
    p.add_argument("--peerfs", required=True, help="the peerfs binary")
    p.add_argument("--dir", required=True, help="the benchmark directory (a/, b/, rsync/)")
    p.add_argument("--rsync-url", required=True, help="rsync://HOST:PORT/MODULE/")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--small", type=int, default=50)
    p.add_argument("--poll-ms", type=float, default=2.0)
    p.add_argument("--big-mib", type=int, default=0, help="0: no big-file test")
    p.add_argument("--command", default="bench/replication.sh")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--markdown", help="also write the markdown report here")
    p.add_argument("--json", help="write every sample here")
    p.set_defaults(func=cmd_measure)
    args = ap.parse_args()
    if args.size_mib < 128 or args.reps < 1 or args.small < 0 or args.poll_ms < 0:
        ap.error("--size-mib must be ≥ 128, --reps ≥ 1, --small and --poll-ms ≥ 0")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
