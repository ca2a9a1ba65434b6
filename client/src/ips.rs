//! Source addresses (`--ips`), target servers, and whether they can hold the
//! fleet: each (source IP, destination address:port) pair reaches at most one
//! ephemeral port range of connections.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// More source addresses than any fleet needs (16M connections at 28K
/// ports each): a larger range is a typo.
pub const MAX_IPS: usize = 65_536;

/// Parses `127.0.0.2-127.0.0.41`, `10.0.0.2,10.0.0.9`, `fd00::2-fd00::9`
/// or a mix of such ranges and addresses, in order, without duplicates.
pub fn parse_ips(s: &str) -> Result<Vec<IpAddr>, String> {
    let mut out: Vec<IpAddr> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let ip = |t: &str| -> Result<IpAddr, String> {
            t.trim()
                .parse()
                .map_err(|_| format!("--ips: {t:?} is not an IP address"))
        };
        let (a, b) = (ip(a)?, ip(b)?);
        let (lo, hi, v6) = match (a, b) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, false),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), true),
            _ => return Err(format!("--ips: range {part:?} mixes IPv4 and IPv6")),
        };
        if lo > hi {
            return Err(format!("--ips: range {part:?} is empty (first > last)"));
        }
        if hi - lo >= (MAX_IPS - out.len()) as u128 {
            return Err(format!("--ips: more than {MAX_IPS} addresses"));
        }
        for n in lo..=hi {
            let ip = if v6 {
                IpAddr::V6(Ipv6Addr::from(n))
            } else {
                IpAddr::V4(Ipv4Addr::from(n as u32))
            };
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    if out.is_empty() {
        return Err("--ips: no addresses given".into());
    }
    Ok(out)
}

/// Parses `--server`: one or more `addr:port`, comma-separated.
pub fn parse_servers(list: &[String]) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for s in list.iter().flat_map(|s| s.split(',')).map(str::trim) {
        if s.is_empty() {
            continue;
        }
        let a: SocketAddr = s
            .parse()
            .map_err(|_| format!("--server: {s:?} is not an address:port"))?;
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.is_empty() {
        return Err("--server: no address given".into());
    }
    Ok(out)
}

/// net.ipv4.ip_local_port_range (also used for IPv6), inclusive.
pub fn local_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// Which source IP and server the `n`th connection uses: walk the source
/// IPs first, so that each (IP, server) pair gets an equal share.
pub fn route(n: u64, sources: usize, servers: usize) -> (usize, usize) {
    let sources = sources.max(1) as u64;
    let servers = servers.max(1) as u64;
    ((n % sources) as usize, (n / sources % servers) as usize)
}

/// Checks that `conns` fit in the ports of every (source, server) pair, each
/// taking its share as [`route`] hands it out. `sources` is 0 when the kernel
/// picks the source address (one per destination, on loopback 127.0.0.1).
pub fn check_capacity(
    conns: u64,
    sources: usize,
    servers: &[SocketAddr],
    ports: (u16, u16),
) -> Result<(), String> {
    let per_pair = u64::from(ports.1.saturating_sub(ports.0)) + 1;
    let pairs = sources.max(1) as u64 * servers.len().max(1) as u64;
    let busiest = conns.div_ceil(pairs);
    if busiest <= per_pair {
        return Ok(());
    }
    let need_ips = conns.div_ceil(per_pair * servers.len().max(1) as u64);
    let need_range = busiest;
    let src = if sources == 0 {
        "one source address (no --ips)".to_string()
    } else {
        format!("{sources} source IPs")
    };
    Err(format!(
        "{conns} connections do not fit: {src} x {} server address(es) x {per_pair} ports \
         (net.ipv4.ip_local_port_range {} {}) hold {}; give --ips at least {need_ips} addresses \
         (on loopback e.g. --ips 127.0.0.2-{}) or widen the range to {need_range} ports",
        servers.len(),
        ports.0,
        ports.1,
        per_pair * pairs,
        Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + need_ips as u32),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_lists_and_ipv6() {
        let ips = parse_ips("127.0.0.2-127.0.0.4").unwrap();
        assert_eq!(ips, vec![v4("127.0.0.2"), v4("127.0.0.3"), v4("127.0.0.4")]);
        let ips = parse_ips("10.0.0.255-10.0.1.1, 10.0.0.255,192.168.1.7").unwrap();
        assert_eq!(
            ips,
            ["10.0.0.255", "10.0.1.0", "10.0.1.1", "192.168.1.7"].map(v4)
        );
        let ips = parse_ips("fd00::fe-fd00::101").unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[3], v4("fd00::101"));
        assert_eq!(parse_ips("::1").unwrap(), vec![v4("::1")]);
    }

    #[test]
    fn bad_ips_say_what_is_wrong() {
        for (s, says) in [
            ("127.0.0.9-127.0.0.2", "empty"),
            ("127.0.0.1-::1", "mixes"),
            ("localhost", "not an IP"),
            ("10.0.0.0-10.255.255.255", "more than"),
            ("", "no addresses"),
        ] {
            let e = parse_ips(s).unwrap_err();
            assert!(e.contains(says), "{s:?}: {e}");
        }
    }

    #[test]
    fn servers_parse_from_repeats_and_lists() {
        let s =
            parse_servers(&["127.0.0.1:9000,127.0.0.1:9001".into(), "[::1]:9000".into()]).unwrap();
        assert_eq!(s.len(), 3);
        assert!(parse_servers(&["127.0.0.1".into()]).is_err());
    }

    #[test]
    fn routes_spread_evenly_over_pairs() {
        let mut count = [[0u32; 2]; 3];
        for n in 0..600 {
            let (ip, server) = route(n, 3, 2);
            count[ip][server] += 1;
        }
        assert!(count.iter().flatten().all(|&c| c == 100), "{count:?}");
        assert_eq!(route(5, 0, 1), (0, 0));
    }

    #[test]
    fn capacity_is_ips_times_servers_times_ports() {
        let one: Vec<SocketAddr> = vec!["127.0.0.1:9000".parse().unwrap()];
        let two: Vec<SocketAddr> = vec![
            "127.0.0.1:9000".parse().unwrap(),
            "127.0.0.1:9001".parse().unwrap(),
        ];
        let ports = (32768, 60999); // 28,232 ports
        assert!(check_capacity(28_232, 0, &one, ports).is_ok());
        let e = check_capacity(28_233, 0, &one, ports).unwrap_err();
        assert!(e.contains("at least 2 addresses"), "{e}");
        assert!(check_capacity(1_000_000, 35, &one, ports).is_err());
        assert!(check_capacity(1_000_000, 36, &one, ports).is_ok());
        assert!(check_capacity(1_000_000, 18, &two, ports).is_ok());
        let e = check_capacity(1_000_000, 20, &one, ports).unwrap_err();
        assert!(
            e.contains("at least 36 addresses") && e.contains("127.0.0.37"),
            "{e}"
        );
        assert!(e.contains("50000 ports"), "{e}");
        assert!(check_capacity(1_000_000, 16, &one, (1024, 65535)).is_ok());
    }
}
