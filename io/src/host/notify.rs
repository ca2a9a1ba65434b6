//! systemd's readiness protocol (sd_notify, without libsystemd): one
//! datagram to the socket named by `NOTIFY_SOCKET`, which systemd sets for a
//! `Type=notify` unit. The server says `READY=1` once it listens, and a hot
//! upgrade's new process says `MAINPID=<its pid>` before the old one exits,
//! so that systemd follows the upgrade instead of stopping the unit
//! (`NotifyAccess=all`: the new process is the old one's child).
//! Outside systemd (no `NOTIFY_SOCKET`) nothing is sent; a `--procs`
//! worker never speaks for the service (its supervisor does).

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where systemd listens, from `NOTIFY_SOCKET`: a path, or an abstract
/// name when it starts with `@`. None outside systemd and in `--procs`
/// workers.
fn target() -> Option<String> {
    if std::env::var_os("C1M_WORKER").is_some() {
        return None;
    }
    std::env::var("NOTIFY_SOCKET")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Sends `state` (lines such as `READY=1`) to systemd. Ok(false) outside
/// systemd; an error if the socket cannot be reached (said once by the
/// caller: the service keeps running, only systemd's view lags).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(to) = target() else {
        return Ok(false);
    };
    let addr = match to.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None => SocketAddr::from_pathname(&to)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// `READY=1`, or with `main_pid`, `MAINPID=<pid>` too (the hot upgrade's
/// new process, which takes the service over).
pub fn ready(main_pid: Option<u32>) -> io::Result<bool> {
    match main_pid {
        Some(pid) => notify(&format!("MAINPID={pid}\nREADY=1")),
        None => notify("READY=1"),
    }
}

/// [`ready`], and one sentence on standard error if systemd asked for it
/// (`NOTIFY_SOCKET`) and cannot be told.
pub fn ready_or_warn(main_pid: Option<u32>) {
    if let Err(e) = ready(main_pid) {
        let what = main_pid.map_or("READY=1".to_string(), |p| format!("MAINPID={p}"));
        eprintln!("server: cannot tell systemd {what} ({e}): NOTIFY_SOCKET is set but unreachable; a Type=notify unit may time out starting or stop when an upgraded process's parent exits");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for systemd's socket gets the datagram, at a path and at
    /// an abstract name; without NOTIFY_SOCKET nothing is sent.
    #[test]
    fn readiness_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("c1m-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        // (Tests share the environment: this test alone sets NOTIFY_SOCKET.)
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(ready(Some(4242)).unwrap());
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=4242\nREADY=1");

        let name = format!("c1m-notify-test-{}", std::process::id());
        let abs =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        assert!(ready(None).unwrap());
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!ready(None).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
