//! One live connection per device id: a second connection replaces the
//! first (Close 4000) on one shard, across shards, and across --procs
//! workers through the shared registry, which a restarted worker rejoins.

mod support;

use std::time::{Duration, Instant};

use tungstenite::Message;

use support::*;

/// One live connection per device id: a second upgrade with the same id
/// closes the first with 4000 "replaced", on the same shard and across
/// shards (placed by --reuseport-cpu and pinned threads), and the newer one
/// is served. A close followed by a reconnect replaces nothing.
fn a_second_connection_with_the_same_id_replaces_the_first() {
    if !two_cpus() {
        return;
    }
    let server = Server::start(&["--cores", "0-1", "--reuseport-cpu"]);
    let open_on = |cpu: usize, id: &str| {
        open_pinned(server.addr, cpu, vec![id.to_string()])
            .pop()
            .unwrap()
    };
    for (replaced, (first_cpu, second_cpu, id)) in (1..).zip([
        (0, 0, "same-shard"),
        (0, 1, "cross-0-1"),
        (1, 0, "cross-1-0"),
    ]) {
        let mut old = open_on(first_cpu, id);
        let mut new = open_on(second_cpu, id);
        match old.read() {
            Ok(Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 4000, "{id}");
                assert_eq!(frame.reason, "replaced", "{id}");
            }
            other => panic!("{id}: expected Close 4000, got {other:?}"),
        }
        server.wait_line("the takeover", |l| field(l, "replaced") == replaced);
        new.send(Message::Ping(b"still".to_vec())).unwrap();
        assert_eq!(
            new.read().unwrap(),
            Message::Pong(b"still".to_vec()),
            "{id}"
        );
        // Close, then reconnect at once: nothing to replace.
        new.close(None).unwrap();
        let _ = new.read();
        let mut again = open_on(second_cpu, id);
        again.send(Message::Ping(b"x".to_vec())).unwrap();
        assert_eq!(again.read().unwrap(), Message::Pong(b"x".to_vec()), "{id}");
        again.close(None).unwrap();
        let _ = again.read();
    }
    let l = server.wait_line("every device closed", |l| field(l, "conns") == 0);
    assert_eq!(field(&l, "replaced"), 3, "{l}");
}

/// The worker holding device `id`, as the parent's admin says (None: 404).
fn held_by(admin: &str, id: &str) -> Option<u64> {
    let (status, body) = http(admin, "GET", &format!("/devices/{id}"));
    match status {
        200 => {
            let at = body.find("\"worker\":").expect("a worker field") + 9;
            let digits: String = body[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            Some(digits.parse().expect("a worker number"))
        }
        404 => None,
        _ => panic!("GET /devices/{id}: {status} {body}"),
    }
}

/// With --procs the registry spans the worker processes: a second
/// connection with an id replaces the first whichever workers the two land
/// on (the kernel's hash of their ports places them), and the parent's
/// admin finds, pushes to and kicks devices on every worker.
fn procs_one_connection_per_id_across_workers() {
    let admin = free_addr();
    let server = Server::start(&["--procs", "2", "--admin", &admin]);
    let mut seen = std::collections::BTreeSet::new();
    let mut kept = Vec::new();
    for i in 0..16 {
        let id = format!("xp{i}");
        let mut old = server.ws(&id);
        let mut new = server.ws(&id);
        match old.read() {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(
                    (u16::from(f.code), f.reason.as_ref()),
                    (4000, "replaced"),
                    "{id}"
                )
            }
            other => panic!(
                "{id}: expected Close 4000, got {other:?}; old {:?}, new {:?}, the admin says {:?}",
                old.get_ref().local_addr(),
                new.get_ref().local_addr(),
                http(&admin, "GET", &format!("/devices/{id}"))
            ),
        }
        new.send(Message::Ping(b"p".to_vec())).unwrap();
        assert_eq!(new.read().unwrap(), Message::Pong(b"p".to_vec()), "{id}");
        let local = new.get_ref().local_addr().unwrap();
        let (status, body) = http(&admin, "GET", &format!("/devices/{id}"));
        assert_eq!(status, 200, "{id}: {body}");
        assert!(
            body.contains(&format!("\"remote\":\"{local}\"")),
            "{id}: {body}"
        );
        seen.insert(held_by(&admin, &id).unwrap());
        kept.push((id, new));
    }
    assert_eq!(seen.len(), 2, "16 devices all on one worker: {seen:?}");
    server.wait_line("16 takeovers", |l| field(l, "replaced") == 16);
    for (id, ws) in &mut kept {
        let path = format!("/devices/{id}/messages");
        let (status, body) = http_with(&admin, "POST", &path, "text/plain", b"hi");
        assert_eq!((status, body.as_str()), (200, "delivered\n"), "{id}");
        assert_eq!(ws.read().unwrap(), Message::Text("hi".into()), "{id}");
    }
    for (id, ws) in &mut kept {
        let (status, _) = http(&admin, "DELETE", &format!("/devices/{id}"));
        assert_eq!(status, 200, "{id}");
        match ws.read() {
            Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 4001, "{id}"),
            other => panic!("{id}: expected Close 4001, got {other:?}"),
        }
    }
    server.wait_line("16 kicks", |l| field(l, "kicked") == 16);
}

/// A worker killed (SIGKILL) and restarted by the parent: the devices it
/// held are swept from the shared registry, and every device on the other
/// worker is still found (its entries never depended on the dead one).
fn procs_a_restarted_worker_is_resynced() {
    let admin = free_addr();
    let server = Server::start(&["--procs", "2", "--admin", &admin]);
    let held: Vec<_> = (0..24).map(|i| server.ws(&format!("rs{i}"))).collect();
    let mut on = [Vec::new(), Vec::new()];
    for i in 0..24 {
        let id = format!("rs{i}");
        on[held_by(&admin, &id).unwrap() as usize].push(id);
    }
    assert!(!on[0].is_empty() && !on[1].is_empty(), "{on:?}");
    let pids = workers_of(&server, 2);
    let victim = pids
        .iter()
        .copied()
        .find(|p| {
            let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
            String::from_utf8_lossy(&env).contains("C1M_LINK=3,1,2")
        })
        .expect("worker 1");
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = children(server.child.id());
        if now.len() == 2 && !now.contains(&victim) {
            break;
        }
        assert!(Instant::now() < deadline, "worker 1 was not restarted");
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let survivors_found = on[0].iter().all(|id| held_by(&admin, id) == Some(0));
        let dead_gone = on[1].iter().all(|id| held_by(&admin, id).is_none());
        if survivors_found && dead_gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart: survivors found {survivors_found}, the dead worker's devices gone {dead_gone}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(held);
}

on_both_backends!(
    a_second_connection_with_the_same_id_replaces_the_first,
    procs_one_connection_per_id_across_workers,
    procs_a_restarted_worker_is_resynced,
);
