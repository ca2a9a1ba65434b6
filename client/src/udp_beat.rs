//! `client --udp-heartbeat`: each device takes the ticket from its 101
//! (`C1M-Heartbeat-Ticket`) and sends its heartbeats as that datagram to
//! the server's port, keeping its WebSocket open and silent. A fleet's
//! datagrams of one pass go out together, [`c1m_io::udp::BATCH`] per
//! sendmmsg, from one UDP socket per fleet (the server does not look at
//! the source). `--udp-heartbeat-every N` also sends a WebSocket ping
//! every N heartbeats (what a device behind a NAT would do to keep its TCP
//! mapping alive). A device whose 101 had no ticket heartbeats over its
//! WebSocket as without the flag.
//!
//! Kept apart from fleet.rs, which only calls in: the tickets live here,
//! by slab key and generation, so a device costs the fleet nothing more.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use c1m_proto::ticket;

/// One fleet's UDP heartbeats.
pub struct UdpBeats {
    sock: UdpSocket,
    /// The ticket of the device in each slab slot, with the slot's
    /// generation then, and its heartbeats so far (for `every`).
    tickets: Vec<Option<Held>>,
    /// Datagrams of this pass, sent by [`UdpBeats::flush`].
    queue: Vec<([u8; ticket::LEN], SocketAddr)>,
    /// Also a WebSocket ping every this many heartbeats (0: never).
    every: u32,
    /// Datagrams the kernel took, and refused (a full socket buffer).
    pub sent: u64,
    pub dropped: u64,
}

#[derive(Clone, Copy)]
struct Held {
    gen: u32,
    beats: u32,
    ticket: [u8; ticket::LEN],
}

impl UdpBeats {
    /// One fleet's sender for servers like `server`; None, said in one
    /// sentence, if no UDP socket can be made.
    pub fn new(server: SocketAddr, every: u32, core: usize) -> Option<UdpBeats> {
        let any: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .ok()?;
        let sock = UdpSocket::bind(any).and_then(|s| s.set_nonblocking(true).map(|()| s));
        match sock {
            Ok(sock) => Some(UdpBeats {
                sock,
                tickets: Vec::new(),
                queue: Vec::with_capacity(c1m_io::udp::BATCH),
                every,
                sent: 0,
                dropped: 0,
            }),
            Err(e) => {
                eprintln!("client: core {core}: cannot open a UDP socket ({e}): heartbeats go over the WebSockets instead");
                None
            }
        }
    }

    /// Device `key` (generation `gen`) upgraded with the answer `head`:
    /// keeps its ticket, if the server gave one.
    pub fn learn(&mut self, key: usize, gen: u32, head: &[u8]) {
        let t = ticket_of(head);
        if key >= self.tickets.len() {
            if t.is_none() {
                return;
            }
            self.tickets.resize(key + 1, None);
        }
        self.tickets[key] = t.map(|ticket| Held {
            gen,
            beats: 0,
            ticket,
        });
    }

    /// Device `key`'s heartbeat, to `server`: queues its datagram. Returns
    /// None when it has no ticket (send a WebSocket heartbeat instead),
    /// else whether a WebSocket ping is due too.
    pub fn beat(&mut self, key: usize, gen: u32, server: SocketAddr) -> Option<bool> {
        let h = self
            .tickets
            .get_mut(key)?
            .as_mut()
            .filter(|h| h.gen == gen)?;
        self.queue.push((h.ticket, server));
        h.beats = h.beats.wrapping_add(1);
        let ping = self.every > 0 && h.beats % self.every == 0;
        if self.queue.len() == c1m_io::udp::BATCH {
            self.flush();
        }
        Some(ping)
    }

    /// Sends what this pass queued.
    pub fn flush(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let n = c1m_io::udp::send_batch(self.sock.as_raw_fd(), &self.queue);
        self.sent += n as u64;
        self.dropped += (self.queue.len() - n) as u64;
        self.queue.clear();
    }
}

/// The ticket in a 101's head, if it carries one.
pub fn ticket_of(head: &[u8]) -> Option<[u8; ticket::LEN]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let name = ticket::HEADER;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() < name.len() || !line[..name.len()].eq_ignore_ascii_case(name) {
            return None;
        }
        ticket::from_text(line[name.len()..].trim_ascii())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_read_from_the_head_and_sent_per_generation() {
        let key = ticket::Key::from_bytes([7; 16]);
        let t = key.seal(
            ticket::Ticket {
                shard: 1,
                key: 2,
                gen: 3,
            },
            b"d",
        );
        let mut head = Vec::with_capacity(512);
        c1m_proto::handshake::write_accept(b"dGhlIHNhbXBsZSBub25jZQ==", &mut head);
        assert_eq!(ticket_of(&head), None);
        ticket::insert_header(&mut head, &t);
        assert_eq!(ticket_of(&head), Some(t));

        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut u = UdpBeats::new(to, 3, 0).unwrap();
        u.learn(5, 9, &head);
        assert_eq!(u.beat(5, 8, to), None, "another generation's slot");
        assert_eq!(u.beat(4, 9, to), None, "no ticket");
        let pings: Vec<_> = (0..6).map(|_| u.beat(5, 9, to).unwrap()).collect();
        assert_eq!(pings, [false, false, true, false, false, true]);
        u.flush();
        assert_eq!((u.sent, u.dropped), (6, 0));
        let mut b = [0u8; 64];
        rx.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        for _ in 0..6 {
            let n = rx.recv(&mut b).unwrap();
            assert_eq!(&b[..n], &t);
        }
    }
}
