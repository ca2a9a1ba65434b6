//! --procs: workers add up, restart and stop together, and the parent
//! serves one admin port for all of them.

mod support;

use std::time::{Duration, Instant};

use support::*;

fn procs_workers_add_up_restart_and_stop_together() {
    let server = Server::start(&["--procs", "3", "--drain-timeout", "1s"]);
    let workers = workers_of(&server, 3);
    let _held: Vec<_> = (0..30).map(|i| server.ws(&format!("p{i}"))).collect();
    // One line for the whole server: its conns are the sum of the workers'.
    let line = server.wait_line("30 conns", |l| l.contains(" conns=30 "));
    let list = line
        .split("workers=[")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    let per: Vec<u64> = list.split(',').map(|n| n.parse().unwrap()).collect();
    assert_eq!((per.len(), per.iter().sum::<u64>()), (3, 30), "{line}");
    assert_eq!(field(&line, "upgraded"), 30);

    // A worker that dies is replaced; its devices are gone, its counts stay.
    // SAFETY: kill on a grandchild this test started.
    unsafe { libc::kill(workers[0] as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let replaced = loop {
        let now = children(server.child.id());
        if now.len() == 3 && !now.contains(&workers[0]) {
            break now;
        }
        assert!(Instant::now() < deadline, "worker not restarted: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let line = server.wait_line("after the restart", |l| l.contains("workers=[0,"));
    assert_eq!(field(&line, "upgraded"), 30, "{line}");

    // SIGTERM reaches every worker; all exit, then the parent, with 0.
    server.signal(libc::SIGTERM);
    let fin = server.wait_line("the final line", |l| l.starts_with("final "));
    assert_eq!(field(&fin, "upgraded"), 30, "{fin}");
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
    for pid in workers.iter().chain(&replaced) {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} outlived the server"
        );
    }
}

fn procs_admin_is_served_once_by_the_parent_for_all_workers() {
    let admin = free_addr();
    let server = Server::start(&["--procs", "2", "--admin", &admin]);
    // Workers never open the admin port: the parent strips the flag.
    let workers = workers_of(&server, 2);
    for w in &workers {
        let cmdline = std::fs::read(format!("/proc/{w}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains("--admin"), "{cmdline}");
    }
    let _held: Vec<_> = (0..8).map(|i| server.ws(&format!("pw{i}"))).collect();
    let line = server.wait_line("8 conns", |l| l.contains(" conns=8 "));
    let s = scrape_until(&admin, "8 devices", |s| {
        metric(s, "c1m_connections", &[]) == 8.0
    });
    let per: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == "c1m_connections")
        .map(|x| x.labels.get("worker").expect("worker label").to_string())
        .collect();
    assert_eq!(per.len(), 2, "{per:?}");
    assert!(metric(&s, "c1m_accepted_total", &[]) >= 8.0);
    assert_eq!(
        metric(&s, "c1m_upgraded_total", &[]),
        field(&line, "upgraded") as f64
    );
    assert_eq!(http(&admin, "GET", "/healthz").0, 200);
}

on_both_backends!(
    procs_workers_add_up_restart_and_stop_together,
    procs_admin_is_served_once_by_the_parent_for_all_workers,
);
