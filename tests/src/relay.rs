//! A TCP relay on 127.0.0.1 that a test can freeze: a network partition between a client (a
//! guest's initiator) and a server (`maasd`) that neither side sees as a closed connection.
//!
//! ```no_run
//! use maas_tests::relay::Relay;
//!
//! let relay = Relay::listen();
//! // ... start the server, advertising 10.0.2.2:<relay.port()> to guests ...
//! relay.forward_to(4420);
//! relay.freeze(); // the connections go silent both ways, nothing is closed
//! relay.thaw(); // the frozen connections are dropped; new ones are relayed again
//! ```
//!
//! Frozen, the relay forwards nothing and closes nothing: bytes and end-of-stream from either
//! side are held (the peer sees silence, as behind a dead link), and new connections wait in the
//! listen queue. Thawing drops every connection that lived through the freeze (both sides are
//! closed, as peers that lost their state after a partition would reset) and relays new ones
//! again. The relay records when each server-side connection was closed by the server.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One relayed connection, as the relay saw it.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Sequence number, from 0 in accept order.
    pub id: usize,
    /// When it was accepted.
    pub opened: Instant,
    /// The freeze generation it was relayed in (see [`Relay::generation`]).
    pub generation: u64,
    /// When the server closed its side (end of stream or error), if it did.
    pub server_closed: Option<Instant>,
    /// When the client closed its side, if it did.
    pub client_closed: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    frozen: bool,
    conns: Vec<Connection>,
    /// (generation, id, client, server) of every live connection, to close them on thaw and
    /// drop.
    sockets: Vec<(u64, usize, TcpStream, TcpStream)>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    thawed: Condvar,
    generation: AtomicU64,
    stop: AtomicBool,
    upstream: Mutex<Option<SocketAddr>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while the relay is frozen; false if the connection of `generation` must go (the
    /// relay was frozen and thawed since it started, or is stopping).
    fn pass(&self, generation: u64) -> bool {
        let mut st = self.lock();
        while st.frozen && !self.stop.load(Ordering::SeqCst) {
            st = self
                .thawed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        !self.stop.load(Ordering::SeqCst) && self.generation.load(Ordering::SeqCst) == generation
    }
}

/// See the module documentation. Dropping it closes everything and stops its threads.
#[derive(Debug)]
pub struct Relay {
    port: u16,
    shared: Arc<Shared>,
    listener: Option<TcpListener>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Binds a free port of 127.0.0.1; nothing is relayed before [`Relay::forward_to`].
    pub fn listen() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("relay: binding 127.0.0.1:0: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("relay: local_addr: {e}"))
            .port();
        Relay {
            port,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                thawed: Condvar::new(),
                generation: AtomicU64::new(0),
                stop: AtomicBool::new(false),
                upstream: Mutex::new(None),
            }),
            listener: Some(listener),
            accept: None,
        }
    }

    /// The relay's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts relaying every connection to 127.0.0.1:`port`.
    pub fn forward_to(&mut self, port: u16) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        let Some(listener) = self.listener.take() else {
            return;
        };
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("relay: set_nonblocking: {e}"));
        let shared = self.shared.clone();
        self.accept = Some(std::thread::spawn(move || accept_loop(&listener, &shared)));
    }

    /// Stops forwarding in both directions, closing nothing.
    pub fn freeze(&self) {
        self.shared.lock().frozen = true;
    }

    /// Drops the connections that lived through the freeze and relays again.
    pub fn thaw(&self) {
        let mut st = self.shared.lock();
        let old = self.shared.generation.fetch_add(1, Ordering::SeqCst);
        for (g, _, a, b) in &st.sockets {
            if *g == old {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
        st.sockets.retain(|(g, _, _, _)| *g != old);
        st.frozen = false;
        self.shared.thawed.notify_all();
    }

    /// The number of freezes thawed so far: connections relayed before the first thaw are of
    /// generation 0, and so on.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// Every connection so far, in accept order.
    pub fn connections(&self) -> Vec<Connection> {
        self.shared.lock().conns.clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let mut st = self.shared.lock();
            for (_, _, a, b) in st.sockets.drain(..) {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
            st.frozen = false;
        }
        self.shared.thawed.notify_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        // Frozen: new connections wait in the listen queue.
        if shared.lock().frozen {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match listener.accept() {
            Ok((client, _)) => {
                let shared = shared.clone();
                std::thread::spawn(move || relay_one(client, &shared));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn relay_one(client: TcpStream, shared: &Arc<Shared>) {
    let generation = shared.generation.load(Ordering::SeqCst);
    let upstream = *shared.upstream.lock().unwrap_or_else(|e| e.into_inner());
    let _ = client.set_nonblocking(false);
    let _ = client.set_nodelay(true);
    let Some(server) = upstream.and_then(|a| TcpStream::connect(a).ok()) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = server.set_nodelay(true);
    let id = {
        let mut st = shared.lock();
        let id = st.conns.len();
        st.conns.push(Connection {
            id,
            opened: Instant::now(),
            generation,
            server_closed: None,
            client_closed: None,
        });
        match (client.try_clone(), server.try_clone()) {
            (Ok(a), Ok(b)) => st.sockets.push((generation, id, a, b)),
            _ => return,
        }
        id
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = {
        let shared = shared.clone();
        std::thread::spawn(move || pump(c2, s2, &shared, generation, id, false))
    };
    pump(server, client, shared, generation, id, true);
    let _ = up.join();
    shared.lock().sockets.retain(|(_, i, _, _)| *i != id);
}

/// Copies `from` to `to` while the relay lets this connection's generation pass; records when
/// `from` ended (`from_server`: the server's side).
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    shared: &Shared,
    generation: u64,
    id: usize,
    from_server: bool,
) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = from.read(&mut buf).unwrap_or(0);
        if n == 0 {
            let mut st = shared.lock();
            let c = &mut st.conns[id];
            let when = if from_server {
                &mut c.server_closed
            } else {
                &mut c.client_closed
            };
            when.get_or_insert_with(Instant::now);
        }
        if !shared.pass(generation) {
            break;
        }
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on 127.0.0.1 that closes a connection 300 ms after receiving "close".
    fn echo_server() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        if &buf[..n] == b"close" {
                            std::thread::sleep(Duration::from_millis(300));
                            return;
                        }
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    fn client(relay: &Relay) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", relay.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        s
    }

    /// Reads what arrives within the read timeout: Some(bytes) (empty: end of stream), None if
    /// nothing came.
    fn receive(s: &mut TcpStream) -> Option<Vec<u8>> {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(_) => Some(Vec::new()),
        }
    }

    #[test]
    fn relays_then_holds_everything_while_frozen_and_drops_old_connections_on_thaw() {
        let mut relay = Relay::listen();
        relay.forward_to(echo_server());
        let mut a = client(&relay);
        a.write_all(b"ping").unwrap();
        assert_eq!(receive(&mut a).as_deref(), Some(&b"ping"[..]));
        let mut c = client(&relay);
        c.write_all(b"close").unwrap();
        std::thread::sleep(Duration::from_millis(100));

        relay.freeze();
        // Nothing passes either way, and the server's close is held back too.
        a.write_all(b"held").unwrap();
        assert_eq!(receive(&mut a), None, "data passed a frozen relay");
        assert_eq!(receive(&mut c), None, "a close passed a frozen relay");
        let conns = relay.connections();
        assert!(conns[1].server_closed.is_some(), "{conns:?}");
        assert!(conns[0].server_closed.is_none(), "{conns:?}");
        // A new connection waits.
        let mut b = client(&relay);
        b.write_all(b"new").unwrap();
        assert_eq!(
            receive(&mut b),
            None,
            "a new connection was relayed while frozen"
        );

        relay.thaw();
        assert_eq!(relay.generation(), 1);
        assert_eq!(
            receive(&mut a).as_deref(),
            Some(&b""[..]),
            "the old connection lives"
        );
        assert_eq!(receive(&mut c).as_deref(), Some(&b""[..]));
        assert_eq!(receive(&mut b).as_deref(), Some(&b"new"[..]));
        let conns = relay.connections();
        assert_eq!(conns.len(), 3, "{conns:?}");
        assert_eq!(
            conns.iter().map(|c| c.generation).collect::<Vec<_>>(),
            [0, 0, 1]
        );
    }
}
