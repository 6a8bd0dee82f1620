//! The listening side every TCP front-end shares: binds, accepts connections and hands each
//! to its own task on one of the block targets' runtimes ([`crate::io_runtimes`]), backs off
//! when accepting fails (out of file descriptors and the like) instead of spinning, and stops
//! on shutdown, which the connection tasks also see.
//!
//! It also admits connections ([`Limits`]): at most `max_connections` at once, and at most
//! `max_connections_per_source` from one source address (one IPv6 /64), so that a flood of
//! idle or half-open connections cannot take every file descriptor of the process. A refused
//! connection is closed as soon as it is accepted; refusals are logged at warn level, at most
//! once per [`REFUSAL_LOG_INTERVAL`] with their count. The drivers end connections that have
//! not finished their handshake within `handshake_timeout`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::flow::Budget;

/// Refusals are logged at most this often (each line counts those since the last).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What one listener admits, and what each of its connections may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one source address (IPv6: one /64).
    pub max_connections_per_source: usize,
    /// Longest time from accept to the end of the handshake: iSCSI, Login complete; NVMe/TCP,
    /// ICReq received.
    pub handshake_timeout: Duration,
    /// Bytes one connection may have in flight (see [`crate::flow`]).
    pub in_flight_bytes: usize,
    /// A connection whose peer reads none of its waiting output for this long is closed.
    pub write_stall_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_connections_per_source: 256,
            handshake_timeout: Duration::from_secs(15),
            in_flight_bytes: Budget::DEFAULT_BYTES,
            write_stall_timeout: Budget::DEFAULT_WRITE_STALL,
        }
    }
}

/// Who is connected, for admission.
#[derive(Debug, Default)]
struct Admission {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
    refused_since_log: u64,
    last_log: Option<Instant>,
}

/// The source a connection counts against: its address, an IPv6 one's /64 (what one host or
/// site usually gets), IPv4-mapped addresses as IPv4.
fn source_of(peer: &SocketAddr) -> IpAddr {
    match peer.ip().to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Holds a connection's place; dropping it frees the place.
#[derive(Debug)]
struct Slot {
    admission: Arc<Mutex<Admission>>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut a = self.admission.lock();
        a.total -= 1;
        if let Some(n) = a.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                a.per_source.remove(&self.source);
            }
        }
    }
}

fn admit(admission: &Arc<Mutex<Admission>>, limits: &Limits, peer: &SocketAddr) -> Option<Slot> {
    let source = source_of(peer);
    let mut a = admission.lock();
    let from_source = a.per_source.get(&source).copied().unwrap_or(0);
    let refused = if a.total >= limits.max_connections {
        Some(format!("{} connections open", a.total))
    } else if from_source >= limits.max_connections_per_source {
        Some(format!("{from_source} connections open from {source}"))
    } else {
        None
    };
    if let Some(why) = refused {
        a.refused_since_log += 1;
        let now = Instant::now();
        if a.last_log
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(
                %peer,
                refused = a.refused_since_log,
                max_connections = limits.max_connections,
                max_connections_per_source = limits.max_connections_per_source,
                "connection refused: {why} (count: refusals since the last such line)"
            );
            a.refused_since_log = 0;
            a.last_log = Some(now);
        }
        return None;
    }
    a.total += 1;
    *a.per_source.entry(source).or_insert(0) += 1;
    Some(Slot {
        admission: admission.clone(),
        source,
    })
}

/// The process's soft limit on open files, if known.
fn open_files_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (rc == 0 && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

/// Runs an admitted connection on the next block-target runtime (the stream moves to that
/// runtime's reactor), or here if none runs; its place is freed when it ends.
fn spawn_connection<F, Fut>(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    connection: Arc<F>,
    shutdown: watch::Receiver<bool>,
) where
    F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(runtime) = crate::io_runtimes::next() else {
        let conn = connection(stream, peer, shutdown);
        tokio::spawn(async move {
            conn.await;
            drop(slot);
        });
        return;
    };
    // Leaves this runtime's reactor nonblocking, to join the other's.
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot hand the connection to a block-target runtime; closed");
            return;
        }
    };
    runtime.spawn(async move {
        match TcpStream::from_std(stream) {
            Ok(stream) => connection(stream, peer, shutdown).await,
            Err(e) => tracing::warn!(%peer, error = %e, "cannot register the connection; closed"),
        }
        drop(slot);
    });
}

/// A running listener.
#[derive(Debug)]
pub struct Listener {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Binds `listen` with the default [`Limits`]; see [`Listener::bind_with`].
    pub async fn bind<F, Fut>(listen: &str, connection: F) -> std::io::Result<Listener>
    where
        F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Listener::bind_with(listen, Limits::default(), connection).await
    }

    /// Binds `listen` and runs `connection(stream, peer, shutdown)` in a new task for every
    /// connection `limits` admit: the listener accepts on the current tokio runtime, the
    /// connections run on the block targets' runtimes, dealt in turn (on the current runtime
    /// if those could not be started).
    pub async fn bind_with<F, Fut>(
        listen: &str,
        limits: Limits,
        connection: F,
    ) -> std::io::Result<Listener>
    where
        F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let connection = Arc::new(connection);
        // Started now, not at the first connection: a failure is logged at startup.
        crate::io_runtimes::threads();
        if let Some(nofile) = open_files_limit()
            && limits.max_connections as u64 + 256 > nofile
        {
            tracing::warn!(
                %local_addr,
                max_connections = limits.max_connections,
                open_files_limit = nofile,
                "the open files limit is below max_connections (+256 for everything else): \
                 a flood of connections may exhaust file descriptors before the cap refuses it"
            );
        }
        let admission = Arc::new(Mutex::new(Admission::default()));
        let (shutdown, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = listener.accept() => match r {
                        Ok((stream, peer)) => {
                            let Some(slot) = admit(&admission, &limits, &peer) else {
                                drop(stream);
                                continue;
                            };
                            spawn_connection(stream, peer, slot, connection.clone(), rx.clone());
                        }
                        Err(e) => {
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    _ = rx.changed() => return,
                }
            }
        });
        Ok(Listener {
            local_addr,
            shutdown,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and tells every connection to end; returns once the listener is gone.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_source: usize) -> Limits {
        Limits {
            max_connections: total,
            max_connections_per_source: per_source,
            ..Limits::default()
        }
    }

    /// Accepted connections run on the block targets' threads, dealt in turn: four
    /// connections over two threads land on both, never on the listener's runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_dealt_to_the_io_threads_in_turn() {
        crate::io_runtimes::set_threads(2);
        let n = crate::io_runtimes::threads();
        assert!(n >= 1, "no io thread started");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let listener = Listener::bind("127.0.0.1:0", move |_stream, _peer, _shutdown| {
            let tx = tx.clone();
            async move {
                let name = std::thread::current().name().unwrap_or("").to_string();
                let _ = tx.send(name);
            }
        })
        .await
        .unwrap();
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(listener.local_addr()).await.unwrap());
        }
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let name = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(name.starts_with("maas-io-"), "served on {name:?}");
            names.insert(name);
        }
        assert_eq!(names.len(), n.min(4), "connections not spread: {names:?}");
        listener.shutdown().await;
    }

    #[test]
    fn admission_counts_per_source_and_in_total_and_frees_places() {
        let a = Arc::new(Mutex::new(Admission::default()));
        let l = limits(5, 2);
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        let one = admit(&a, &l, &p("10.0.0.1:1000")).unwrap();
        let _two = admit(&a, &l, &p("10.0.0.1:1001")).unwrap();
        assert!(admit(&a, &l, &p("10.0.0.1:1002")).is_none(), "per source");
        // IPv4-mapped is the same source; one IPv6 /64 is one source.
        assert!(admit(&a, &l, &p("[::ffff:10.0.0.1]:1003")).is_none());
        let _v6 = admit(&a, &l, &p("[2001:db8::1]:1")).unwrap();
        let _v6b = admit(&a, &l, &p("[2001:db8::ffff:2]:1")).unwrap();
        assert!(admit(&a, &l, &p("[2001:db8::3]:1")).is_none());
        let _x = admit(&a, &l, &p("10.0.0.2:1")).unwrap();
        assert!(admit(&a, &l, &p("10.0.0.3:1")).is_none(), "in total");
        drop(one);
        let _again = admit(&a, &l, &p("10.0.0.1:1004")).unwrap();
        assert_eq!(a.lock().total, 5);
        // The first refusal was logged; the three after it wait for the next line.
        assert_eq!(a.lock().refused_since_log, 3);
    }
}
