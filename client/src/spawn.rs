//! `--spawn-server`: the server binary as a child on loopback, so that one
//! command shows the whole story. Its output goes to server.log in the
//! results directory; it is stopped with SIGTERM (it drains) at the end.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SpawnedServer {
    child: Child,
    log: PathBuf,
}

/// The server binary beside this one (target/<profile>/server).
pub fn default_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let server = me.with_file_name("server");
    if server.exists() {
        Ok(server)
    } else {
        Err(format!(
            "--spawn-server: no server binary at {}; build it (cargo build --release) or pass --server-bin",
            server.display()
        ))
    }
}

/// `--timeout` among the pass-through flags, so the client knows what the
/// server was started with.
pub fn timeout_in(flags: &[String]) -> Option<String> {
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        if let Some(v) = f.strip_prefix("--timeout=") {
            return Some(v.to_string());
        }
        if f == "--timeout" {
            return it.next().cloned();
        }
    }
    None
}

impl SpawnedServer {
    /// Starts `bin --listen addr <flags>` and waits until it accepts.
    pub fn start(
        bin: &Path,
        addr: SocketAddr,
        flags: &[String],
        dir: &Path,
    ) -> Result<SpawnedServer, String> {
        let log = dir.join("server.log");
        let out = File::create(&log).map_err(|e| format!("cannot write {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot write {}: {e}", log.display()))?;
        let mut child = Command::new(bin)
            .arg("--listen")
            .arg(addr.to_string())
            .args(flags)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "the spawned server exited ({status}) before accepting: {}",
                    tail.lines().last().unwrap_or("(no output)")
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(SpawnedServer { child, log });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the spawned server did not accept on {addr} within 10 s; see {}",
                    log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait up to `grace` for it to drain and exit (SIGKILL
    /// after). Returns how it ended and its last `final` line, if any.
    pub fn stop(mut self, grace: Duration) -> (String, Option<String>) {
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break format!("killed: no exit within {grace:?} of SIGTERM");
                }
            }
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last = log
            .lines()
            .rev()
            .find(|l| l.contains("final"))
            .map(str::to_string);
        (status, last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_timeout_among_server_flags() {
        let f = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            timeout_in(&f("--tick 100ms --timeout 5s")),
            Some("5s".into())
        );
        assert_eq!(timeout_in(&f("--timeout=2m")), Some("2m".into()));
        assert_eq!(timeout_in(&f("--echo")), None);
    }
}
