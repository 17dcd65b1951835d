//! TLS: coevo terminates TLS itself in the front end ([`crate::front`]) and pipes the decrypted
//! bytes to rumqttd, which listens on a loopback-only port. This module loads the identity.
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
//! broker host. That port accepts only the front end's per-process secret, so it cannot be
//! used to bypass authentication or the topic ACLs.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::BrokerError;

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
