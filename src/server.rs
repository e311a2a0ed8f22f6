//! Accept loop: HTTP/1.1 (keep-alive) and HTTP/2 without TLS on one port, graceful drain.
//!
//! The protocol is chosen by peeking at the first bytes of a connection (HTTP/2 starts with the
//! `PRI * HTTP/2.0` preface, which is not a valid HTTP/1.1 request), so hyper then reads the
//! whole request from the socket itself: no bytes are read ahead and replayed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use crate::observe::BoxError;

/// Serves `handler` on `listener` until `shutdown` resolves, then stops accepting and waits up
/// to `grace` for open connections to finish their requests. Accept errors (for example too many
/// open files) are logged and retried after a short pause; they never end the loop.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    name: &'static str,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = bytes::Bytes, Error = BoxError> + Send + 'static,
{
    let handler = Arc::new(handler);
    let h1 = http1::Builder::new();
    let h2 = http2::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    // Tells connections that have not sent their first bytes yet (so are not watched by
    // `graceful`) that the server is draining.
    let (draining, drain_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| Answer {
            response: handler(req, remote),
        });
        let (h1, h2, watcher) = (h1.clone(), h2.clone(), graceful.watcher());
        let mut drain_rx = drain_rx.clone();
        // No tracing span around the connection: entering it on every poll costs ~1 % of the
        // CPU per forwarded chunk; the one log line below names the connection instead.
        tokio::spawn(async move {
            let h2_prior = tokio::select! {
                h2_prior = is_http2(&stream) => h2_prior,
                _ = drain_rx.wait_for(|draining| *draining) => return,
            };
            let result = if h2_prior {
                // Boxed: an HTTP/2 connection's state is twice an HTTP/1.1 one's, and inline it
                // would size every connection's task.
                Box::pin(watcher.watch(h2.serve_connection(TokioIo::new(stream), service))).await
            } else {
                watcher
                    .watch(h1.serve_connection(TokioIo::new(stream), service))
                    .await
            };
            if let Err(error) = result {
                tracing::debug!(listener = name, %remote, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = draining.send(true);
    tracing::info!(
        listener = name,
        grace_secs = grace.as_secs_f64(),
        "draining connections"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = name, "all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(listener = name, "grace period over; closing remaining connections"),
    }
}

pin_project_lite::pin_project! {
    /// The handler's future as a service's: its response as `Ok`. No async block around it, so
    /// that hyper boxes exactly the handler's state.
    struct Answer<F> {
        #[pin]
        response: F,
    }
}

impl<F: Future> Future for Answer<F> {
    type Output = Result<F::Output, Infallible>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.project().response.poll(cx).map(Ok)
    }
}

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4); no HTTP/1.1 method is `PRI`.
const H2_START: &[u8] = b"PRI ";

/// Whether a new connection speaks HTTP/2 (prior knowledge), judged from its first bytes
/// without consuming them. Waits until enough bytes arrived to tell; a connection that closes or
/// fails first is handed to HTTP/1.1, which reports it.
async fn is_http2(stream: &TcpStream) -> bool {
    let mut start = [0u8; H2_START.len()];
    // Bounded, so a client that sends one byte and stalls costs no more than a few wake-ups.
    for _ in 0..50 {
        let n = match stream.peek(&mut start).await {
            Ok(n) => n,
            Err(_) => return false,
        };
        if n == 0 || start[..n] != H2_START[..n] {
            return false;
        }
        if n == start.len() {
            return true;
        }
        // A prefix of "PRI " arrived on its own: the rest is in flight. `peek` returns at once
        // while bytes are queued, so wait a little before looking again.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    /// `is_http2` on the accepted side of a connection whose client writes `parts` with a pause
    /// between them, then closes.
    async fn sniff(parts: &[&'static [u8]]) -> bool {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let parts = parts.to_vec();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.set_nodelay(true).unwrap();
            for part in parts {
                c.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let (server, _) = listener.accept().await.unwrap();
        let verdict = is_http2(&server).await;
        client.await.unwrap();
        verdict
    }

    #[tokio::test]
    async fn the_http2_preface_is_told_from_http1_requests() {
        assert!(sniff(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).await);
        assert!(!sniff(&[b"POST /v1/chat/completions HTTP/1.1\r\n"]).await);
        assert!(!sniff(&[b"PUT / HTTP/1.1\r\n"]).await);
        assert!(!sniff(&[b"GET / HTTP/1.1\r\n"]).await);
    }

    #[tokio::test]
    async fn a_preface_split_across_packets_waits_for_the_rest() {
        assert!(sniff(&[b"PR", b"I * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).await);
        assert!(!sniff(&[b"P", b"OST / HTTP/1.1\r\n"]).await);
    }

    #[tokio::test]
    async fn a_connection_that_sent_nothing_does_not_hold_up_the_drain() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handler = |_req: Request<Incoming>, _remote: SocketAddr| async {
            Response::new(http_body_util::Empty::new().map_err(|never| match never {}))
        };
        let server = tokio::spawn(serve(
            listener,
            handler,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(30),
            "test",
        ));
        let _silent = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("drained without waiting for the silent connection")
            .unwrap();
    }

    #[tokio::test]
    async fn a_connection_closed_early_goes_to_http1() {
        assert!(!sniff(&[]).await);
        assert!(!sniff(&[b"PR"]).await);
    }
}
