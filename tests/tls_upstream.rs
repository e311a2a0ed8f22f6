//! An `https://` upstream: trusted through `upstream.ca_file`, refused without it.

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// Starts an HTTPS server for `localhost` on 127.0.0.1:0 and returns its port and the PEM of
/// the CA that signed its certificate.
async fn tls_upstream() -> (u16, String) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(b"{\"over\":\"tls\"}")))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, ca.pem())
}

#[tokio::test]
async fn https_upstream_is_trusted_through_ca_file_only() {
    let (port, ca_pem) = tls_upstream().await;
    let dir = std::env::temp_dir().join(format!("tokentap-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let upstream = format!("https://localhost:{port}");

    let mut config = proxy_config(&upstream);
    config.telemetry.discover_models = false;
    config.upstream.ca_file = Some(ca_file);
    let proxy = tokentap::start(config).await.unwrap();
    let r = send(
        &client(),
        http::Method::GET,
        &format!("http://{}/v1/models", proxy.addr()),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"{\"over\":\"tls\"}");
    proxy.shutdown().await;

    // Without the CA the certificate is unknown: the handshake fails and the client gets 502.
    let mut config = proxy_config(&upstream);
    config.telemetry.discover_models = false;
    let proxy = tokentap::start(config).await.unwrap();
    let r = post(
        &client(),
        &format!("http://{}/v1/chat/completions", proxy.addr()),
        &chat_body(2, true, ""),
    )
    .await;
    assert_eq!(r.status, 502);
    let m = scrape(proxy.admin_addr().unwrap()).await;
    assert_eq!(requests_total(&m, "connect_error", "502"), 1.0);
    proxy.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_ca_file_without_certificates_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("tokentap-tls-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("empty.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let mut config = proxy_config("https://localhost:1");
    config.upstream.ca_file = Some(bad);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(tokentap::start(config)).unwrap_err();
    assert!(err.to_string().contains("upstream.ca_file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
