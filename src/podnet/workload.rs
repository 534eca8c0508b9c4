//! `nodetune test-workload` (hidden): a stand-in for a busy proxy pod in the kubelet tests,
//! shipped in the nodetune image so the test cluster needs no second image. In the network
//! namespace it runs in, it holds `established` connected pairs (2 ESTABLISHED sockets each)
//! and `close_wait` connections the peer closed (CLOSE_WAIT on the held side), then closes
//! `churn_rate` short connections per second client-first (TIME_WAIT on the client side) for
//! `churn_seconds`, then holds everything until killed. Loopback only; bounded counts.
use std::io::{self, Read};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::Args;

/// Most sockets of each kind, so a typo cannot exhaust the node's ports or descriptors.
const MAX_HELD: usize = 10_000;

#[derive(Debug, Clone, Args)]
pub struct WorkloadArgs {
    /// Connected pairs held open (two ESTABLISHED sockets each).
    #[arg(long, default_value_t = 40)]
    pub established: usize,
    /// Connections the client closed and the server holds (CLOSE_WAIT).
    #[arg(long, default_value_t = 15)]
    pub close_wait: usize,
    /// Short connections per second, closed client-first (TIME_WAIT).
    #[arg(long, default_value_t = 20)]
    pub churn_rate: u32,
    /// How long the churn lasts (then only the held sockets stay).
    #[arg(long, default_value = "3600s", value_parser = |s: &str| crate::duration::parse(s).map_err(|e| e.to_string()))]
    pub churn_seconds: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("--{0} is above {MAX_HELD}")]
    TooMany(&'static str),
}

fn io(what: &'static str) -> impl FnOnce(io::Error) -> WorkloadError {
    move |source| WorkloadError::Io { what, source }
}

/// One connection to `listener`: (client side, server side).
fn pair(listener: &TcpListener) -> Result<(TcpStream, TcpStream), WorkloadError> {
    let addr = listener.local_addr().map_err(io("listener address"))?;
    let client = TcpStream::connect(addr).map_err(io("connect"))?;
    let (server, _) = listener.accept().map_err(io("accept"))?;
    Ok((client, server))
}

/// Runs until killed (or an error).
pub fn run(args: &WorkloadArgs) -> Result<(), WorkloadError> {
    if args.established > MAX_HELD {
        return Err(WorkloadError::TooMany("established"));
    }
    if args.close_wait > MAX_HELD {
        return Err(WorkloadError::TooMany("close-wait"));
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("listen"))?;
    let mut held = Vec::with_capacity(2 * args.established + args.close_wait);
    for _ in 0..args.established {
        let (c, s) = pair(&listener)?;
        held.extend([c, s]);
    }
    for _ in 0..args.close_wait {
        // The client's side closes and goes away (FIN_WAIT2, then gone); the server's waits.
        let (_client, server) = pair(&listener)?;
        held.push(server);
    }
    println!(
        "ready: {} ESTABLISHED, {} CLOSE_WAIT held",
        2 * args.established,
        args.close_wait
    );
    churn(&listener, args)?;
    println!("churn over; holding");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Client-first closes at `churn_rate` per second: the client's socket stays in TIME_WAIT.
fn churn(listener: &TcpListener, args: &WorkloadArgs) -> Result<(), WorkloadError> {
    if args.churn_rate == 0 {
        return Ok(());
    }
    let every = Duration::from_secs(1) / args.churn_rate;
    let end = Instant::now() + args.churn_seconds;
    while Instant::now() < end {
        let (client, mut server) = pair(listener)?;
        drop(client);
        // Wait for the client's FIN before closing, so the client closed first.
        let mut buf = [0u8; 1];
        let _ = server.read(&mut buf);
        drop(server);
        std::thread::sleep(every);
    }
    Ok(())
}
