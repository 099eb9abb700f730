//! Serving the ext_proc service (and gRPC health, and keyswap's ADS when it is Envoy's control
//! plane) on TCP and/or a Unix socket.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;

use super::{ExtProc, Shared};

/// Buffered bodies can be large; tonic's default 4 MiB decode limit is too small for them.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// How long in-flight streams get to finish after SIGTERM before the process exits anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A listening socket, bound before serving so that callers (and tests) know the address.
pub enum Bound {
    Tcp(TcpListener),
    Uds(UnixListener, PathBuf),
}

impl Bound {
    pub async fn tcp(addr: SocketAddr) -> std::io::Result<Bound> {
        Ok(Bound::Tcp(TcpListener::bind(addr).await?))
    }

    /// Binds a Unix socket with permissions `mode`, replacing a stale socket file left by a
    /// previous run (one a live process still serves on is refused, not taken over). The socket is
    /// bound under a temporary name in a private directory, given its mode, then renamed into
    /// place: no one else can connect before the mode is set. The parent directory is created
    /// when missing: 0700, or 0750 when `mode` lets the group in (so that it can).
    pub fn uds(path: &Path, mode: u32) -> std::io::Result<Bound> {
        use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            let dir_mode = if mode & 0o070 != 0 { 0o750 } else { 0o700 };
            std::fs::DirBuilder::new().recursive(true).mode(dir_mode).create(dir)?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                // Stale only when refused: a socket another user serves (permission denied) is not.
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            "another process is serving on it (a second keyswap?): stop it, or give this one \
                             another socket path",
                        ))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("a socket is there and it cannot tell whether a process serves on it ({e}); remove it if none does"),
                        ))
                    }
                }
                std::fs::remove_file(path)?;
            } else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
        }
        // Bound inside a directory of its own (0700), so that no other user can connect in the
        // moment before its mode is set (a connection made then would outlive the change): beside
        // the socket (`.PID.d/s`), which a socket name of more than 2 bytes keeps within its path.
        let private = path.parent().unwrap_or(Path::new("")).join(format!(".{}.d", std::process::id()));
        // At most 107 bytes (`sun_path`), both: said as such, not as an error of a name not given.
        use std::os::unix::ffi::OsStrExt as _;
        let longest = path.as_os_str().len().max(private.join("s").as_os_str().as_bytes().len());
        if longest > 107 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the path is too long for a Unix socket ({longest} bytes with keyswap's temporary name beside it; at most 107): choose a shorter one"),
            ));
        }
        let _ = std::fs::remove_dir_all(&private);
        std::fs::DirBuilder::new().mode(0o700).create(&private)?;
        let tmp = private.join("s");
        let bound = UnixListener::bind(&tmp).and_then(|listener| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&tmp, path)?;
            Ok(listener)
        });
        let _ = std::fs::remove_dir_all(&private);
        Ok(Bound::Uds(bound?, path.to_path_buf()))
    }

    pub fn describe(&self) -> String {
        match self {
            Bound::Tcp(l) => l.local_addr().map(|a| format!("tcp://{a}")).unwrap_or_else(|_| "tcp://?".into()),
            Bound::Uds(_, p) => format!("unix://{}", p.display()),
        }
    }
}

/// Serves until `shutdown` resolves, then lets in-flight streams finish (up to [`DRAIN_TIMEOUT`]).
/// `ads`: Envoy's aggregated discovery service on the same Unix sockets (one cluster in Envoy's
/// bootstrap reaches both). Never on TCP: ADS hands out the leaf's private key, and a TCP port is
/// reachable by more than the socket's owner.
pub async fn run(
    shared: Arc<Shared>,
    listeners: Vec<Bound>,
    ads: Option<crate::envoy::ads::Ads>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ExternalProcessorServer<ExtProc>>().await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sweeper = super::observe::spawn_sweeper(&shared);
    let mut servers = tokio::task::JoinSet::new();
    for bound in listeners {
        let ads = ads.as_ref().filter(|_| matches!(bound, Bound::Uds(..)));
        match ads {
            Some(_) => tracing::info!(address = %bound.describe(), "ext_proc and ADS server listening"),
            None => tracing::info!(address = %bound.describe(), "ext_proc server listening"),
        }
        let svc =
            ExternalProcessorServer::new(ExtProc::new(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let router = Server::builder()
            .tcp_nodelay(true)
            .add_service(health_service.clone())
            .add_service(svc)
            .add_optional_service(ads.map(|a| a.service()));
        let mut rx = stop_rx.clone();
        let signal = async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        servers.spawn(async move {
            match bound {
                Bound::Tcp(l) => router.serve_with_incoming_shutdown(TcpListenerStream::new(l), signal).await,
                Bound::Uds(l, path) => {
                    let r = router.serve_with_incoming_shutdown(UnixListenerStream::new(l), signal).await;
                    let _ = std::fs::remove_file(path);
                    r
                }
            }
        });
    }
    tokio::select! {
        _ = shutdown => {
            tracing::info!("shutting down: no new connections, draining in-flight streams");
            if let Some(a) = &ads {
                a.close();
            }
            health_reporter.set_not_serving::<ExternalProcessorServer<ExtProc>>().await;
            let _ = stop_tx.send(true);
        }
        Some(res) = servers.join_next() => {
            // A server ended on its own: that is an error (e.g. the socket failed).
            res??;
            anyhow::bail!("ext_proc server stopped unexpectedly");
        }
    }
    let drain = async {
        while let Some(res) = servers.join_next().await {
            res??;
        }
        anyhow::Ok(())
    };
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    let drained = tokio::time::timeout_at(deadline, drain).await;
    sweeper.abort();
    // The connections are closed; their streams' tasks may still be dropping them (and handing
    // over their spans).
    let ended = shared.streams.ended(deadline).await;
    // State parked for an observing stream that can no longer come (the connections are closed):
    // ended as cut off now, so its span is flushed and its reservation settled before exit.
    super::observe::sweep(&shared, std::time::Instant::now(), Duration::ZERO);
    match drained {
        Ok(r) if ended => r,
        Ok(r) => {
            let open = shared.streams.count();
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, open, "streams still alive after the drain timeout; exiting anyway");
            r
        }
        Err(_) => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "streams still open after the drain timeout; exiting anyway");
            Ok(())
        }
    }
}

/// How many ext_proc streams are alive. Each hands its span to the exporter (and settles its
/// budget) when it is dropped, which hyper does on a task of the stream's own, possibly after its
/// connection has closed: shutdown waits for the count to reach zero before the exporter's last
/// flush.
pub type LiveStreams = crate::vocab::InFlight;

#[cfg(test)]
mod tests {
    use super::Bound;
    use std::os::unix::fs::PermissionsExt as _;

    /// `--uds-mode 660` with a shared group: a directory keyswap creates must let the group in,
    /// or Envoy (another user of the group) cannot reach the socket whatever its mode.
    #[tokio::test]
    async fn a_socket_for_a_shared_group_gets_a_directory_the_group_can_enter() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let _shared = Bound::uds(&dir.path().join("shared/k.sock"), 0o660).unwrap();
        assert_eq!(mode(&dir.path().join("shared")), 0o750);
        assert_eq!(mode(&dir.path().join("shared/k.sock")), 0o660);
        let _own = Bound::uds(&dir.path().join("own/k.sock"), 0o600).unwrap();
        assert_eq!(mode(&dir.path().join("own")), 0o700);
    }

    /// A socket path within the 107 bytes Unix allows was refused when keyswap's temporary name
    /// (the path plus `.PID.d/s`) went past it, with an error naming the path given, which
    /// looked legal. Up to 107 bytes binds now; past it, the error says why.
    #[tokio::test]
    async fn a_socket_path_the_limit_allows_binds_and_a_longer_one_is_named_too_long() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap().len();
        let deep = |total: usize| {
            let filler = "d".repeat(total - base - 1 - 1 - "keyswap.sock".len());
            let d = dir.path().join(&filler);
            std::fs::create_dir_all(&d).unwrap();
            d.join("keyswap.sock")
        };
        let at_limit = deep(107);
        assert_eq!(at_limit.as_os_str().len(), 107);
        Bound::uds(&at_limit, 0o600).expect("a 107-byte socket path");
        let err = Bound::uds(&deep(108), 0o600).err().expect("a 108-byte socket path bound");
        assert!(err.to_string().contains("too long for a Unix socket"), "{err}");
    }

    /// A stale socket (its process gone) is replaced; a live one is not taken over.
    #[tokio::test]
    async fn a_live_socket_is_never_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.sock");
        let first = Bound::uds(&path, 0o600).unwrap();
        let err = Bound::uds(&path, 0o600).err().expect("a second server took over the live socket");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        drop(first);
        assert!(path.exists(), "the stale socket file stays behind");
        Bound::uds(&path, 0o600).expect("a stale socket is replaced");
    }
}
