//! Loopback helpers for processes this one starts (the demo's workers and gateway, and
//! the tests'): port allocation and a readiness `GET`.
//!
//! Asking the kernel for port 0 and handing the number to a child leaves a window in
//! which that port can be taken, most often as the local port of an outgoing
//! connection, since `bind(0)` draws from the same ephemeral range as `connect`. A
//! child that then cannot bind fails (pingora even panics in its listener task and
//! keeps running without the listener). So ports come from below the ephemeral range,
//! where only explicit binds land, and one process never hands out the same port twice.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Mutex;

/// Ports already handed out by this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// The kernel's ephemeral port range (Linux), or the IANA one elsewhere.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((49152, 65535))
}

/// A pseudo-random start so that concurrent processes rarely probe the same ports.
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// A 127.0.0.1 port that is free now and outside the ephemeral range when the range
/// leaves room (falling back to the kernel's choice otherwise).
pub fn free_loopback_port() -> std::io::Result<u16> {
    let (lo, hi) = ephemeral_range();
    // Candidates: [10000, lo) when the range starts high enough, else (hi, 65535].
    let (start, end) = if lo > 11_000 {
        (10_000u32, u32::from(lo))
    } else {
        (u32::from(hi) + 1, 65_536)
    };
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    if end > start + 100 {
        let span = end - start;
        let first = (seed() % u64::from(span)) as u32;
        for i in 0..span.min(4096) {
            let port = (start + (first + i) % span) as u16;
            if handed.contains(&port) {
                continue;
            }
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                handed.insert(port);
                return Ok(port);
            }
        }
    }
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        if handed.insert(port) {
            return Ok(port);
        }
    }
}

/// [`free_loopback_port`] as a socket address.
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    Ok(SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        free_loopback_port()?,
    )))
}

/// A minimal HTTP/1.1 `GET` (connection closed after the answer): (status, body), or
/// `None` when the peer cannot be reached or answers something else than HTTP. For
/// readiness probes of local processes.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let (lo, hi) = ephemeral_range();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let p = free_loopback_port().expect("a free port");
            assert!(seen.insert(p), "port {p} handed out twice");
            if lo > 11_000 {
                assert!(
                    (10_000..lo).contains(&p),
                    "{p} in the ephemeral range {lo}-{hi}"
                );
            }
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("still free");
        }
    }
}
