//! The driver as the fleet uses it: a socket registered while connecting
//! reports Connected, and the peer's bytes follow whether the peer spoke
//! before the connect was reported (a server-first protocol) or after it
//! (a WebSocket server, which waits for the upgrade request).

use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use c1m_io::epoll::EpollDriver;
use c1m_io::uring::UringDriver;
use c1m_io::{socket, Backend, Close, Driver, DriverConfig, Event, Token};

/// Connects one socket through `io` and reads its peer's "hello", which
/// must come after the Connected event.
fn connect_and_read(io: &mut impl Driver, peer_first: bool) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = socket::connect_from(addr, None).unwrap();
    let h = io.register(fd, Token(7), true).unwrap();
    let (mut peer, _) = listener.accept().unwrap();
    if peer_first {
        peer.write_all(b"hello").unwrap();
        // Let the bytes land before the driver looks at the socket.
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut connected, mut got) = (false, Vec::new());
    while got.len() < 5 && Instant::now() < deadline {
        io.wait(Duration::from_millis(20)).unwrap();
        let mut answer = false;
        while let Some(ev) = io.next() {
            match ev {
                Event::Connected(Token(7)) => {
                    connected = true;
                    answer = true;
                }
                Event::Data(Token(7), bytes) => {
                    assert!(connected, "bytes before the connect was reported");
                    got.extend_from_slice(bytes);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if answer {
            assert_eq!(io.socket_error(h), 0);
            if !peer_first {
                peer.write_all(b"hello").unwrap();
            }
        }
    }
    assert!(connected, "no Connected event");
    assert_eq!(got, b"hello", "the peer's bytes (peer first: {peer_first})");
    io.close(h, Close::Abortive);
}

#[test]
fn a_connecting_socket_reads_what_its_peer_sends_before_and_after_the_connect() {
    let cfg = DriverConfig { max_pending: 4096 };
    for peer_first in [true, false] {
        connect_and_read(&mut EpollDriver::new(cfg).unwrap(), peer_first);
        if Backend::usable(Backend::Uring).0 == Backend::Uring {
            connect_and_read(&mut UringDriver::new(cfg).unwrap(), peer_first);
        }
    }
}
