//! Errors that stop the agent process. Each maps to a bounded metric label.
use crate::sysctl::LedgerError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot use the ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
    #[error("cannot handle SIGTERM: {0}")]
    Signal(#[source] std::io::Error),
}

impl AgentError {
    /// A label for logs and metrics: the kind of failure, never an object name or a path.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Ledger(_) => "ledger",
            Self::Client(_) => "client",
            Self::Metrics { .. } => "http",
            Self::WatchEnded(_) => "watch_ended",
            Self::Signal(_) => "signal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_kinds() {
        let e = AgentError::WatchEnded("initial");
        assert_eq!(e.metric_label(), "watch_ended");
        assert_eq!(e.to_string(), "the initial watch ended");
    }
}
