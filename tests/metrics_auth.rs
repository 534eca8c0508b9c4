//! Authenticated `/metrics` (issue 17, item 3) against a real kube-apiserver: the agent's HTTP
//! server, reviewing tokens with only the RBAC the chart gives the agent (create tokenreviews
//! and subjectaccessreviews), serves a scraper whose ServiceAccount may `get` the
//! non-resource URL `/metrics`, refuses one that may not (403) and a missing or made-up token
//! (401), and keeps the probes open. Needs root and the control-plane binaries
//! (tests/cluster/build).
//!
//! Run: cargo test --test metrics_auth -- --include-ignored --nocapture

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use nodetune::agent::metrics::AgentMetrics;
use nodetune::http::{self, auth::KubeAuthorizer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::Cluster;

/// ServiceAccounts in `default`, RBAC as the chart renders it for the agent (its review
/// rules) and for a scraper (the nodetune-metrics-reader ClusterRole).
fn rbac() -> String {
    let accounts: String = ["agent", "scraper", "stranger"]
        .iter()
        .map(|sa| {
            format!(
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: default}}\n---\n"
            )
        })
        .collect();
    let reviews = r#"
  - apiGroups: ["authentication.k8s.io"]
    resources: ["tokenreviews"]
    verbs: ["create"]
  - apiGroups: ["authorization.k8s.io"]
    resources: ["subjectaccessreviews"]
    verbs: ["create"]"#;
    let reader = r#"
  - nonResourceURLs: ["/metrics"]
    verbs: ["get"]"#;
    format!(
        "{accounts}{}---\n{}",
        role_bound_to("test-agent-reviews", "agent", reviews),
        role_bound_to("test-metrics-reader", "scraper", reader)
    )
}

/// A ClusterRole with `rules` and its binding to the ServiceAccount `sa` in `default`.
fn role_bound_to(name: &str, sa: &str, rules: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {name}}}
rules:{rules}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {name}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {name}}}
subjects: [{{kind: ServiceAccount, name: {sa}, namespace: default}}]
"
    )
}

async fn token(cluster: &Cluster, sa: &str) -> Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(cluster.client(), "default");
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    let resp = api
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .with_context(|| format!("TokenRequest for {sa}"))?;
    resp.status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .context("no token")
}

/// A client of the API server that authenticates with `token` (the admin kubeconfig's
/// cluster, another user).
async fn client_with(cluster: &Cluster, token: &str) -> Result<kube::Client> {
    let mut doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(cluster.kubeconfig())?)?;
    doc["users"][0]["user"] = serde_yaml::from_str(&format!("{{token: {token}}}"))?;
    let kubeconfig = Kubeconfig::from_yaml(&serde_yaml::to_string(&doc)?)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// One request; the status line and the body.
async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<(String, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut out))
        .await
        .context("no answer")??;
    let status = out.lines().next().unwrap_or_default().to_string();
    let body = out
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control plane (tests/cluster/build); run with --ignored"]
async fn metrics_need_a_token_allowed_to_get_metrics() {
    let Some(bin) = support::cluster_prereqs("metrics_need_a_token_allowed_to_get_metrics") else {
        return;
    };
    let cluster = Cluster::start(&bin).await.expect("cluster");
    if let Err(e) = scenario(&cluster).await {
        panic!("{e:#}\n{}", cluster.diagnostics());
    }
}

async fn scenario(cluster: &Cluster) -> Result<()> {
    let mut apply = cluster.kubectl();
    apply
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped());
    let mut child = apply.spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rbac().as_bytes())
        .await?;
    anyhow::ensure!(child.wait().await?.success(), "kubectl apply RBAC");

    let agent = client_with(cluster, &token(cluster, "agent").await?).await?;
    let metrics = Arc::new(AgentMetrics::default());
    metrics.passes.inc();
    let options = http::Options {
        auth: Some(Arc::new(KubeAuthorizer::new(agent))),
        ..http::Options::default()
    };
    let (addr, server) = http::serve_with(
        "127.0.0.1:0".parse()?,
        metrics,
        options,
        std::future::pending(),
    )
    .await?;

    let scraper = token(cluster, "scraper").await?;
    let (status, body) = get(addr, "/metrics", Some(&scraper)).await?;
    anyhow::ensure!(
        status.starts_with("HTTP/1.1 200"),
        "scraper: {status} {body}"
    );
    anyhow::ensure!(
        body.contains("nodetune_agent_passes_total 1"),
        "scraper: {body}"
    );
    // Answered again from the cache, the same.
    let (status, _) = get(addr, "/metrics", Some(&scraper)).await?;
    anyhow::ensure!(
        status.starts_with("HTTP/1.1 200"),
        "scraper again: {status}"
    );

    let stranger = token(cluster, "stranger").await?;
    let (status, body) = get(addr, "/metrics", Some(&stranger)).await?;
    anyhow::ensure!(
        status.starts_with("HTTP/1.1 403"),
        "stranger: {status} {body}"
    );
    anyhow::ensure!(
        body == "system:serviceaccount:default:stranger may not get /metrics\n",
        "stranger: {body:?}"
    );
    anyhow::ensure!(!body.contains("nodetune_"), "stranger sees metrics: {body}");

    for (who, t) in [("no token", None), ("made-up token", Some("not.a.token"))] {
        let (status, body) = get(addr, "/metrics", t).await?;
        anyhow::ensure!(status.starts_with("HTTP/1.1 401"), "{who}: {status} {body}");
    }
    // The kubelet's probes carry no token and stay open.
    let (status, _) = get(addr, "/healthz", None).await?;
    anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "/healthz: {status}");
    server.abort();
    Ok(())
}
