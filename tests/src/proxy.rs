//! A loopback TCP proxy that injects the faults real networks produce between a worker and its
//! broker: a path that stops answering without closing (half-open: nothing is forwarded either
//! way, nothing is closed, new connections are accepted and then hear nothing), and connections
//! reset with a TCP RST. Blocking std threads, so it works the same under any test runtime.
//!
//! Bytes are never dropped or reordered: a blackhole holds what it read and forwards it when
//! traffic resumes, as TCP would after a long stall; a reset ends the connection for both ends.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The proxy: listens on a free loopback port and forwards to one target. Stops (and resets
/// every connection) when dropped.
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
}

struct Shared {
    target: SocketAddr,
    /// Nothing is forwarded while set.
    blackhole: AtomicBool,
    stop: AtomicBool,
    /// Open connections (both sides, and whether they are being reset), to reset.
    conns: Mutex<Vec<(TcpStream, TcpStream, Arc<AtomicBool>)>>,
    accepted: AtomicU64,
    resets: AtomicU64,
}

impl Proxy {
    /// Starts forwarding from a free loopback port to `target`.
    pub fn start(target: SocketAddr) -> Result<Proxy, String> {
        Self::start_on(0, target)
    }

    /// Starts forwarding from loopback port `port` (0: any free one) to `target`.
    pub fn start_on(port: u16, target: SocketAddr) -> Result<Proxy, String> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .map_err(|e| format!("proxy: bind 127.0.0.1:{port}: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("proxy: local address: {e}"))?
            .port();
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("proxy: nonblocking: {e}"))?;
        let shared = Arc::new(Shared {
            target,
            blackhole: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(listener, s))
            .map_err(|e| format!("proxy: thread: {e}"))?;
        Ok(Proxy { port, shared })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops forwarding in both directions without closing anything (`true`), or resumes (`false`).
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// Resets every open connection (RST to both ends); returns how many.
    ///
    /// Each socket gets linger 0 and its reading side shut down, which wakes the pumps without
    /// sending anything; they then leave without a FIN (see [`pump`]), and the last close of a
    /// socket with linger 0 sends the RST.
    pub fn reset_all(&self) -> usize {
        let conns: Vec<(TcpStream, TcpStream, Arc<AtomicBool>)> =
            std::mem::take(&mut *self.shared.lock());
        let n = conns.len();
        for (a, b, resetting) in conns {
            resetting.store(true, Ordering::SeqCst);
            reset(&a);
            reset(&b);
        }
        self.shared.resets.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Connections accepted so far (a client that reconnects shows up here).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.blackhole(false);
        self.reset_all();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(TcpStream, TcpStream, Arc<AtomicBool>)>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Makes the last close of `s` send an RST (linger 0) and wakes its readers (shutting the read
/// side sends nothing).
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
    let _ = s.shutdown(Shutdown::Read);
}

fn accept_loop(listener: TcpListener, s: Arc<Shared>) {
    while !s.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                s.accepted.fetch_add(1, Ordering::Relaxed);
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect_timeout(&s.target, Duration::from_secs(5))
                else {
                    reset(&client);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let pair = (client.try_clone(), server.try_clone());
                let (Ok(c2), Ok(s2)) = pair else {
                    continue;
                };
                let resetting = Arc::new(AtomicBool::new(false));
                if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
                    let mut conns = s.lock();
                    // Forget connections both pumps have left (their sockets are closed).
                    conns.retain(|(_, _, r)| Arc::strong_count(r) > 1);
                    conns.push((c3, s3, resetting.clone()));
                }
                let (a, b) = (s.clone(), s.clone());
                let (ra, rb) = (resetting.clone(), resetting);
                let _ = std::thread::Builder::new()
                    .name("proxy-up".into())
                    .spawn(move || pump(client, s2, a, ra));
                let _ = std::thread::Builder::new()
                    .name("proxy-down".into())
                    .spawn(move || pump(server, c2, b, rb));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Copies `from` → `to` until either ends; holds what it read while the blackhole is on. On a
/// reset it leaves without passing the end on, so the sockets' last close sends RSTs.
fn pump(mut from: TcpStream, mut to: TcpStream, s: Arc<Shared>, resetting: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while s.blackhole.load(Ordering::SeqCst) && !s.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while s.blackhole.load(Ordering::SeqCst) && !s.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if !resetting.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn forwards_holds_in_a_blackhole_and_resets() {
        let p = Proxy::start(echo_server()).expect("proxy");
        let mut c = TcpStream::connect(("127.0.0.1", p.port())).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 5];
        c.write_all(b"hello").expect("write");
        c.read_exact(&mut buf).expect("echo");
        assert_eq!(&buf, b"hello");
        // Half-open: the write succeeds, nothing comes back, nothing is closed.
        p.blackhole(true);
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        c.write_all(b"again").expect("write into the blackhole");
        let err = c
            .read_exact(&mut buf)
            .expect_err("no answer in a blackhole");
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );
        // Resumed: what was held arrives.
        p.blackhole(false);
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.read_exact(&mut buf).expect("echo after the blackhole");
        assert_eq!(&buf, b"again");
        // Reset: the client sees its connection end.
        assert_eq!(p.reset_all(), 1);
        let mut rest = Vec::new();
        let ended = c.read_to_end(&mut rest);
        let err = ended.expect_err("a reset, not a clean end");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
        assert_eq!(p.accepted(), 1);
    }
}
