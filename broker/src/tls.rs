//! The TLS front end: coevo terminates TLS itself and pipes the decrypted bytes to rumqttd,
//! which then listens on a loopback-only port.
//!
//! Why not rumqttd's own `use-rustls` listener: rumqttd 0.20 runs the TLS handshake inline in
//! its accept loop, with no timeout, before it spawns the connection. A single TCP connection
//! that never sends a ClientHello (a port scanner, a stuck device, `nc broker 8883`) therefore
//! stops the broker from accepting anyone else until that socket closes. Here every accepted
//! socket gets its own task and the handshake must finish within the broker's
//! `connection_timeout_ms`, the same budget rumqttd gives a plain client to send CONNECT.
//! It also keeps one rustls (0.23, ring provider) in the build instead of two.
//!
//! Costs, and why they are acceptable: every byte is copied once more over loopback (small next
//! to TLS itself and to training); rumqttd sees every TLS client as coming from 127.0.0.1 (we
//! log the real peer at accept); and rumqttd's plain port is reachable by local processes on the
//! broker host. That port still requires a client's password, just like the TLS one.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::BrokerError;

/// Read buffer per direction: large enough that a 256 KiB model chunk moves in a few syscalls.
const PIPE_BUFFER: usize = 64 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop doesn't spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Loads the certificate chain and key and builds the server config, so a missing, malformed
/// or mismatched file is a typed error at start-up rather than a failed handshake later.
pub(crate) fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, BrokerError> {
    let chain = load_chain(&config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| {
        BrokerError::Tls(format!(
            "private key {}: {}",
            config.key.display(),
            pem_error(&e)
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BrokerError::Tls(format!("protocol versions: {e}")))?
        // Clients prove who they are with their password (checked by rumqttd's auth handler).
        .with_no_client_auth()
        // Also checks that the key belongs to the leaf certificate.
        .with_single_cert(chain, key)
        .map_err(|e| {
            BrokerError::Tls(format!(
                "certificate {} with key {}: {e}",
                config.cert.display(),
                config.key.display()
            ))
        })?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, BrokerError> {
    let fail =
        |reason: String| BrokerError::Tls(format!("certificate {}: {reason}", path.display()));
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(pem_error(&e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(pem_error(&e)))?;
    if chain.is_empty() {
        return Err(fail("no PEM CERTIFICATE block".into()));
    }
    Ok(chain)
}

/// pki-types says "no items found" for a file without the wanted PEM block; name the block.
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM certificate or key found".into(),
        other => other.to_string(),
    }
}

/// Serves TLS on `listener` (already bound, so the caller knows the port) on a thread of its
/// own, piping each connection to rumqttd at `backend`. At most `max_connections` sockets are
/// served at once (the broker's connection limit); further ones are closed at once.
pub(crate) fn spawn_front(
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    backend: SocketAddr,
    handshake_timeout: Duration,
    max_connections: usize,
) -> Result<JoinHandle<()>, BrokerError> {
    listener.set_nonblocking(true)?;
    // Built here, not on the thread, so a failure is reported to the caller.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("coevo-broker-tls".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        serve(
                            listener,
                            acceptor,
                            backend,
                            handshake_timeout,
                            max_connections,
                        )
                        .await
                    }
                    Err(e) => tracing::error!(error = %e, "TLS listener failed"),
                }
            })
        })
        .map_err(|e| BrokerError::Start(format!("cannot spawn TLS thread: {e}")))
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    backend: SocketAddr,
    handshake_timeout: Duration,
    max_connections: usize,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "TLS listener: accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, max_connections, "TLS connection refused: connection limit reached");
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match connect(tcp, &acceptor, backend, handshake_timeout).await {
                Ok((tls, upstream)) => {
                    tracing::debug!(%peer, "TLS connection established");
                    pipe(tls, upstream).await;
                }
                Err(reason) => tracing::warn!(%peer, "TLS connection dropped: {reason}"),
            }
        });
    }
}

/// Handshake (bounded by `timeout`), then a plain connection to rumqttd.
async fn connect(
    tcp: TcpStream,
    acceptor: &TlsAcceptor,
    backend: SocketAddr,
    timeout: Duration,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, TcpStream), String> {
    // MQTT is many small packets: don't let Nagle hold them back on either leg.
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
        Err(_) => return Err(format!("no TLS handshake within {timeout:?}")),
    };
    let upstream = TcpStream::connect(backend)
        .await
        .map_err(|e| format!("cannot reach the MQTT broker at {backend}: {e}"))?;
    let _ = upstream.set_nodelay(true);
    Ok((tls, upstream))
}

/// Copies both ways until either side ends, then closes both. (Not `copy_bidirectional`: it
/// waits for *both* directions, so a client that vanished without a FIN would keep its task
/// and slot after rumqttd dropped it for a missed keep-alive.)
async fn pipe(
    client: impl AsyncRead + AsyncWrite + Unpin,
    broker: impl AsyncRead + AsyncWrite + Unpin,
) {
    let (client_rx, mut client_tx) = tokio::io::split(client);
    let (broker_rx, mut broker_tx) = tokio::io::split(broker);
    let up = async {
        let r = tokio::io::copy_buf(
            &mut BufReader::with_capacity(PIPE_BUFFER, client_rx),
            &mut broker_tx,
        )
        .await;
        let _ = broker_tx.shutdown().await;
        r
    };
    let down = async {
        let r = tokio::io::copy_buf(
            &mut BufReader::with_capacity(PIPE_BUFFER, broker_rx),
            &mut client_tx,
        )
        .await;
        // Sends TLS close_notify after everything rumqttd wrote (e.g. a refused CONNACK).
        let _ = client_tx.shutdown().await;
        r
    };
    let result = tokio::select! {
        r = up => r,
        r = down => r,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "TLS connection closed with an error");
    }
}
