//! The floor under any proxy on this machine: a TCP relay that copies bytes both ways and reads
//! none of them, on tokio's single-threaded runtime like tokentap's.
//!
//! `bench/run.py --targets relay` runs it as one more target. What it adds over a direct
//! connection is the cost of the hop alone (two more sockets per stream, and a wake-up of the
//! proxy's CPU per chunk); what a proxy adds over it is the cost of the proxy's own work.
//!
//! Usage: `relay LISTEN_ADDR UPSTREAM_ADDR`. Each accepted connection gets its own upstream
//! connection, closed when either side closes.

use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: relay LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(&listen).await?;
            loop {
                let mut client = match listener.accept().await {
                    Ok((client, _)) => client,
                    // Out of file descriptors, say: wait for some to be closed.
                    Err(e) => {
                        eprintln!("relay: accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        })
}
