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

/// A server answering every request with `ok`, with 30 s of grace: its address, the sender
/// that starts its drain, and its task.
async fn ok_server() -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handler = |_req: Request<ClientBody>, _remote: SocketAddr| async {
        Response::new(
            http_body_util::Full::new(Bytes::from_static(b"ok")).map_err(|never| match never {}),
        )
    };
    let server = tokio::spawn(serve(
        listener,
        handler,
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(30),
        "test",
        Limits::default(),
        ConnMetrics::noop(),
    ));
    (addr, stop, server)
}

#[tokio::test]
async fn a_connection_that_sent_nothing_does_not_hold_up_the_drain() {
    let (addr, stop, server) = ok_server().await;
    let _silent = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("drained without waiting for the silent connection")
        .unwrap();
}

/// The drain wakes and closes keep-alive connections that sit idle between requests.
#[tokio::test]
async fn the_drain_closes_idle_keep_alive_connections() {
    use tokio::io::AsyncReadExt;
    let (addr, stop, server) = ok_server().await;
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"ok") {
            let mut buf = [0u8; 256];
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the response");
            got.extend_from_slice(&buf[..n]);
        }
        clients.push(c);
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("drained without waiting out the grace period")
        .unwrap();
    for mut c in clients {
        let mut buf = [0u8; 16];
        assert_eq!(c.read(&mut buf).await.unwrap(), 0, "closed by the server");
    }
}

/// A drain that began before a watched connection was first polled still shuts it down:
/// an idle HTTP/1.1 connection, whose client stays open and silent, ends only that way.
#[tokio::test]
async fn a_connection_watched_after_the_drain_began_is_shut_down() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let drain = Drain::new();
    let watcher = drain.watcher();
    let stopping = tokio::spawn(drain.shutdown());
    tokio::task::yield_now().await;
    let service = service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::time::timeout(Duration::from_secs(5), watcher.watch(conn))
        .await
        .expect("shut down")
        .unwrap();
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_connection_closed_early_goes_to_http1() {
    assert!(!sniff(&[]).await);
    assert!(!sniff(&[b"PR"]).await);
}
