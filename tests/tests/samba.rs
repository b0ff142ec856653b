//! Real Samba in front of a peer's drive (issue 7): while peer A holds a document open for
//! writing, a Windows client of peer B's share (here `smbclient`) gets "file in use"
//! (NT_STATUS_SHARING_VIOLATION, which Samba makes of the drive's ETXTBSY) when it saves over
//! it, while reading it works; once A closes, the save goes through.
//!
//! Needs `smbd` and `smbclient` (Debian: `apt-get install samba smbclient`; CI installs them):
//! without them the test fails, saying so. The smbd here is a throwaway: its own smb.conf,
//! private, lock, state, cache and pid folders in a temp dir, a free loopback port, guest
//! access only to the one share, killed (its whole process group) when the test ends.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peerfs_tests::mount::mountinfo_lines;
use peerfs_tests::peers::{Peers, PeersOptions, free_port, poll_until};

const A: usize = 0;
const B: usize = 1;

const DOC: &str = "Quarterly report.docx";
const ORIGINAL: &[u8] = b"the original report\n";

/// Finds an executable by name on PATH or in the sbin folders (root's PATH may lack them).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[track_caller]
fn require_tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed: the Samba test needs a real smbd and smbclient. Install \
             them with `apt-get install samba smbclient` (CI's .ci/run does)"
        )
    })
}

/// A throwaway smbd sharing one folder as `[drive]` to guests on 127.0.0.1.
struct Smbd {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    out: PathBuf,
    smbclient: PathBuf,
    dir: tempfile::TempDir,
}

impl Smbd {
    fn start(share: &Path) -> Smbd {
        let smbd = require_tool("smbd");
        let smbclient = require_tool("smbclient");
        let dir = tempfile::Builder::new()
            .prefix("peerfs-samba-")
            .tempdir()
            .expect("temp dir for smbd");
        let root = dir.path().to_path_buf();
        let sub = |n: &str| {
            let p = root.join(n);
            fs::create_dir_all(&p).expect("create smbd folder");
            p.display().to_string()
        };
        let port = free_port();
        let log = root.join("smbd.log");
        let conf = root.join("smb.conf");
        let text = format!(
            "[global]\n\
             server role = standalone server\n\
             workgroup = PEERFS\n\
             netbios name = PEERFSTEST\n\
             disable netbios = yes\n\
             smb ports = {port}\n\
             bind interfaces only = yes\n\
             interfaces = lo\n\
             private dir = {private}\n\
             lock directory = {lock}\n\
             state directory = {state}\n\
             cache directory = {cache}\n\
             pid directory = {pid}\n\
             ncalrpc dir = {ncalrpc}\n\
             passdb backend = tdbsam:{private}/passdb.tdb\n\
             log file = {log}\n\
             log level = 1\n\
             map to guest = Bad User\n\
             guest account = root\n\
             load printers = no\n\
             printing = bsd\n\
             printcap name = /dev/null\n\
             disable spoolss = yes\n\
             kernel oplocks = no\n\
             store dos attributes = yes\n\
             \n\
             [drive]\n\
             path = {share}\n\
             read only = no\n\
             guest ok = yes\n\
             guest only = yes\n\
             force user = root\n\
             vfs objects =\n",
            private = sub("private"),
            lock = sub("lock"),
            state = sub("state"),
            cache = sub("cache"),
            pid = sub("pid"),
            ncalrpc = sub("ncalrpc"),
            log = log.display(),
            share = share.display(),
        );
        fs::write(&conf, text).expect("write smb.conf");
        let out = root.join("smbd.out");
        let out_f = File::create(&out).expect("smbd output file");
        let err_f = out_f.try_clone().expect("clone output file");
        let mut cmd = Command::new(&smbd);
        cmd.arg("--foreground")
            .arg("--no-process-group")
            .arg("--debug-stdout")
            .arg("-s")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out_f)
            .stderr(err_f)
            // Its own process group (smbd forks a child per client): Drop kills the group.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; smbd ends if the test thread dies without Drop.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", smbd.display()));
        let mut me = Smbd {
            child: Some(child),
            port,
            log,
            out,
            smbclient,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                me.child = None;
                panic!("smbd exited with {status} at start:\n{}", me.output());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "smbd does not listen on 127.0.0.1:{port} after 30 s:\n{}",
                me.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }

    /// smbd's output and log, for failure messages.
    fn output(&self) -> String {
        let tail = |p: &Path| {
            let t = fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(80)..].join("\n")
        };
        format!(
            "--- smbd output ---\n{}\n--- smbd log ---\n{}",
            tail(&self.out),
            tail(&self.log)
        )
    }

    /// Runs `smbclient //127.0.0.1/drive -p PORT -N -c COMMANDS` (bounded: 60 s); returns
    /// (exit code, stdout and stderr together).
    fn client(&self, commands: &str) -> (Option<i32>, String) {
        let out_path = self.dir.path().join("smbclient.out");
        let out = File::create(&out_path).expect("smbclient output file");
        let err = out.try_clone().expect("clone output file");
        let mut child = Command::new(&self.smbclient)
            .arg("//127.0.0.1/drive")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-N")
            .arg("-c")
            .arg(commands)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("run smbclient");
        let deadline = Instant::now() + Duration::from_secs(60);
        let code = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let mut text = String::new();
        let _ = File::open(&out_path).and_then(|mut f| f.read_to_string(&mut text));
        (code, text)
    }
}

impl Drop for Smbd {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = child.id() as libc::pid_t;
        // SAFETY: signalling the process group this test created for smbd (its id is smbd's
        // pid, and smbd has not been reaped yet).
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Children of smbd (one per client) may outlive it: kill whatever is left.
        // SAFETY: as above; a group with no members left makes kill fail harmlessly.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
    }
}

#[test]
fn samba_client_of_the_other_peer_gets_sharing_violation_while_a_writes() {
    let peers = Peers::start_with(2, PeersOptions::default().file(DOC, ORIGINAL));
    let b_mnt = peers.path(B).to_path_buf();
    let info = mountinfo_lines(&b_mnt);
    assert!(
        info.iter().any(|l| l.contains("allow_other")),
        "B's drive must be mounted allow_other (the default) for Samba: {info:?}"
    );
    let smbd = Smbd::start(&b_mnt);
    let work = tempfile::tempdir().expect("temp dir for local files");
    let new_version = peerfs_tests::pattern(3, 100_000);
    let local_new = work.path().join("new.docx");
    fs::write(&local_new, &new_version).expect("write the local new version");
    let local_got = work.path().join("got.docx");

    // The share works at all.
    let (code, text) = smbd.client("ls");
    assert!(
        code == Some(0) && text.contains(DOC),
        "smbclient ls on B's share failed (exit {code:?}):\n{text}\n{}",
        smbd.output()
    );

    // A holds the document open for writing through A's drive.
    let mut held = OpenOptions::new()
        .read(true)
        .write(true)
        .open(peers.file(A, DOC))
        .expect("A opens the document read-write");
    held.write_all(b"A is editing").expect("write on A");

    let put = format!("put \"{}\" \"{DOC}\"", local_new.display());
    let (code, text) = smbd.client(&put);
    assert!(
        code != Some(0) && text.contains("NT_STATUS_SHARING_VIOLATION"),
        "a Samba client saving over the document on B while A edits it must get \
         NT_STATUS_SHARING_VIOLATION; smbclient exited {code:?}:\n{text}\n{}\n{}",
        smbd.output(),
        peers.logs()
    );
    assert_eq!(
        fs::read(peers.backing_file(B, DOC)).ok().as_deref(),
        Some(ORIGINAL),
        "B's copy must be untouched by the refused save"
    );

    let get = format!("get \"{DOC}\" \"{}\"", local_got.display());
    let (code, text) = smbd.client(&get);
    assert!(
        code == Some(0),
        "a Samba client reading the document on B while A edits it must succeed; smbclient \
         exited {code:?}:\n{text}\n{}",
        smbd.output()
    );
    assert_eq!(
        fs::read(&local_got).ok().as_deref(),
        Some(ORIGINAL),
        "what the Samba client read"
    );

    let (code, text) = smbd.client(&format!("rename \"{DOC}\" \"moved.docx\""));
    assert!(
        code != Some(0) && text.contains("NT_STATUS_SHARING_VIOLATION"),
        "a Samba client renaming the document on B while A edits it must get \
         NT_STATUS_SHARING_VIOLATION; smbclient exited {code:?}:\n{text}"
    );
    assert!(
        peers.backing_file(B, DOC).exists() && !peers.backing_file(B, "moved.docx").exists(),
        "the refused rename must leave the document where it was"
    );

    // A closes: once the lock is gone everywhere, the save goes through.
    drop(held);
    peers.wait_unlocked(DOC, Duration::from_secs(15));
    let saved = poll_until(
        "the Samba client's save on B succeeds after A closed",
        Duration::from_secs(15),
        || {
            let (code, text) = smbd.client(&put);
            if code == Some(0) {
                Ok(())
            } else {
                Err(format!("exit {code:?}: {text}"))
            }
        },
    );
    if let Err(e) = saved {
        panic!("{e}\n{}\n{}", smbd.output(), peers.logs());
    }
    let got = fs::read(peers.backing_file(B, DOC)).expect("read B's backing copy");
    peerfs_tests::assert_bytes_eq(&got, &new_version, "B's backing copy after the Samba save");
    peers.wait_unlocked(DOC, Duration::from_secs(15));
}
