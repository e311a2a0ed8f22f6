//! Plumbing every layer may use: the boxed error of bodies and connections, the questions asked
//! of an error chain, and the TLS client connector (a leaf: it uses nothing of the crate).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

/// Boxed error of bodies and connections.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The connector for `http://` and `https://` upstreams.
pub type Connector = HttpsConnector<HttpConnector>;

/// Why a connector could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The extra CA file could not be read as PEM certificates.
    #[error("{path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// Why it was refused.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("{0}")]
    Config(String),
}

/// The connector for `http://` and `https://` upstreams: TCP with `TCP_NODELAY` and a connect
/// limit of `connect_timeout` (TLS handshake included), then rustls with the system roots plus
/// the PEM certificates of `ca_file`.
pub fn connector(connect_timeout: Duration, ca_file: Option<&Path>) -> Result<Connector, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        use rustls_pki_types::pem::PemObject;
        let ca_err = |reason: String| TlsError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_err(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_err("no certificate in the file".to_owned()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// Whether an I/O error of kind `TimedOut` is somewhere in `error`'s source chain (how the
/// connector reports its connect limit).
pub fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// An error and its sources, joined with ": ".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}
