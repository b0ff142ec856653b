#!/usr/bin/env python3
"""Reconciliation benchmark helper for bench/reconcile.sh (python3 standard library only).

Subcommands:
  ports N             print N free TCP ports on 127.0.0.1 (one line, space-separated)
  measure [options]   set up peers A and B under DIR/initial and DIR/reconnect (identities
                      from `peerfs init`, configs on loopback ports), start and stop them with
                      `peerfs mount` (foreground child processes) / `peerfs unmount`, and
                      measure, side by side
                      with rsync (a daemon module at --rsync-url serving DIR/rsync/dst):
                        (1) initial sync of a tree that only A has;
                        (2) reconnection after one changed file in a tree both have, (a) B
                            restarted after a change through A's drive, (b) A restarted after
                            a change in its backing folder;
                      prints a text table and a markdown report on stdout.

peerfs bytes are the change of `bytes_sent` + `bytes_received` (TCP payload both ways, TLS
records included) in the `peerfs status` entry that the peer which stayed up (A in (1) and
(2a), B in (2b)) has for the other, from before the other starts until everything is settled
(B has the tree or the change, both peers report the other "in-sync", nothing queued, no lock).
rsync bytes are its "Total bytes sent" + "Total bytes received". Times are wall-clock: for
peerfs from the moment the restarted peer logged "peer connected" (its log, microseconds) to the
first poll of B's backing folder that sees the whole tree or the changed file (and, in (2), B
reporting A "in-sync"); also from the start of `peerfs mount`. For rsync, the wall time of the
command. Status comes straight from each daemon's control socket (the JSON `peerfs status
--json` prints), so polling costs no process start. Exits 1 if a replica ends up different.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import re
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time

KiB = 1 << 10
FILE_SIZE = KiB
FILES_PER_DIR = 100
SEED_MTIME = 1_764_000_000  # every seeded file and folder gets this mtime (identical trees)

# Targets from the reconciliation issue.
TARGET_RECONNECT_BYTES = 64 * KiB
TARGET_RECONNECT_S = 1.0


class BenchError(Exception):
    pass


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def fmt_int(n):
    return "-" if n is None else f"{int(round(n)):,}"


def fmt_s(s):
    if s is None:
        return "-"
    return f"{s:.3f}" if s < 1 else f"{s:.2f}"


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


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


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------- trees

def tree_names(dirs, flat=False):
    """Relative paths of a tree of `dirs` folders of FILES_PER_DIR files each (`flat`: the
    same number of files in the one folder `flat`)."""
    if flat:
        return [f"flat/f{k:06d}.bin" for k in range(dirs * FILES_PER_DIR)]
    return [f"d{d:04d}/f{f:03d}.bin" for d in range(dirs) for f in range(FILES_PER_DIR)]


def seed(roots, names, seed_text):
    """Writes the same deterministic FILE_SIZE-byte random files into every root, all with the
    mtime SEED_MTIME (folders too), so the trees are identical down to rsync's quick check."""
    rng = random.Random(seed_text)
    made = set()
    for name in names:
        data = rng.randbytes(FILE_SIZE)
        d = os.path.dirname(name)
        for root in roots:
            if d not in made:
                os.makedirs(os.path.join(root, d), exist_ok=True)
            path = os.path.join(root, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.utime(path, (SEED_MTIME, SEED_MTIME))
        made.add(d)
    for root in roots:
        for d in made:
            os.utime(os.path.join(root, d), (SEED_MTIME, SEED_MTIME))


RETIRED = []


def retire(path):
    """Moves `path` (if any) aside into the scratch folder's `retired`, deleted when the run
    ends (by reconcile.sh). Deleting it now would skew the next copy: ext4 without a journal
    (this machine's disk) skips every inode freed in the last 30 s when it allocates one, so
    creating 10,000 files right after deleting 10,000 scans the freed ones again and again."""
    if not os.path.lexists(path):
        return
    graveyard = os.path.join(os.environ.get("RECON_RETIRED", os.path.dirname(path)),
                             "retired")
    os.makedirs(graveyard, exist_ok=True)
    dest = os.path.join(graveyard, f"{len(RETIRED)}-{os.path.basename(path)}")
    os.rename(path, dest)
    RETIRED.append(dest)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def compare_trees(a_root, b_root, ignore=()):
    """Differences between two trees (names, types, contents), at most 10 listed. Names in
    `ignore` at the top level (peerfs's own files, if any) are skipped."""
    diffs = []

    def walk(rel):
        a_dir = os.path.join(a_root, rel)
        b_dir = os.path.join(b_root, rel)
        try:
            a = {e.name: e for e in os.scandir(a_dir)}
        except FileNotFoundError:
            a = {}
        try:
            b = {e.name: e for e in os.scandir(b_dir)}
        except FileNotFoundError:
            b = {}
        if not rel:
            for n in ignore:
                a.pop(n, None)
                b.pop(n, None)
        for n in sorted(set(a) | set(b)):
            if len(diffs) >= 10:
                return
            r = os.path.join(rel, n)
            if n not in a or n not in b:
                diffs.append(f"{r}: only on {'A' if n in a else 'B'}")
            elif a[n].is_dir(follow_symlinks=False) != b[n].is_dir(follow_symlinks=False):
                diffs.append(f"{r}: a folder on one side only")
            elif a[n].is_dir(follow_symlinks=False):
                walk(r)
            elif read(a[n].path) != read(b[n].path):
                diffs.append(f"{r}: contents differ")

    walk("")
    return diffs


def wait_tree(root, names, size, poll, deadline):
    """Polls `root` until every name in `names` is there as a file of `size` bytes. Returns
    the wall time at the end of the poll that saw the last name (if the sizes checked after it
    were right), or None at the deadline.

    The poller runs beside the peers on the same CPUs (rsync is timed without one), so a poll
    must cost little: it lists folders in order and stops at the first one that still lacks a
    name (a folder seen complete is not listed again), and it looks at names only. Receivers
    rename complete files into place, so a name that is there has its whole content; sizes are
    checked once all names are there, and a tree with a wrong size is polled on (and checked
    again) until its sizes are right too."""
    pending = {}
    for n in names:
        d, f = os.path.split(n)
        pending.setdefault(d, set()).add(f)
    order = sorted(pending)
    total = len(names)
    while True:
        while order:
            d = order[0]
            try:
                present = os.listdir(os.path.join(root, d))
            except FileNotFoundError:
                break
            pending[d].difference_update(present)
            if pending[d]:
                break
            order.pop(0)
        if not order:
            seen = time.time()
            wrong = [n for n in names if not sized(os.path.join(root, n), size)]
            if not wrong:
                return seen
            names = wrong
        t = time.time()
        if t > deadline:
            if order:
                left = f"{sum(len(pending[d]) for d in order):,} of {total:,} files missing"
            else:
                left = f"{len(names):,} of {total:,} files not of {size} bytes"
            progress(f"  not complete at the deadline: {left}")
            return None
        time.sleep(poll)


def sized(path, size):
    """Whether `path` is a regular file (not followed) of `size` bytes."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


# ---------------------------------------------------------------- peers

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z\s")


class Peer:
    def __init__(self, peerfs, root, name, log_level):
        self.peerfs = peerfs
        self.root = root
        self.name = name
        self.log_level = log_level
        self.config = os.path.join(root, "peerfs.toml")
        self.backing = os.path.join(root, "backing")
        self.mnt = os.path.join(root, "mnt")
        self.state = os.path.join(root, "state")
        self.socket = os.path.join(self.state, "control.sock")
        self.log = os.path.join(self.state, "peerfs.log")
        self.id = None
        self.port = None
        self.up = False
        self.proc = None

    def fresh(self, keep_backing):
        """A new identity and state (nothing known of any earlier run); an empty backing
        folder unless `keep_backing`."""
        if self.up:
            raise BenchError(f"{self.name} is still mounted")
        retire(self.state)
        if not keep_backing:
            retire(self.backing)
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        r = subprocess.run([self.peerfs, "init", "--state", self.state, "--name", self.name],
                           capture_output=True, text=True, timeout=60, check=False)
        if r.returncode != 0 or not r.stdout.strip():
            raise BenchError(f"peerfs init of {self.name} failed: {r.stderr.strip()}")
        self.id = r.stdout.strip().splitlines()[-1].strip()

    def write_config(self, other):
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(f'name = "{self.name}"\n'
                    f'backing = "{self.backing}"\n'
                    f'mountpoint = "{self.mnt}"\n'
                    f'state = "{self.state}"\n'
                    f'log_level = "{self.log_level}"\n'
                    f'listen = "127.0.0.1:{self.port}"\n\n'
                    f'[[peers]]\n'
                    f'name = "{other.name}"\n'
                    f'id = "{other.id}"\n'
                    f'address = "127.0.0.1:{other.port}"\n')

    def mount(self):
        """`peerfs mount` in the foreground (its log appended to STATE/peerfs.log), as a child
        process; returns the seconds until the drive is mounted and the control socket
        answers. Not `--daemon`: its parent gives up after 30 s, and a first start scan of a
        large tree takes longer."""
        t0 = time.time()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.peerfs, "mount", "--config", self.config], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)
        self.up = True  # from here on, the cleanup unmounts
        deadline = t0 + 1800
        while True:
            code = self.proc.poll()
            if code is not None:
                self.up = os.path.ismount(self.mnt)
                raise BenchError(f"peerfs mount of {self.name} exited {code} (log {self.log})")
            if os.path.ismount(self.mnt):
                try:
                    if self.ask("status", timeout=1).get("status", {}).get("mounted"):
                        return time.time() - t0
                except BenchError:
                    pass
            if time.time() > deadline:
                raise BenchError(f"{self.name} not mounted {deadline - t0:.0f} s after its start")
            time.sleep(0.01)

    def unmount(self):
        if not self.up:
            return
        r = subprocess.run([self.peerfs, "unmount", self.mnt], capture_output=True, text=True,
                           timeout=120, check=False)
        if r.returncode != 0:
            raise BenchError(f"peerfs unmount {self.mnt} exited {r.returncode}: "
                             f"{r.stderr.strip()}")
        if self.proc is not None:
            code = self.proc.wait(timeout=60)
            self.proc = None
            if code != 0:
                raise BenchError(f"{self.name}'s peerfs mount exited {code} after the unmount "
                                 f"(log {self.log})")
        self.up = False

    def ask(self, cmd, timeout=10):
        """One request on the control socket; the response's JSON."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.socket)
                s.sendall(json.dumps({"v": 1, "cmd": cmd}).encode() + b"\n")
                data = bytearray()
                while True:
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    data += chunk
            resp = json.loads(data)
        except (OSError, ValueError) as e:
            raise BenchError(f"{self.name}'s control socket {self.socket}: {e}") from e
        if not resp.get("ok"):
            raise BenchError(f"{self.name}'s daemon refused {cmd}: {resp.get('error')}")
        return resp

    def status(self):
        return self.ask("status")["status"]

    def link(self, other, status=None):
        """This peer's status entry for peer `other`."""
        for p in (status or self.status()).get("peers") or []:
            if p.get("name") == other.name:
                return p
        raise BenchError(f"{self.name}'s status does not list {other.name}")

    def wire(self, other):
        """TCP payload exchanged with `other` (both ways) and content bytes sent, cumulative
        over this daemon's life."""
        p = self.link(other)
        return {"wire": int(p.get("bytes_sent") or 0) + int(p.get("bytes_received") or 0),
                "sent": int(p.get("bytes_sent") or 0),
                "received": int(p.get("bytes_received") or 0),
                "content": int(p.get("content_bytes_sent") or 0)
                + int(p.get("content_bytes_received") or 0)}

    def scan(self):
        """`reconcile.scan` of the status ({"files","changed","removed","ms"}), None if the
        daemon reports none."""
        rec = self.status().get("reconcile")
        if isinstance(rec, dict) and isinstance(rec.get("scan"), dict):
            return rec["scan"]
        return None

    def connected_at(self, after):
        """Wall time of the first "peer connected" line of this peer's log at or after `after`
        (the log's timestamps are UTC with microseconds), None if there is none."""
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if "peer connected" not in line:
                        continue
                    m = LOG_TIME.match(line)
                    if not m:
                        continue
                    t = datetime.datetime.fromisoformat(m.group(1)).replace(
                        tzinfo=datetime.timezone.utc).timestamp()
                    if t >= after - 0.001:
                        return t
        except OSError:
            pass
        return None


def sync_of(entry):
    s = entry.get("sync")
    return s if isinstance(s, dict) else None


def in_sync(entry):
    """A peer entry says in sync: "in-sync" where the daemon reports a sync state; connected
    with nothing queued where it does not (daemons older than reconciliation)."""
    if entry.get("connected") is not True:
        return False
    s = sync_of(entry)
    if s is not None:
        return s.get("state") == "in-sync"
    return not entry.get("queue") and not entry.get("queue_bytes")


class Pair:
    def __init__(self, args, root):
        self.args = args
        self.a = Peer(args.peerfs, os.path.join(root, "a"), "peer-a", args.log_level)
        self.b = Peer(args.peerfs, os.path.join(root, "b"), "peer-b", args.log_level)
        self.reports_sync = None

    def fresh(self, keep_a, keep_b):
        self.a.fresh(keep_a)
        self.b.fresh(keep_b)
        self.a.port, self.b.port = free_ports(2)
        self.a.write_config(self.b)
        self.b.write_config(self.a)

    def settle(self, timeout):
        """Waits until both peers report the other in sync, nothing is queued either way and no
        lock is listed. Returns the wall time it was first seen, None at the timeout."""
        deadline = time.time() + timeout
        while True:
            t = time.time()
            la = self.a.link(self.b)
            lb = self.b.link(self.a)
            if self.reports_sync is None:
                self.reports_sync = sync_of(la) is not None
            ok = in_sync(la) and in_sync(lb)
            for entry in (la, lb):
                ok = ok and not entry.get("queue") and not entry.get("queue_bytes")
            if ok and not (self.a.ask("locks").get("locks") or self.b.ask("locks").get("locks")):
                return t
            if t > deadline:
                progress(f"  not settled after {timeout:.0f} s: A sees B {compact(la)}; "
                         f"B sees A {compact(lb)}")
                return None
            time.sleep(0.02)

    def stop(self):
        for p in (self.b, self.a):
            p.unmount()


def compact(entry):
    keep = ("connected", "queue", "queue_bytes", "bytes_sent", "bytes_received", "sync",
            "replication_error", "last_error")
    return json.dumps({k: entry.get(k) for k in keep if k in entry})


# ---------------------------------------------------------------- rsync

STAT_RE = {
    "sent": re.compile(r"^Total bytes sent:\s*([\d,]+)", re.M),
    "received": re.compile(r"^Total bytes received:\s*([\d,]+)", re.M),
    "literal": re.compile(r"^Literal data:\s*([\d,]+)", re.M),
}


def rsync(src, url, extra=()):
    """`rsync -a --stats [EXTRA] SRC/ URL/`: bytes both ways and wall time."""
    cmd = ["rsync", "-a", "--stats", *extra, src.rstrip("/") + "/", url]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    dt = time.time() - t0
    if r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    out = {}
    for k, rx in STAT_RE.items():
        m = rx.search(r.stdout)
        if not m:
            raise BenchError(f"no {k!r} in rsync --stats output:\n{r.stdout}")
        out[k] = int(m.group(1).replace(",", ""))
    out["bytes"] = out["sent"] + out["received"]
    out["s"] = dt
    return out


def timed_sync():
    t0 = time.time()
    subprocess.run(["sync"], check=True, timeout=600)
    return time.time() - t0


# ---------------------------------------------------------------- the runs

def cpu_pressure_total():
    try:
        with open("/proc/pressure/cpu", encoding="ascii") as f:
            for line in f:
                if line.startswith("some "):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = args.dir
        self.url = args.rsync_url.rstrip("/") + "/"
        self.rsync_dst = os.path.join(args.dir, "rsync", "dst")
        self.samples = {}
        self.notes = []
        self.failures = []
        self.reports_sync = None
        self.reports_scan = None

    def sample(self, case, key, value):
        self.samples.setdefault(case, {}).setdefault(key, []).append(value)

    # ------------------------------------------------------------ (1) initial sync

    def initial(self):
        args = self.args
        root = os.path.join(self.dir, "initial")
        pair = Pair(args, root)
        names = tree_names(args.files // FILES_PER_DIR)
        src = os.path.join(self.dir, "rsync", "src-initial")
        progress(f"(1) seeding {len(names):,} files of {FILE_SIZE} B into A's backing folder "
                 f"and rsync's source...")
        os.makedirs(os.path.join(root, "a", "backing"), exist_ok=True)
        seed([os.path.join(root, "a", "backing"), src], names, "initial")
        for rep in range(1, args.reps + 1):
            steps = [lambda: self.initial_peerfs(pair, names, rep),
                     lambda: self.initial_rsync(src, names, rep)]
            for step in (steps if rep % 2 else steps[::-1]):
                step()
        pair.stop()

    def initial_peerfs(self, pair, names, rep):
        args = self.args
        case = "initial"
        pair.fresh(keep_a=True, keep_b=False)
        mount_a = pair.a.mount()
        # A's start scan indexes the seeded tree; where the daemon reports it, wait for it
        # (B would otherwise meet a half-indexed A, and the scan is not what (1) times).
        scan = self.wait_scan(pair.a, len(names))
        subprocess.run(["sync"], check=True, timeout=600)
        t0 = time.time()
        mount_b = pair.b.mount()
        t_done = wait_tree(pair.b.backing, names, FILE_SIZE, 0.02, t0 + args.timeout)
        t_conn = pair.b.connected_at(t0)
        t_settled = pair.settle(args.timeout if t_done else 5)
        w = pair.a.wire(pair.b)
        self.reports_sync = pair.reports_sync
        diffs = compare_trees(pair.a.backing, pair.b.backing) if t_done else []
        if diffs:
            self.failures.append(f"(1) rep {rep}: B's tree differs from A's: {diffs}")
        pair.stop()
        from_conn = None if t_done is None or t_conn is None else t_done - t_conn
        from_start = None if t_done is None else t_done - t0
        self.sample(case, "peerfs_s", from_conn if t_conn is not None else from_start)
        self.sample(case, "peerfs_from_mount_s", from_start)
        self.sample(case, "peerfs_settled_s",
                    None if t_settled is None or t_conn is None else t_settled - t_conn)
        self.sample(case, "peerfs_wire", w["wire"] if t_done else None)
        self.sample(case, "peerfs_sent", w["sent"])
        self.sample(case, "peerfs_received", w["received"])
        self.sample(case, "peerfs_content", w["content"])
        self.sample(case, "mount_a_s", mount_a)
        self.sample(case, "mount_b_s", mount_b)
        self.sample(case, "scan_a", scan)
        if t_done is None:
            self.notes.append(f"(1) rep {rep}: B did not have A's tree {args.timeout} s after "
                              f"its start.")
        progress(f"  peerfs rep {rep}: tree on B {fmt_s(from_conn)} s after B connected "
                 f"({fmt_s(from_start)} s after its mount started), settled "
                 f"{fmt_s(None if t_settled is None or t_conn is None else t_settled - t_conn)}"
                 f" s; {fmt_int(w['wire'])} B on the wire; A's scan {scan}")

    def initial_rsync(self, src, names, rep):
        case = "initial"
        dst = os.path.join(self.rsync_dst, "initial")
        retire(dst)
        subprocess.run(["sync"], check=True, timeout=600)
        r = rsync(src, self.url + "initial/")
        synced = timed_sync()
        diffs = compare_trees(src, dst)
        if diffs:
            self.failures.append(f"(1) rsync rep {rep}: the copy differs: {diffs}")
        self.sample(case, "rsync_bytes", r["bytes"])
        self.sample(case, "rsync_s", r["s"])
        self.sample(case, "rsync_sync_s", synced)
        progress(f"  rsync  rep {rep}: {fmt_int(r['bytes'])} B, {r['s']:.2f} s "
                 f"(then sync(1) {synced:.2f} s)")
        if not self.args.rsync_fsync:
            return
        # The like-for-like copy: peerfs acknowledges a file only once it is durable, which
        # plain rsync never waits for. `--fsync` makes rsync's receiver fsync every file.
        dst = os.path.join(self.rsync_dst, "initial-fsync")
        retire(dst)
        subprocess.run(["sync"], check=True, timeout=600)
        r = rsync(src, self.url + "initial-fsync/", ["--fsync"])
        diffs = compare_trees(src, dst)
        if diffs:
            self.failures.append(f"(1) rsync --fsync rep {rep}: the copy differs: {diffs}")
        self.sample(case, "rsync_fsync_s", r["s"])
        progress(f"  rsync --fsync rep {rep}: {fmt_int(r['bytes'])} B, {r['s']:.2f} s")

    def wait_scan(self, peer, files):
        """The peer's reconcile.scan once it has counted `files` files, or has reported a time
        and stayed the same for a second (None if the daemon reports no scan)."""
        deadline = time.time() + self.args.timeout
        last, since = None, time.time()
        while True:
            scan = peer.scan()
            if scan is None:
                if self.reports_scan is None:
                    self.reports_scan = False
                return None
            self.reports_scan = True
            t = time.time()
            if scan != last:
                last, since = scan, t
            if int(scan.get("files") or 0) >= files or t > deadline or \
                    (scan.get("ms") and t - since >= 1.0):
                return scan
            time.sleep(0.05)

    # ------------------------------------------------------------ (2) reconnection

    def reconnect(self):
        args = self.args
        root = os.path.join(self.dir, "reconnect")
        pair = Pair(args, root)
        names = tree_names(args.tree_dirs, args.flat)
        src = os.path.join(self.dir, "rsync", "src-reconnect")
        dst = os.path.join(self.rsync_dst, "reconnect")
        progress(f"(2) seeding {len(names):,} files of {FILE_SIZE} B into A's and B's backing "
                 f"folders and rsync's source and target...")
        t0 = time.time()
        seed([os.path.join(root, "a", "backing"), os.path.join(root, "b", "backing"), src, dst],
             names, "reconnect")
        subprocess.run(["sync"], check=True, timeout=600)
        progress(f"  seeded in {time.time() - t0:.0f} s")
        pair.fresh(keep_a=True, keep_b=True)

        # First meeting of the two identical trees (once).
        case = "first"
        self.sample(case, "mount_a_s", pair.a.mount())
        self.sample(case, "scan_a", self.wait_scan(pair.a, len(names)))
        t0 = time.time()
        self.sample(case, "mount_b_s", pair.b.mount())
        self.sample(case, "scan_b", self.wait_scan(pair.b, len(names)))
        t_settled = pair.settle(args.timeout)
        t_conn = pair.b.connected_at(t0)
        w = pair.a.wire(pair.b)
        self.sample(case, "peerfs_s", None if t_settled is None or t_conn is None
                    else t_settled - t_conn)
        self.sample(case, "peerfs_from_mount_s", None if t_settled is None else t_settled - t0)
        self.sample(case, "peerfs_wire", w["wire"])
        self.sample(case, "peerfs_content", w["content"])
        progress(f"  first meeting: in sync {fmt_s(self.samples[case]['peerfs_s'][0])} s after "
                 f"B connected, {fmt_int(w['wire'])} B on the wire")
        if t_settled is None:
            raise BenchError("the peers never got in sync over the identical trees")

        rng = random.Random("changes")
        picks = rng.sample(range(len(names)), 3 * args.reps)
        for rep in range(1, args.reps + 1):
            steps = [
                lambda: self.reconnect_peerfs(pair, "restart_b", names[picks[3 * rep - 3]],
                                              rng, rep),
                lambda: self.reconnect_peerfs(pair, "restart_a", names[picks[3 * rep - 2]],
                                              rng, rep),
                lambda: self.reconnect_rsync(src, dst, names[picks[3 * rep - 1]], rng, rep),
            ]
            for step in (steps if rep % 2 else steps[::-1]):
                step()
        progress("  comparing A's and B's trees...")
        pair.settle(args.timeout)
        diffs = compare_trees(pair.a.backing, pair.b.backing)
        if diffs:
            self.failures.append(f"(2) at the end B's tree differs from A's: {diffs}")
        pair.stop()

    def reconnect_peerfs(self, pair, case, name, rng, rep):
        """restart_b: B stopped, `name` changed through A's drive, B started.
        restart_a: A stopped, `name` changed in A's backing folder, A started."""
        args = self.args
        data = rng.randbytes(FILE_SIZE)
        b_path = os.path.join(pair.b.backing, name)
        up, down = (pair.a, pair.b) if case == "restart_b" else (pair.b, pair.a)
        down.unmount()
        if case == "restart_b":
            path = os.path.join(pair.a.mnt, name)
        else:
            path = os.path.join(pair.a.backing, name)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        if case == "restart_b":
            # The write lock of a drive edit lingers; let it go before B comes back, so the
            # measurement is the reconnection, not a lock release.
            time.sleep(1.5)
        c0 = up.wire(down)
        t0 = time.time()
        watch = Watch(b_path, data, t0 + args.timeout)
        mount_s = down.mount()
        t_done, seen_at = self.wait_change(pair, watch, t0 + args.timeout)
        t_conn = down.connected_at(t0)
        t_settled = pair.settle(args.timeout if t_done else 5)
        c1 = up.wire(down)
        scan = down.scan()
        conn_ref = t_conn if t_conn is not None else t0
        self.sample(case, "peerfs_s", None if t_done is None else t_done - conn_ref)
        self.sample(case, "peerfs_file_s", None if seen_at is None else seen_at - conn_ref)
        self.sample(case, "peerfs_from_mount_s", None if t_done is None else t_done - t0)
        self.sample(case, "peerfs_wire", c1["wire"] - c0["wire"] if t_settled else None)
        self.sample(case, "peerfs_sent", c1["sent"] - c0["sent"])
        self.sample(case, "peerfs_received", c1["received"] - c0["received"])
        self.sample(case, "peerfs_content", c1["content"] - c0["content"])
        self.sample(case, "mount_s", mount_s)
        self.sample(case, "scan", scan)
        who = "B" if case == "restart_b" else "A"
        if t_done is None:
            self.notes.append(f"({'2a' if case == 'restart_b' else '2b'}) rep {rep}: B did not "
                              f"have the change of {name} (or did not report A in sync) "
                              f"{args.timeout} s after {who} started.")
        progress(f"  peerfs {case} rep {rep} ({name}): on B and in sync "
                 f"{fmt_s(None if t_done is None else t_done - conn_ref)} s after {who} "
                 f"connected (file {fmt_s(None if seen_at is None else seen_at - conn_ref)} s; "
                 f"{who}'s mount took {mount_s:.2f} s); {fmt_int(c1['wire'] - c0['wire'])} B "
                 f"on the wire; {who}'s scan {scan}")

    def wait_change(self, pair, watch, deadline):
        """Waits for the watcher to see the new content on B, then polls B's status (every
        10 ms) until it reports A in sync. Returns (wall time both were first seen, time the
        file was first seen), None for what was not seen by the deadline."""
        watch.thread.join()
        if watch.seen_at is None:
            return None, None
        while True:
            t = time.time()
            try:
                if in_sync(pair.b.link(pair.a)):
                    return max(t, watch.seen_at), watch.seen_at
            except BenchError:
                pass  # B's control socket is not up yet
            if t > deadline:
                return None, watch.seen_at
            time.sleep(0.01)

    def reconnect_rsync(self, src, dst, name, rng, rep):
        case = "rsync_one"
        data = rng.randbytes(FILE_SIZE)
        path = os.path.join(src, name)
        with open(path, "wb") as f:
            f.write(data)
        t = SEED_MTIME + 10 * rep  # a new mtime, so the quick check sees the change
        os.utime(path, (t, t))
        r = rsync(src, self.url + "reconnect/")
        if read(os.path.join(dst, name)) != data:
            self.failures.append(f"(2) rsync rep {rep}: {name} not updated")
        self.sample(case, "rsync_bytes", r["bytes"])
        self.sample(case, "rsync_s", r["s"])
        self.sample(case, "rsync_literal", r["literal"])
        progress(f"  rsync  one changed file rep {rep}: {fmt_int(r['bytes'])} B, "
                 f"{r['s']:.2f} s")


class Watch:
    """Polls B's backing file every 2 ms on its own thread, from before the restarted peer's
    mount (which returns only after its start scan), until it holds `data`."""

    def __init__(self, path, data, deadline):
        self.path, self.data, self.deadline = path, data, deadline
        self.seen_at = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        old = stat_key(self.path)
        while True:
            t = time.time()
            key = stat_key(self.path)
            if key is not None and key != old:
                old = key
                try:
                    if read(self.path) == self.data:
                        self.seen_at = t
                        return
                except FileNotFoundError:
                    pass
            if t > self.deadline:
                return
            time.sleep(0.002)


def stat_key(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


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


def scan_text(scans):
    scans = [s for s in scans if isinstance(s, dict)]
    if not scans:
        return "-"
    ms = median([s.get("ms") for s in scans])
    files = scans[0].get("files")
    changed = "/".join(str(s.get("changed")) for s in scans)
    return f"{fmt_int(ms)} ms ({fmt_int(files)} files, changed {changed})"


def report(bench, pressure):
    args = bench.args
    s = bench.samples
    get = lambda case, key: s.get(case, {}).get(key, [])  # noqa: E731
    ntree = args.tree_dirs * FILES_PER_DIR
    shape = " (one flat folder)" if args.flat else ""
    rows = []

    i_p, i_r = median(get("initial", "peerfs_s")), median(get("initial", "rsync_s"))
    i_pw, i_rw = median(get("initial", "peerfs_wire")), median(get("initial", "rsync_bytes"))
    rows.append({
        "case": f"(1) initial sync, {args.files:,} × 1 KiB in {args.files // FILES_PER_DIR} "
                f"folders, B empty",
        "pwire": fmt_int(i_pw), "rbytes": fmt_int(i_rw),
        "bratio": "-" if i_pw is None or not i_rw else f"{i_pw / i_rw:.2f}",
        "ps": fmt_s(i_p), "rs": fmt_s(i_r),
        "tratio": "-" if i_p is None or not i_r else f"{i_p / i_r:.2f}",
        "scan": scan_text(get("initial", "scan_a")) + " (A)",
        "target": "-" if i_p is None else f"≤ rsync time: {verdict(i_p <= i_r)}",
    })
    i_f = median(get("initial", "rsync_fsync_s"))
    if i_f is not None:
        rows.append({
            "case": "(1) the same, rsync with `--fsync` (every copy durable, as peerfs's)",
            "pwire": "", "rbytes": "", "bratio": "", "ps": fmt_s(i_p), "rs": fmt_s(i_f),
            "tratio": "-" if i_p is None or not i_f else f"{i_p / i_f:.2f}",
            "scan": "", "target": "(for comparison)",
        })
    f_p, f_w = median(get("first", "peerfs_s")), median(get("first", "peerfs_wire"))
    rows.append({
        "case": f"first meeting of two identical {ntree:,}-file trees{shape} (setup of (2))",
        "pwire": fmt_int(f_w), "rbytes": "", "bratio": "", "ps": fmt_s(f_p), "rs": "",
        "tratio": "",
        "scan": scan_text(get("first", "scan_b")) + " (B)",
        "target": "",
    })
    r_b, r_s = median(get("rsync_one", "rsync_bytes")), median(get("rsync_one", "rsync_s"))
    for case, label, who in (
            ("restart_b", f"(2a) B restarted; 1 file of {ntree:,}{shape} changed through A's "
             "drive", "B"),
            ("restart_a", f"(2b) A restarted; 1 file of {ntree:,}{shape} changed in A's backing "
             "folder", "A")):
        p, w = median(get(case, "peerfs_s")), median(get(case, "peerfs_wire"))
        goals = []
        if w is not None:
            goals.append(f"< 64 KiB: {verdict(w < TARGET_RECONNECT_BYTES)}")
        if p is not None:
            goals.append(f"< 1 s: {verdict(p < TARGET_RECONNECT_S)}")
        rows.append({
            "case": label, "pwire": fmt_int(w), "rbytes": fmt_int(r_b),
            "bratio": "-" if w is None or not r_b else f"{w / r_b:.3f}",
            "ps": fmt_s(p), "rs": fmt_s(r_s),
            "tratio": "-" if p is None or not r_s else f"{p / r_s:.2f}",
            "scan": scan_text(get(case, "scan")) + f" ({who})",
            "target": "; ".join(goals) if goals else "not synced",
        })

    columns = [("case", "case", False), ("pwire", "peerfs bytes (wire)", True),
               ("rbytes", "rsync bytes", True), ("bratio", "bytes peerfs/rsync", True),
               ("ps", "peerfs s", True), ("rs", "rsync s", True),
               ("tratio", "time peerfs/rsync", True), ("scan", "start scan", False),
               ("target", "targets", False)]
    widths = {k: max(len(h), *(len(r[k]) for r in rows)) for k, h, _ in columns}
    print()
    head = "  ".join(h.rjust(widths[k]) if right else h.ljust(widths[k])
                     for k, h, right in columns)
    print(head)
    print("-" * len(head))
    for r in rows:
        print("  ".join(r[k].rjust(widths[k]) if right else r[k].ljust(widths[k])
                        for k, _, right in columns))
    print()

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = [f"### Reconciliation {date}", ""]
    md.append(f"Machine: {machine_facts()}.  ")
    md.append(f"Command: `{args.command}`")
    md.append("")
    md.append("| " + " | ".join(h for _, h, _ in columns) + " |")
    md.append("|" + "|".join("---:" if right else "---" for _, _, right in columns) + "|")
    for r in rows:
        md.append("| " + " | ".join(r[k] for k, _, _ in columns) + " |")
    md.append("")
    md.append(
        f"Medians of {args.reps} repetitions (the first meeting: once). peerfs bytes: "
        f"Δ(`bytes_sent` + `bytes_received`) in the status entry that the peer which stayed up "
        f"(A in (1) and (2a), B in (2b)) has for the other, both directions, TCP payload (TLS "
        f"handshake and records, digests, lock messages, acknowledgements, heartbeats), from "
        f"before the other started until both report the other in sync with nothing queued and "
        f"no lock. rsync bytes: \"Total bytes sent\" + \"Total bytes received\" of `rsync -a "
        f"--stats` (its own stream). peerfs time: from the \"peer connected\" line of the "
        f"starting peer's log to the first poll of B's backing folder that sees the whole tree "
        f"((1), every 20 ms) or the changed file (every 2 ms) with B reporting A in sync ((2); "
        f"status read from the control socket every 10 ms once the file is there). rsync time: "
        f"wall time of the command, which ends without fsync (with `--fsync`, where reported, "
        f"its receiver fsyncs each file before renaming it into place).")
    extra = []
    mp = median(get("initial", "peerfs_from_mount_s"))
    if mp is not None:
        extra.append(f"(1) from the start of B's `peerfs mount` to the whole tree on B: "
                     f"{fmt_s(mp)} s (B's mount itself {fmt_s(median(get('initial', 'mount_b_s')))}"
                     f" s; A's {fmt_s(median(get('initial', 'mount_a_s')))} s, its start scan "
                     f"included); until both report in sync:"
                     f" {fmt_s(median(get('initial', 'peerfs_settled_s')))} s after B "
                     f"connected; content bytes {fmt_int(median(get('initial', 'peerfs_content')))}"
                     f"; rsync followed by sync(1): "
                     f"{fmt_s(median(get('initial', 'rsync_sync_s')))} s more.")
    for case, tag, who in (("restart_b", "2a", "B"), ("restart_a", "2b", "A")):
        if get(case, "mount_s"):
            extra.append(f"({tag}) {who}'s `peerfs mount` (until mounted, start scan included) took "
                         f"{fmt_s(median(get(case, 'mount_s')))} s; the changed file was on B "
                         f"{fmt_s(median(get(case, 'peerfs_file_s')))} s after {who} connected; "
                         f"from the start of the mount to on B and in sync "
                         f"{fmt_s(median(get(case, 'peerfs_from_mount_s')))} s; content bytes "
                         f"{fmt_int(median(get(case, 'peerfs_content')))}.")
    if extra:
        md.append("")
        md += [f"- {e}" for e in extra]
    if bench.reports_sync is False:
        md.append("")
        md.append("This build reports no `sync` state per peer: \"in sync\" was taken as "
                  "connected with both queues empty.")
    if bench.reports_scan is False:
        md.append("")
        md.append("This build reports no `reconcile.scan`.")
    for n in bench.notes + bench.failures:
        md.append("")
        md.append(f"**{n}**" if n in bench.failures else n)
    if pressure is not None:
        md.append("")
        md.append(f"CPU pressure (/proc/pressure/cpu \"some\") over the run: {pressure:.0%}.")
    for n in args.note:
        md.append("")
        md.append(n)
    md.append("")
    md.append("<details><summary>every sample, in repetition order</summary>")
    md.append("")
    md.append("| case | sample | values |")
    md.append("|---|---|---|")
    for case, keys in s.items():
        for key, values in keys.items():
            if key.startswith("scan"):
                text = " ".join(json.dumps(v, separators=(",", ":")) for v in values)
            elif key.endswith("_s"):
                text = " ".join(fmt_s(v) for v in values)
            else:
                text = " ".join(fmt_int(v) for v in values)
            md.append(f"| {case} | {key} | {text} |")
    md.append("")
    md.append("</details>")
    print("\n".join(md))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(md) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"samples": s, "notes": bench.notes, "failures": bench.failures,
                       "cpu_pressure": pressure}, f, indent=1)


def cmd_measure(args):
    bench = Bench(args)
    p0, t0 = cpu_pressure_total(), time.time()
    try:
        if "initial" in args.cases:
            bench.initial()
        if "reconnect" in args.cases:
            bench.reconnect()
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    p1, t1 = cpu_pressure_total(), time.time()
    pressure = None if p0 is None or p1 is None else (p1 - p0) / 1e6 / (t1 - t0)
    progress(f"measured in {t1 - t0:.0f} s")
    report(bench, pressure)
    if bench.failures:
        for f in bench.failures:
            print(f"bench: error: {f}", file=sys.stderr)
        return 1
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ports")
    p.add_argument("n", type=int)
    p.set_defaults(func=cmd_ports)
    p = sub.add_parser("measure")
    p.add_argument("--peerfs", required=True, help="the peerfs binary")
    p.add_argument("--dir", required=True, help="the benchmark directory")
    p.add_argument("--rsync-url", required=True, help="rsync://HOST:PORT/MODULE/")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--files", type=int, default=10_000, help="files of the initial sync")
    p.add_argument("--tree-dirs", type=int, default=100,
                   help="folders of 100 files in the reconnection tree")
    p.add_argument("--flat", action="store_true",
                   help="the reconnection tree's files all in one folder")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--log-level", default="info")
    p.add_argument("--cases", nargs="+", default=["initial", "reconnect"],
                   choices=["initial", "reconnect"])
    p.add_argument("--command", default="bench/reconcile.sh")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--markdown", help="also write the markdown report here")
    p.add_argument("--json", help="write every sample here")
    p.add_argument("--rsync-fsync", action="store_true",
                   help="(1) also times `rsync -a --fsync` into a second folder")
    p.set_defaults(func=cmd_measure)
    args = ap.parse_args()
    if args.cmd == "measure" and (args.reps < 1 or args.files < FILES_PER_DIR
                                  or args.files % FILES_PER_DIR or args.tree_dirs < 1):
        ap.error("--reps ≥ 1, --files a multiple of 100, --tree-dirs ≥ 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
