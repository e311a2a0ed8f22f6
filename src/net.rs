//! Plumbing every layer may use: the boxed error of bodies and connections, the questions asked
//! of an error chain, and the TLS client connector (a leaf: it uses nothing of the crate).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};

/// Boxed error of bodies and connections.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The connector for `http://` and `https://` upstreams.
pub type Connector = HttpsConnector<HttpConnector<Resolver>>;

/// How a connector finds the address of an upstream's host name.
#[derive(Clone, Debug)]
pub enum Resolver {
    /// The system's resolver, asked at each new connection; the first address that accepts
    /// the connection is used.
    System(GaiResolver),
    /// Always this address: an endpoint that is one of the addresses a name resolves to. The
    /// name stays the TLS server name (and the `Host` header), so certificates still verify.
    Pinned(IpAddr),
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        match self {
            Resolver::System(gai) => {
                let resolving = gai.call(name);
                Box::pin(async move { Ok(resolving.await?.collect::<Vec<_>>().into_iter()) })
            }
            // Port 0: the connector puts the URL's port in.
            Resolver::Pinned(ip) => {
                let addr = SocketAddr::new(*ip, 0);
                Box::pin(std::future::ready(Ok(vec![addr].into_iter())))
            }
        }
    }
}

/// Makes connectors that share one TLS configuration: one that resolves host names at each
/// connection, or one pinned to an address.
#[derive(Clone, Debug)]
pub struct Connectors {
    tls: Arc<rustls::ClientConfig>,
    /// A digest of the extra CA certificates (0 without any): what the file held when it was
    /// read, so that a reload can tell a rotated certificate from an unchanged one.
    ca_digest: u64,
    connect_timeout: Duration,
}

impl Connectors {
    /// TCP with `TCP_NODELAY` and a connect limit of `connect_timeout` (TLS handshake
    /// included), then rustls with the system roots plus the PEM certificates of `ca_file`.
    pub fn new(connect_timeout: Duration, ca_file: Option<&Path>) -> Result<Connectors, TlsError> {
        let (tls, ca_digest) = tls_config(ca_file)?;
        Ok(Connectors {
            tls: Arc::new(tls),
            ca_digest,
            connect_timeout,
        })
    }

    /// The same TLS configuration with another connect limit.
    pub fn with_timeout(&self, connect_timeout: Duration) -> Connectors {
        Connectors {
            tls: self.tls.clone(),
            ca_digest: self.ca_digest,
            connect_timeout,
        }
    }

    /// A digest of the extra CA certificates it trusts (0 without any): equal for the same
    /// certificates, whatever file they were read from.
    pub fn ca_digest(&self) -> u64 {
        self.ca_digest
    }

    /// The connect limit.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// A connector that resolves the host name at each new connection.
    pub fn system(&self) -> Connector {
        self.build(Resolver::System(GaiResolver::new()))
    }

    /// A connector that connects to `ip` whatever the host name.
    pub fn pinned(&self, ip: IpAddr) -> Connector {
        self.build(Resolver::Pinned(ip))
    }

    fn build(&self, resolver: Resolver) -> Connector {
        let mut http = HttpConnector::new_with_resolver(resolver);
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(self.connect_timeout));
        HttpsConnector::from((http, self.tls.clone()))
    }
}

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
    Ok(Connectors::new(connect_timeout, ca_file)?.system())
}

/// rustls with the system roots plus the PEM certificates of `ca_file`, and a digest of those
/// certificates.
fn tls_config(ca_file: Option<&Path>) -> Result<(rustls::ClientConfig, u64), TlsError> {
    use std::hash::{Hash, Hasher};
    let mut digest = 0;
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
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for cert in certs {
            cert.as_ref().hash(&mut hasher);
            roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
        }
        digest = hasher.finish() | 1;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    // No ALPN, as hyper-rustls leaves it for an HTTP/1.1-only connector: HTTP/1.1 is spoken.
    Ok((tls, digest))
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
