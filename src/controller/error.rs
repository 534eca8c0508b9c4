//! Errors of the cluster loop. Each maps to a bounded metric label.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("connecting to the Kubernetes API: {0}")]
    Client(#[source] kube::Error),

    /// An API call on one object failed; the pass goes on with the other objects.
    #[error("{action} {object}: {source}")]
    Api {
        action: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },

    #[error("serving metrics on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("installing the signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

impl ControllerError {
    pub fn api(action: &'static str, object: impl Into<String>, source: kube::Error) -> Self {
        Self::Api {
            action,
            object: object.into(),
            source,
        }
    }

    /// Label for `nodetune_controller_errors_total{kind=...}`: an action, never an object name.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Client(_) => "client",
            Self::Api { action, .. } => action,
            Self::Http { .. } => "http",
            Self::Serialize { .. } => "serialize",
            Self::Signal(_) => "signal",
        }
    }

    /// A conflict (409) is expected under optimistic concurrency: retry on fresh data, no alarm.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Api { source: kube::Error::Api(s), .. } if s.is_conflict())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn labels_are_actions() {
        let e = ControllerError::api(
            "patch_status",
            "some-profile",
            kube::Error::LinesCodecMaxLineLengthExceeded,
        );
        assert_eq!(e.metric_label(), "patch_status");
        assert!(!e.to_string().is_empty());
        assert!(!e.is_conflict());
    }
}
