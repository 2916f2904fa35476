//! The accept loop: TLS when configured, a cap on open connections, and a
//! deadline for request headers, so neither a flood of connections nor slow
//! clients take the service.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::{NetError, TlsFiles};

/// Whether the connection a request came on was encrypted here; handlers read it from the
/// request's extensions (a proxy in front is the handler's business).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionSecurity {
    /// TLS ended in this process.
    Tls,
    /// Plain TCP.
    Plain,
}

/// How a listener serves.
#[derive(Clone)]
pub struct ServeOptions {
    /// TLS, when this process ends it.
    pub tls: Option<Arc<TlsFiles>>,
    /// Connections open at once; further ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// A client must send a request's headers (and finish the TLS handshake) within this time.
    pub header_timeout: Duration,
    /// How long requests in flight may finish after shutdown is asked.
    pub drain_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown`, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), NetError> {
    let addr = listener.local_addr().map_err(NetError::Listen)?;
    tracing::info!(%addr, tls = options.tls.is_some(), max_connections = options.max_connections, "listening");
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot { Ok(s) => s, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // out of descriptors and the like: wait instead of spinning
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let options = options.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            connection(stream, peer, app, &options, watcher).await;
        });
    }
    drop(listener);
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(%addr, "requests still in flight after the drain timeout; closing them");
    }
    Ok(())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    options: &ServeOptions,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout);
    match &options.tls {
        Some(files) => {
            let acceptor = files.acceptor();
            let tls = match tokio::time::timeout(options.header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = service(app, peer, ConnectionSecurity::Tls);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        None => {
            let service = service(app, peer, ConnectionSecurity::Plain);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
    }
}

/// The app with the peer address and the connection's security in every request's extensions.
#[derive(Clone)]
struct Tagged {
    app: Router,
    peer: SocketAddr,
    security: ConnectionSecurity,
}

impl tower::Service<hyper::Request<Incoming>> for Tagged {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = tower::util::Oneshot<Router, hyper::Request<Incoming>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: hyper::Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        req.extensions_mut().insert(self.security);
        self.app.clone().oneshot(req)
    }
}

fn service(app: Router, peer: SocketAddr, security: ConnectionSecurity) -> TowerToHyperService<Tagged> {
    TowerToHyperService::new(Tagged { app, peer, security })
}
