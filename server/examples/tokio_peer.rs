//! The tuned tokio-tungstenite peer that issue 18's targets compare c1m
//! with: a generic async stack done well. One task per connection on a
//! 2-thread runtime, tungstenite with a 4 KiB read buffer and a 4 KiB write
//! buffer (its default pre-sizes 128 KiB), a timer per connection (the
//! heartbeat timeout, reset by every frame), pongs as tungstenite queues
//! them, the device id required in the path as c1m requires it.
//! `bench/core.sh` runs it as `tokio`.

use std::net::SocketAddr;
use std::time::Duration;

use argh::FromArgs;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// tokio-tungstenite, tuned: the peer of the budget's targets.
#[derive(FromArgs)]
struct Args {
    /// address to listen on
    #[argh(option, default = "\"127.0.0.1:9000\".parse().unwrap()")]
    listen: SocketAddr,
    /// runtime worker threads (default 2: one per core here)
    #[argh(option, default = "2")]
    threads: usize,
    /// silence after which a connection is dropped (default 90s)
    #[argh(
        option,
        default = "Duration::from_secs(90)",
        from_str_fn(c1m_io::host::parse_duration)
    )]
    timeout: Duration,
    /// exit after this long (default 120s: a benchmark's server)
    #[argh(
        option,
        default = "Duration::from_secs(120)",
        from_str_fn(c1m_io::host::parse_duration)
    )]
    lifetime: Duration,
}

fn main() {
    let args: Args = argh::from_env();
    c1m_io::host::raise_nofile();
    let backlog = c1m_io::listener::somaxconn().unwrap_or(4096);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("cannot start the runtime: {e}")));
    rt.block_on(async move {
        // The same listen queue as c1m's shards (socket2, somaxconn).
        let std = c1m_io::listener::bind(args.listen, backlog)
            .unwrap_or_else(|e| fail(&format!("cannot listen on {}: {e}", args.listen)));
        let std: std::net::TcpListener = std.into();
        std.set_nonblocking(true)
            .unwrap_or_else(|e| fail(&format!("cannot make the listener non-blocking: {e}")));
        let listener = tokio::net::TcpListener::from_std(std)
            .unwrap_or_else(|e| fail(&format!("cannot use the listener: {e}")));
        let end = tokio::time::sleep(args.lifetime);
        tokio::pin!(end);
        loop {
            tokio::select! {
                _ = &mut end => break,
                got = listener.accept() => match got {
                    Ok((s, _)) => drop(tokio::spawn(serve(s, args.timeout))),
                    // EMFILE and the like: back off a little, as c1m does.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
            }
        }
    });
}

async fn serve(s: tokio::net::TcpStream, timeout: Duration) {
    let _ = s.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_write_buffer_size(64 << 10)
        .max_message_size(Some(64 << 10))
        .max_frame_size(Some(64 << 10));
    // The error type is tungstenite's (its Callback trait), not ours.
    #[allow(clippy::result_large_err)]
    let check_id = |req: &Request, resp: Response| {
        let has_id = req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.len() > 3 && p.starts_with("id=")));
        if has_id {
            Ok(resp)
        } else {
            let mut no =
                tokio_tungstenite::tungstenite::http::Response::new(Some("missing id".to_string()));
            *no.status_mut() = StatusCode::BAD_REQUEST;
            Err(no)
        }
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(s, check_id, Some(config)).await
    else {
        return;
    };
    loop {
        match tokio::time::timeout(timeout, ws.next()).await {
            // Silent past the timeout: dropped (a reset, as c1m's default).
            Err(_) => return,
            Ok(None) | Ok(Some(Err(_))) => return,
            // tungstenite queued the pong: send it now.
            Ok(Some(Ok(Message::Ping(_)))) => {
                if ws.flush().await.is_err() {
                    return;
                }
            }
            Ok(Some(Ok(Message::Close(_)))) => {
                let _ = ws.close(None).await;
                return;
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

fn fail(why: &str) -> ! {
    eprintln!("tokio_peer: {why}");
    std::process::exit(1)
}
