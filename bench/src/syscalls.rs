//! System calls per message, per process, during a flood (`--count-syscalls`): a system-wide
//! `perf stat --per-thread` over the flood, each thread's counts added to its process's.
//!
//! On loopback a `sendto` also runs the receiving side's TCP processing, so the number of
//! reads and writes a message costs each process (how many messages share a segment) is much
//! of what its CPU per message is. Needs `perf` and the permission to trace system-wide (root,
//! or `kernel.perf_event_paranoid` ≤ -1); the counts are exact, the tracing's own cost lands on
//! every process alike.

use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The system calls counted: every one, then those that move a message's bytes or wait for
/// sockets.
const EVENTS: [(&str, &str); 8] = [
    ("all", "raw_syscalls:sys_enter"),
    ("sendto", "syscalls:sys_enter_sendto"),
    ("recvfrom", "syscalls:sys_enter_recvfrom"),
    ("write", "syscalls:sys_enter_write"),
    ("writev", "syscalls:sys_enter_writev"),
    ("read", "syscalls:sys_enter_read"),
    ("epoll_wait", "syscalls:sys_enter_epoll_wait"),
    ("futex", "syscalls:sys_enter_futex"),
];

/// A running `perf stat`.
pub struct SyscallCount {
    child: Child,
    out: PathBuf,
}

/// Per process label: (system call, calls per message).
pub type PerMessage = Vec<(String, Vec<(String, f64)>)>;

impl SyscallCount {
    /// Starts counting, writing to `out`.
    pub async fn start(out: &Path) -> anyhow::Result<SyscallCount> {
        let events: Vec<&str> = EVENTS.iter().map(|(_, e)| *e).collect();
        let child = Command::new("perf")
            .args(["stat", "-x,", "--per-thread", "-a", "-e"])
            .arg(events.join(","))
            .arg("-o")
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("--count-syscalls needs `perf` on the PATH")?;
        // perf opens its counters on every CPU before it counts anything.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        Ok(SyscallCount {
            child,
            out: out.to_owned(),
        })
    }

    /// Stops counting; the calls per message of each process `label_of` names (by pid),
    /// divided by `messages`. Threads that ended meanwhile cannot be placed and are left out.
    pub fn finish(
        mut self,
        label_of: &dyn Fn(u32) -> Option<String>,
        messages: u64,
    ) -> anyhow::Result<PerMessage> {
        crate::procs::signal(self.child.id(), libc::SIGINT);
        self.child.wait()?;
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        let mut sums: BTreeMap<String, BTreeMap<&str, u64>> = BTreeMap::new();
        let mut tgids: BTreeMap<u32, Option<u32>> = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            // comm-tid,count,unit,event,…
            let f: Vec<&str> = line.split(',').collect();
            let (Some(thread), Some(count), Some(event)) = (f.first(), f.get(1), f.get(3)) else {
                continue;
            };
            let (Some(tid), Ok(count)) = (
                thread
                    .rsplit_once('-')
                    .and_then(|(_, t)| t.parse::<u32>().ok()),
                count.parse::<u64>(),
            ) else {
                continue;
            };
            let Some(name) = EVENTS.iter().find(|(_, e)| e == event).map(|(n, _)| *n) else {
                continue;
            };
            let tgid = *tgids.entry(tid).or_insert_with(|| tgid_of(tid));
            if let Some(label) = tgid.and_then(label_of) {
                *sums.entry(label).or_default().entry(name).or_default() += count;
            }
        }
        let per = |n: u64| n as f64 / messages.max(1) as f64;
        Ok(sums
            .into_iter()
            .map(|(label, counts)| {
                let calls = EVENTS
                    .iter()
                    .filter_map(|(n, _)| counts.get(n).map(|c| ((*n).to_owned(), per(*c))))
                    .collect();
                (label, calls)
            })
            .collect())
    }
}

/// The process a thread belongs to (`Tgid:` of `/proc/{tid}/status`); `None` once it ended.
fn tgid_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `comm` of a process.
pub fn comm_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned())
}
