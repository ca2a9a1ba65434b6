//! Worker processes past the file-descriptor limit (`--procs N`): the parent
//! re-executes its own binary N times with its own arguments, minus the
//! ones only the parent acts on, plus each worker's share (CPUs, devices).
//! Both binaries use this; what a parent does with its workers' output
//! (aggregate stats, merge histograms), and what else it hands them
//! ([`Inherit`]), is theirs.

use std::io::{BufRead, BufReader};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;

/// The CPUs worker `i` of `procs` runs on: with at least as many workers as
/// CPUs, one CPU each, round-robin; with fewer, every `procs`-th CPU.
pub fn cpus_for(i: usize, procs: usize, cpus: &[usize]) -> Vec<usize> {
    if cpus.is_empty() {
        return Vec::new();
    }
    if procs >= cpus.len() {
        vec![cpus[i % cpus.len()]]
    } else {
        cpus.iter().copied().skip(i).step_by(procs).collect()
    }
}

/// `0,2,4`: a CPU list for `--cores`.
pub fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `args` without the options in `drop` (`(name, takes a value)`), in
/// either `--name value` or `--name=value` form.
pub fn without(args: &[String], drop: &[(&str, bool)]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let name = a.split_once('=').map_or(a.as_str(), |(n, _)| n);
        match drop.iter().find(|(d, _)| *d == name) {
            Some((_, true)) if !a.contains('=') => {
                it.next();
            }
            Some(_) => {}
            None => out.push(a.clone()),
        }
    }
    out
}

/// One line a worker printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub worker: usize,
    /// Which start of `worker` printed it (see [`spawn_generation`]): a
    /// restarted worker's late lines are not its replacement's.
    pub generation: u64,
    pub stderr: bool,
    pub text: String,
    /// The stream ended (the worker exited or closed it); `text` is empty.
    pub eof: bool,
}

/// What a worker is given besides its arguments.
#[derive(Debug, Clone, Default)]
pub struct Inherit {
    /// Environment variables set for it.
    pub env: Vec<(String, String)>,
    /// Descriptors of the parent, each placed at a fixed number in the
    /// worker (`(parent's fd, worker's fd)`): numbers below 10.
    pub place: Vec<(RawFd, RawFd)>,
    /// Descriptors of the parent kept open in the worker at their own
    /// numbers (none of them at a number in `place`).
    pub keep: Vec<RawFd>,
    /// The binary to start: this one's path when None. A parent that
    /// upgrades its workers names the path it resolved at its start, so
    /// that a worker started later runs the file now at that path (the
    /// running binary's own may be gone, "(deleted)").
    pub exe: Option<std::path::PathBuf>,
}

/// Starts this binary as worker `worker` with `args`; its stdout and stderr
/// lines arrive on `lines` (a reader thread per stream, ending at EOF).
pub fn spawn(worker: usize, args: &[String], lines: &Sender<Line>) -> Result<Child, String> {
    spawn_generation(worker, 0, args, lines, Inherit::default())
}

/// [`spawn`] for the `generation`-th start of worker `worker`, its lines so
/// tagged: a parent that restarts workers can tell a dead incarnation's
/// lines (still in its pipe or reader) from its replacement's. The worker
/// gets what `inherit` says, in its process only.
pub fn spawn_generation(
    worker: usize,
    generation: u64,
    args: &[String],
    lines: &Sender<Line>,
    inherit: Inherit,
) -> Result<Child, String> {
    let exe = match inherit.exe {
        Some(exe) => exe,
        None => std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?,
    };
    let mut cmd = Command::new(&exe);
    for (name, value) in &inherit.env {
        cmd.env(name, value);
    }
    let place = inherit.place;
    // Allocated here: the forked child below must not allocate.
    let mut moved: Vec<(RawFd, RawFd)> = place.iter().map(|&(_, at)| (-1, at)).collect();
    let keep = inherit.keep;
    // SAFETY: prctl, dup2 and fcntl in the forked child before exec touch
    // no shared state. A worker whose parent dies (even by SIGKILL) gets
    // SIGTERM and drains, rather than living on unsupervised. The placed
    // descriptors go to their numbers in this child only (the parent's
    // copies stay close-on-exec, so no other worker inherits them).
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            // Each to its place, inheritable (dup2 clears FD_CLOEXEC). First
            // out of the way (close-on-exec copies above 9), as one may
            // sit at another's number.
            for (&(fd, _), m) in place.iter().zip(moved.iter_mut()) {
                m.0 = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if m.0 < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for &(fd, at) in moved.iter() {
                if fd >= 0 && libc::dup2(fd, at) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Kept at their numbers: open across exec in this child only.
            for &fd in &keep {
                libc::fcntl(fd, libc::F_SETFD, 0);
            }
            Ok(())
        });
    }
    let mut child = cmd
        // Its index, for what it tags with it (NATS events: `worker`).
        .env("C1M_WORKER", worker.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start worker {worker} ({}): {e}", exe.display()))?;
    // Infallible: both streams were asked for as pipes just above.
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    for (stream, stderr) in [
        (Box::new(out) as Box<dyn std::io::Read + Send>, false),
        (Box::new(err), true),
    ] {
        let tx = lines.clone();
        std::thread::Builder::new()
            .name(format!(
                "worker{worker}-{}",
                if stderr { "err" } else { "out" }
            ))
            .spawn(move || {
                let send = |text: String, eof: bool| {
                    let line = Line {
                        worker,
                        generation,
                        stderr,
                        text,
                        eof,
                    };
                    tx.send(line).is_ok()
                };
                for text in BufReader::new(stream).lines().map_while(Result::ok) {
                    if !send(text, false) {
                        return;
                    }
                }
                send(String::new(), true);
            })
            .map_err(|e| format!("cannot start a reader for worker {worker}: {e}"))?;
    }
    Ok(child)
}

/// Sends `signal` to the process `pid` (ignoring one that is gone).
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid this process started.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_go_round_robin() {
        assert_eq!(cpus_for(0, 60, &[0, 1]), vec![0]);
        assert_eq!(cpus_for(59, 60, &[0, 1]), vec![1]);
        assert_eq!(cpus_for(1, 2, &[0, 1, 2, 3]), vec![1, 3]);
        assert_eq!(cpus_for(0, 3, &[4, 5, 6, 7]), vec![4, 7]);
        assert_eq!(cpu_list(&[0, 2, 4]), "0,2,4");
    }

    #[test]
    fn parent_only_options_are_dropped_in_both_forms() {
        let args: Vec<String> =
            "--listen 127.0.0.1:9 --procs 3 --cores=0-1 --join --echo --timeout 5s"
                .split(' ')
                .map(String::from)
                .collect();
        let kept = without(
            &args,
            &[("--procs", true), ("--cores", true), ("--join", false)],
        );
        assert_eq!(kept.join(" "), "--listen 127.0.0.1:9 --echo --timeout 5s");
    }
}
