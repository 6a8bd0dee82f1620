//! The listening side every TCP front-end shares: binds, accepts connections and hands each
//! to its own task, backs off when accepting fails (out of file descriptors and the like)
//! instead of spinning, and stops on shutdown, which the connection tasks also see.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running listener.
#[derive(Debug)]
pub struct Listener {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Binds `listen` and runs `connection(stream, peer, shutdown)` in a new task for every
    /// connection, on the current tokio runtime.
    pub async fn bind<F, Fut>(listen: &str, connection: F) -> std::io::Result<Listener>
    where
        F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let (shutdown, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = listener.accept() => match r {
                        Ok((stream, peer)) => {
                            tokio::spawn(connection(stream, peer, rx.clone()));
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
