//! Model-based test of reconciliation (issue 9) over REAL peers: proptest generates a
//! sequence of steps — writes, deletes and renames of a few file names, folders, and peers
//! stopping and starting — run on three real drives; at the end every peer runs, their backing
//! trees must become equal, and **nothing may be lost**: every version a peer wrote that no
//! later write, delete or rename-over *based on that version* replaced must still exist
//! somewhere in the final tree (at its name or as a conflict copy). Every file content is a
//! unique token, so versions are found by content wherever reconciliation put them.
//!
//! "Based on": before each operation the test reads, through the acting peer's drive, what that
//! peer has at the names the operation touches. After each step the running peers (which are
//! always all connected to each other) are left to settle — no lock held, backing trees equal —
//! so what a peer read is what it acted on; concurrency comes only from peers that were stopped
//! while the others acted, which is what reconciliation has to merge.
//!
//! Running it longer (outside the default test command):
//!
//! ```sh
//! PEERFS_MODEL_CASES=200 PEERFS_MODEL_ROUNDS=8 PEERFS_MODEL_SHRINK_SECS=1800 \
//!     cargo test -p peerfs-tests --test reconcile_model -- --nocapture
//! ```
//!
//! - `PEERFS_MODEL_CASES` (default 3): how many sequences are generated;
//! - `PEERFS_MODEL_ROUNDS` (default 4): at most this many rounds per sequence (a round stops
//!   and starts peers, then runs 1 to 3 operations on the running ones: at most 12 operations
//!   by default);
//! - `PEERFS_MODEL_SHRINK_ITERS` (default 16) and `PEERFS_MODEL_SHRINK_SECS` (default 60)
//!   bound the shrinking of a failure (each failing run can cost a convergence timeout, so give
//!   shrinking more time on a long run);
//! - `PEERFS_MODEL_SEED` replays the run that printed that seed.
//!
//! A failure prints the minimal step list as Rust: paste it into a `regression_...` test at
//! the end of this file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::time::Duration;

use peerfs_tests::Kind;
use peerfs_tests::peers::{Peers, PeersOptions, Tree};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

const PEERS: usize = 3;
/// Top-level files `f0.txt`..`f3.txt`, then `d0/g.txt`, `d1/g.txt` (which exist only once
/// their folder was made).
const TOP_FILES: usize = 4;
const DIRS: usize = 2;
const SLOTS: usize = TOP_FILES + DIRS;

/// Bound for the running peers to settle after one step.
const SETTLE: Duration = Duration::from_secs(30);
/// Bound for every peer to converge at the end.
const CONVERGE: Duration = Duration::from_secs(90);

/// One step as run. `peer` is an index (0..3); a step of a peer that is not running (or a
/// Start of one that is, a Stop of one that is not) is skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Writes a new unique token to the slot (create or truncate + write + close), making the
    /// slot's folder first if the peer has none.
    Write {
        peer: usize,
        slot: usize,
    },
    Delete {
        peer: usize,
        slot: usize,
    },
    Rename {
        peer: usize,
        from: usize,
        to: usize,
    },
    Mkdir {
        peer: usize,
        dir: usize,
    },
    Stop {
        peer: usize,
    },
    Start {
        peer: usize,
    },
}

use Step::*;

fn slot_path(slot: usize) -> String {
    if slot < TOP_FILES {
        format!("f{slot}.txt")
    } else {
        format!("d{}/g.txt", slot - TOP_FILES)
    }
}

/// An operation of a generated round; `who` picks one of the round's running peers.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write { who: usize, slot: usize },
    Delete { who: usize, slot: usize },
    Rename { who: usize, from: usize, to: usize },
    Mkdir { who: usize, dir: usize },
}

/// What proptest generates: rounds, each first stopping and starting peers so that exactly
/// the peers of `up` (a non-empty bit set) run, then running a few operations on them. Plain
/// random Stop/Start steps almost never make two groups of peers edit apart (about 1 case in
/// 100 did); rounds do in about half the cases. They are flattened into [`Step`]s to run.
#[derive(Clone, Debug)]
struct Round {
    up: u8,
    ops: Vec<Op>,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let who = 0..PEERS;
    prop_oneof![
        7 => (who.clone(), 0..SLOTS).prop_map(|(who, slot)| Op::Write { who, slot }),
        2 => (who.clone(), 0..SLOTS).prop_map(|(who, slot)| Op::Delete { who, slot }),
        2 => (who.clone(), 0..SLOTS, 1..SLOTS).prop_map(|(who, from, d)| Op::Rename {
            who,
            from,
            to: (from + d) % SLOTS,
        }),
        1 => (who, 0..DIRS).prop_map(|(who, dir)| Op::Mkdir { who, dir }),
    ]
}

fn rounds_strategy(max_rounds: usize) -> impl Strategy<Value = Vec<Round>> {
    let round = (
        1u8..(1 << PEERS),
        prop::collection::vec(op_strategy(), 1..=3),
    )
        .prop_map(|(up, ops)| Round { up, ops });
    prop::collection::vec(round, 2.min(max_rounds)..=max_rounds)
}

/// The steps that run `rounds`, starting with every peer running.
fn flatten(rounds: &[Round]) -> Vec<Step> {
    let mut running = [true; PEERS];
    let mut steps = Vec::new();
    for r in rounds {
        let want: Vec<bool> = (0..PEERS).map(|i| r.up & (1 << i) != 0).collect();
        for peer in 0..PEERS {
            if running[peer] && !want[peer] {
                steps.push(Stop { peer });
                running[peer] = false;
            }
        }
        for peer in 0..PEERS {
            if !running[peer] && want[peer] {
                steps.push(Start { peer });
                running[peer] = true;
            }
        }
        let up: Vec<usize> = (0..PEERS).filter(|&i| running[i]).collect();
        let pick = |who: usize| up[who % up.len()];
        for op in &r.ops {
            steps.push(match *op {
                Op::Write { who, slot } => Write {
                    peer: pick(who),
                    slot,
                },
                Op::Delete { who, slot } => Delete {
                    peer: pick(who),
                    slot,
                },
                Op::Rename { who, from, to } => Rename {
                    peer: pick(who),
                    from,
                    to,
                },
                Op::Mkdir { who, dir } => Mkdir {
                    peer: pick(who),
                    dir,
                },
            });
        }
    }
    steps
}

/// A version some peer wrote: its unique content, and the step whose operation, based on it,
/// replaced it (if any).
struct Version {
    token: Vec<u8>,
    made: String,
    replaced_by: Option<String>,
}

/// What the test knows while it runs a sequence.
#[derive(Default)]
struct Model {
    versions: Vec<Version>,
    /// Index in `versions` by token.
    by_token: BTreeMap<Vec<u8>, usize>,
    /// One line per step: what was done, what the peer saw before, what happened.
    log: Vec<String>,
}

impl Model {
    /// The operation described by `by` was based on `seen` (what the peer had there): that
    /// version is replaced.
    fn replaced(&mut self, seen: &Option<Vec<u8>>, by: &str) {
        if let Some(v) = seen.as_ref().and_then(|c| self.by_token.get(c)) {
            let v = &mut self.versions[*v];
            if v.replaced_by.is_none() {
                v.replaced_by = Some(by.to_string());
            }
        }
    }

    fn new_version(&mut self, token: Vec<u8>, made: String) {
        self.by_token.insert(token.clone(), self.versions.len());
        self.versions.push(Version {
            token,
            made,
            replaced_by: None,
        });
    }

    fn show(&self, seen: &Option<Vec<u8>>) -> String {
        match seen {
            None => "nothing".into(),
            Some(c) => format!("{:?}", String::from_utf8_lossy(c)),
        }
    }
}

/// What peer `i`'s drive has at `path`: `None` if nothing (or not a readable file).
fn look(p: &Peers, i: usize, path: &str) -> Option<Vec<u8>> {
    fs::read(p.file(i, path)).ok()
}

/// Waits until no running peer holds or knows a lock and the running peers' backing trees
/// are equal.
fn settle(p: &Peers) -> Result<(), String> {
    let running = p.running();
    if running.is_empty() {
        return Ok(());
    }
    peerfs_tests::peers::poll_until("no running peer lists a lock", SETTLE, || {
        for &i in &running {
            let locks = p.try_locks(i)?;
            if !locks.is_empty() {
                return Err(format!("{} lists {locks:?}", p.name(i)));
            }
        }
        Ok(())
    })?;
    p.poll_trees_equal(&running, SETTLE).map(|_| ())
}

/// Runs `steps` on three fresh peers and checks convergence and that nothing was lost.
fn run_model(steps: &[Step]) -> Result<(), String> {
    let mut p = Peers::start_with(PEERS, PeersOptions::default());
    let mut m = Model::default();
    let result = run_steps(&mut p, &mut m, steps);
    result.map_err(|e| format!("{e}\nsteps done:\n  {}", m.log.join("\n  ")))
}

fn run_steps(p: &mut Peers, m: &mut Model, steps: &[Step]) -> Result<(), String> {
    for (k, &step) in steps.iter().enumerate() {
        let acted = run_step(p, m, k, step)?;
        if acted {
            settle(p).map_err(|e| format!("after step {k} ({step:?}), {e}"))?;
        }
    }
    // Every peer runs again and they all converge.
    for i in 0..PEERS {
        if !p.is_running(i) {
            p.launch(i);
            m.log.push(format!("end: started {}", p.name(i)));
        }
    }
    p.poll_connected(CONVERGE)
        .map_err(|e| format!("at the end, {e}\n{}", p.logs()))?;
    let all: Vec<usize> = (0..PEERS).collect();
    let tree = p
        .poll_trees_equal(&all, CONVERGE)
        .map_err(|e| format!("at the end, {e}"))?;
    check_nothing_lost(m, &tree)?;
    let skipped = m.log.iter().filter(|l| l.ends_with("skipped")).count();
    let kept = m
        .versions
        .iter()
        .filter(|v| v.replaced_by.is_none())
        .count();
    let copies = tree.keys().filter(|k| k.contains("(conflict")).count();
    eprintln!(
        "reconcile model: case passed: {} steps ({skipped} skipped), {} versions written, {kept} \
         kept, {copies} conflict copies, {} names at the end",
        steps.len(),
        m.versions.len(),
        tree.len()
    );
    Ok(())
}

/// Runs one step; false if it was skipped (its peer not in the state it needs).
fn run_step(p: &mut Peers, m: &mut Model, k: usize, step: Step) -> Result<bool, String> {
    let running = |p: &Peers, i: usize| p.is_running(i);
    match step {
        Write { peer, slot } if running(p, peer) => {
            let path = slot_path(slot);
            let seen = look(p, peer, &path);
            let token = format!("token of step {k}: {path} written on {}\n", p.name(peer));
            let what = format!("step {k}: {} writes {path}", p.name(peer));
            if let Some((dir, _)) = path.split_once('/') {
                // Writing into a folder makes it first if this peer has none.
                match fs::create_dir(p.file(peer, dir)) {
                    Ok(()) => m
                        .log
                        .push(format!("step {k}: {} makes {dir}", p.name(peer))),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => m.log.push(format!("{what}: mkdir {dir} failed ({e})")),
                }
            }
            match OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p.file(peer, &path))
            {
                Ok(mut f) => {
                    // Open with O_TRUNC already replaced what the peer had there.
                    m.replaced(&seen, &what);
                    f.write_all(token.as_bytes())
                        .map_err(|e| format!("{what}: write after a successful open: {e}"))?;
                    drop(f);
                    m.log.push(format!("{what} (it had {})", m.show(&seen)));
                    m.new_version(token.into_bytes(), what);
                }
                Err(e) => m.log.push(format!(
                    "{what}: open failed ({e}); it had {}",
                    m.show(&seen)
                )),
            }
            Ok(true)
        }
        Delete { peer, slot } if running(p, peer) => {
            let path = slot_path(slot);
            let seen = look(p, peer, &path);
            let what = format!("step {k}: {} deletes {path}", p.name(peer));
            match fs::remove_file(p.file(peer, &path)) {
                Ok(()) => {
                    m.replaced(&seen, &what);
                    m.log.push(format!("{what} (it had {})", m.show(&seen)));
                }
                Err(e) => m.log.push(format!("{what}: failed ({e})")),
            }
            Ok(true)
        }
        Rename { peer, from, to } if running(p, peer) => {
            let (src, dst) = (slot_path(from), slot_path(to));
            let seen_src = look(p, peer, &src);
            let seen_dst = look(p, peer, &dst);
            let what = format!("step {k}: {} renames {src} to {dst}", p.name(peer));
            match fs::rename(p.file(peer, &src), p.file(peer, &dst)) {
                Ok(()) => {
                    // The moved version lives on under the new name; what was there is gone.
                    m.replaced(&seen_dst, &what);
                    m.log.push(format!(
                        "{what} ({src} had {}, {dst} had {})",
                        m.show(&seen_src),
                        m.show(&seen_dst)
                    ));
                }
                Err(e) => m.log.push(format!("{what}: failed ({e})")),
            }
            Ok(true)
        }
        Mkdir { peer, dir } if running(p, peer) => {
            let what = format!("step {k}: {} makes d{dir}", p.name(peer));
            match fs::create_dir(p.file(peer, &format!("d{dir}"))) {
                Ok(()) => m.log.push(what),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    m.log.push(format!("{what}: exists"));
                }
                Err(e) => m.log.push(format!("{what}: failed ({e})")),
            }
            Ok(true)
        }
        Stop { peer } if running(p, peer) => {
            p.stop(peer);
            m.log.push(format!("step {k}: {} stops", p.name(peer)));
            Ok(true)
        }
        Start { peer } if !running(p, peer) => {
            p.launch(peer);
            m.log.push(format!("step {k}: {} starts", p.name(peer)));
            p.poll_connected(SETTLE)
                .map_err(|e| format!("after step {k} ({step:?}), {e}\n{}", p.logs()))?;
            Ok(true)
        }
        _ => {
            m.log.push(format!("step {k}: {step:?} skipped"));
            Ok(false)
        }
    }
}

/// Every version not replaced by an operation based on it is the content of some file in
/// `tree`; every file in `tree` holds some version (nothing garbled or invented).
fn check_nothing_lost(m: &Model, tree: &Tree) -> Result<(), String> {
    let mut where_is: BTreeMap<&[u8], Vec<&str>> = BTreeMap::new();
    let mut problems = Vec::new();
    for (path, e) in tree {
        if e.kind != Kind::File {
            continue;
        }
        if !m.by_token.contains_key(&e.data) {
            problems.push(format!(
                "{path} holds content no peer wrote: {:?}",
                String::from_utf8_lossy(&e.data)
            ));
        }
        where_is.entry(&e.data).or_default().push(path);
    }
    for v in &m.versions {
        if v.replaced_by.is_none() && !where_is.contains_key(v.token.as_slice()) {
            problems.push(format!(
                "LOST: the version from \"{}\" ({:?}) was replaced by nothing based on it, \
                 but no file holds it",
                v.made,
                String::from_utf8_lossy(&v.token)
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let names: BTreeSet<String> = tree
        .iter()
        .map(|(k, e)| match e.kind {
            Kind::File => format!("{k} = {:?}", String::from_utf8_lossy(&e.data)),
            _ => format!("{k} ({:?})", e.kind),
        })
        .collect();
    Err(format!(
        "{}\nfinal tree (all peers equal):\n  {}\nversions:\n  {}",
        problems.join("\n"),
        names.into_iter().collect::<Vec<_>>().join("\n  "),
        m.versions
            .iter()
            .map(|v| format!(
                "{} -> {}",
                v.made,
                v.replaced_by.as_deref().unwrap_or("kept")
            ))
            .collect::<Vec<_>>()
            .join("\n  ")
    ))
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn nothing_is_lost_and_all_peers_converge() {
    let cases = env_u64("PEERFS_MODEL_CASES", 3) as u32;
    let max_rounds = env_u64("PEERFS_MODEL_ROUNDS", 4).max(1) as usize;
    let seed = env_u64(
        "PEERFS_MODEL_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    eprintln!(
        "reconcile model: {cases} cases of at most {max_rounds} rounds (of 1-3 operations); \
         replay with PEERFS_MODEL_SEED={seed}"
    );
    let config = Config {
        cases,
        max_shrink_iters: env_u64("PEERFS_MODEL_SHRINK_ITERS", 16) as u32,
        max_shrink_time: (env_u64("PEERFS_MODEL_SHRINK_SECS", 60) * 1000) as u32,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&rounds_strategy(max_rounds), |rounds| {
        run_model(&flatten(&rounds)).map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, rounds)) => panic!(
            "reconcile model failed (PEERFS_MODEL_SEED={seed}); minimal steps found:\n\
             {}\n{reason}",
            rust_steps(&flatten(&rounds))
        ),
        Err(e) => panic!("reconcile model: {e}"),
    }
}

/// `steps` as Rust source for a regression test.
fn rust_steps(steps: &[Step]) -> String {
    let mut s = String::from("run_regression(&[\n");
    for st in steps {
        s.push_str(&format!("    {st:?},\n"));
    }
    s.push_str("]);");
    s
}

#[track_caller]
fn run_regression(steps: &[Step]) {
    if let Err(e) = run_model(steps) {
        panic!("{}\n{e}", rust_steps(steps));
    }
}

/// Hand-written (not shrunk): the simplest partition. peer-a writes f0 while peer-b is
/// stopped, then peer-b, back alone, writes f0 too: both versions are concurrent and both
/// must survive once all three peers run again.
#[test]
fn scenario_concurrent_writes_across_a_stop() {
    run_regression(&[
        Write { peer: 0, slot: 0 },
        Stop { peer: 1 },
        Write { peer: 0, slot: 0 },
        Stop { peer: 0 },
        Stop { peer: 2 },
        Start { peer: 1 },
        Write { peer: 1, slot: 0 },
        Start { peer: 0 },
    ]);
}

/// Shrunk by the model on main before reconciliation landed (PEERFS_MODEL_SEED=
/// 1795637666008101435): peer-a, alone, makes f3 (by renaming f0 onto it); peer-b and peer-c,
/// without peer-a, make another f3 and rename it to f1. When peer-a returns, the trees never
/// converged (peer-a ended with its token in f1 and peer-b's as a conflict copy of f3, the
/// others the other way round).
#[test]
fn regression_concurrent_creates_of_one_name_one_renamed_away() {
    run_regression(&[
        Stop { peer: 1 },
        Stop { peer: 2 },
        Write { peer: 0, slot: 0 },
        Write { peer: 0, slot: 0 },
        Rename {
            peer: 0,
            from: 0,
            to: 3,
        },
        Stop { peer: 0 },
        Start { peer: 1 },
        Start { peer: 2 },
        Write { peer: 1, slot: 3 },
        Rename {
            peer: 1,
            from: 3,
            to: 1,
        },
    ]);
}

/// Shrunk by the model against the merged implementation (b3e9534, PEERFS_MODEL_SEED=
/// 1795638208916476716): while peer-a and peer-b are stopped, peer-c makes d1/g.txt, renames
/// it to f0.txt, writes f0.txt again and writes f2.txt. When they return, peer-a and peer-b never
/// get f0.txt or f2.txt: peer-a logs "a rename from a peer keeps the version changed here
/// meanwhile from=d1/g.txt to=f0.txt" about every 10 ms, and its queue goes no further.
#[test]
fn regression_made_renamed_and_rewritten_while_two_peers_were_away() {
    run_regression(&[
        Stop { peer: 0 },
        Stop { peer: 1 },
        Write { peer: 2, slot: 5 },
        Rename {
            peer: 2,
            from: 5,
            to: 0,
        },
        Write { peer: 2, slot: 0 },
        Write { peer: 2, slot: 2 },
        Rename {
            peer: 2,
            from: 4,
            to: 5,
        },
    ]);
}

/// The same failure reduced by hand: peer-b is stopped while peer-c makes f1.txt, renames it
/// to f0.txt and writes f0.txt again (peer-a runs and follows); peer-b, back, never converges.
/// Without the last write (or with only the create and rename) it passes.
#[test]
fn regression_made_renamed_and_rewritten_while_a_peer_was_away() {
    run_regression(&[
        Stop { peer: 1 },
        Write { peer: 2, slot: 1 },
        Rename {
            peer: 2,
            from: 1,
            to: 0,
        },
        Write { peer: 2, slot: 0 },
    ]);
}

/// Shrunk by the model against b3e9534 (PEERFS_MODEL_SEED=1795640560430610120): peer-b, alone,
/// makes d1/g.txt; then peer-a, alone, makes d1/g.txt too (the failed rename is noise the
/// shrink left). When peer-b and peer-c return together, the trees sometimes never converge:
/// one peer keeps the other version in d1/g.txt (the conflict copy is the same everywhere).
/// Timing-dependent: it failed about 1 run in 3 here.
#[test]
fn regression_concurrent_creations_in_a_new_folder_with_three_peers() {
    run_regression(&[
        Stop { peer: 0 },
        Stop { peer: 2 },
        Write { peer: 1, slot: 5 },
        Stop { peer: 1 },
        Start { peer: 0 },
        Write { peer: 0, slot: 5 },
        Rename {
            peer: 0,
            from: 3,
            to: 4,
        },
    ]);
}

/// The same failure reduced by hand to a top-level name (about 1 run in 4 here): peer-a and
/// peer-b ended with peer-a's version in f1.txt, peer-c with peer-b's.
#[test]
fn regression_concurrent_creations_with_three_peers() {
    run_regression(&[
        Stop { peer: 0 },
        Stop { peer: 2 },
        Write { peer: 1, slot: 1 },
        Stop { peer: 1 },
        Start { peer: 0 },
        Write { peer: 0, slot: 1 },
    ]);
}

/// Shrunk by the model at a094ddf (PEERFS_MODEL_SEED=1795677221957036421): peer-b writes
/// d0/g.txt while peer-a is stopped (peer-c gets it); then peer-a, alone, writes d0/g.txt and
/// deletes it. When all three run again, the edit must survive the concurrent deletion. It
/// ended with peer-b's version on peer-a only: peer-b and peer-c moved theirs to the trash "by
/// peer-a". The removal was held back on peer-a (its lock lingered), peer-b's version arrived
/// at the name meanwhile, and the removal, sent when the hold ended, tombed that version.
/// Failed every run at af8476f and at a094ddf.
#[test]
fn regression_a_deletion_meets_a_concurrent_creation_of_the_name() {
    run_regression(&[
        Stop { peer: 0 },
        Rename {
            peer: 1,
            from: 4,
            to: 3,
        },
        Write { peer: 1, slot: 4 },
        Stop { peer: 1 },
        Stop { peer: 2 },
        Start { peer: 0 },
        Write { peer: 0, slot: 4 },
        Delete { peer: 0, slot: 4 },
    ]);
}
