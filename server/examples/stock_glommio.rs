//! stock_glommio: the baseline the shard is measured against. The same
//! protocol code (c1m_proto::conn) and the same socket2 listener, but I/O the stock
//! glommio way: an accept loop and one task per connection reading its
//! glommio `TcpStream`. Every idle read parks an IORING_OP_POLL_ADD in the
//! executor's ring. `--ring-depth` sets the ring (glommio's default is 128).
//!
//! Not for production: no expiry, no stats, no shutdown; a benchmark fixture.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::Duration;

use c1m_proto::conn::{Conn, Limits};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

/// Baseline server: one glommio TcpStream task per connection.
#[derive(argh::FromArgs)]
struct Args {
    /// address to listen on (default 127.0.0.1:9000)
    #[argh(option, default = "\"127.0.0.1:9000\".parse().unwrap()")]
    listen: SocketAddr,
    /// CPUs, one executor each (default 0-1)
    #[argh(option, default = "\"0-1\".into()")]
    cores: String,
    /// io_uring depth per executor (glommio's default: 128)
    #[argh(option, default = "128")]
    ring_depth: usize,
    /// exit after this long (default 10m)
    #[argh(
        option,
        default = "Duration::from_secs(600)",
        from_str_fn(c1m_io::host::parse_duration)
    )]
    lifetime: Duration,
}

fn main() {
    let args: Args = argh::from_env();
    c1m_io::host::raise_nofile();
    let cores = c1m_io::host::parse_cpus(&args.cores).unwrap_or_else(|e| {
        eprintln!("stock_glommio: {e}");
        std::process::exit(2)
    });
    let backlog = c1m_io::listener::somaxconn().unwrap_or(4096);
    let handles: Vec<_> = cores
        .iter()
        .map(|&cpu| {
            let listener = c1m_io::listener::bind(args.listen, backlog).expect("bind");
            let (depth, lifetime) = (args.ring_depth, args.lifetime);
            LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .ring_depth(depth)
                .spawn(move || async move {
                    // SAFETY: the fd comes from a listening socket we own.
                    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
                    glommio::spawn_local(async move {
                        while let Ok(stream) = listener.accept().await {
                            glommio::spawn_local(serve(stream)).detach();
                        }
                    })
                    .detach();
                    glommio::timer::sleep(lifetime).await;
                })
                .expect("spawn executor")
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

async fn serve(mut stream: TcpStream) {
    let limits = Limits::default();
    let mut conn = Conn::new();
    let mut buf = [0u8; 512];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        out.clear();
        let r = conn.receive(
            &mut buf[..n],
            &limits,
            &mut c1m_proto::conn::admit_all,
            &mut out,
        );
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        if r.end.is_some() {
            return;
        }
    }
}
