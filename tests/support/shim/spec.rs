//! What the kubelet computes from a pod spec before it starts a container (the subset the
//! tests use): the environment, hostPath mounts mapped into the node's root directory, and
//! `$(VAR)` expansion.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::api::Api;

use super::ShimNode;

/// Resolves a container's environment like the kubelet does (the subset tests use).
pub(super) async fn resolve_env(
    client: &kube::Client,
    pod: &Pod,
    c: &Container,
    node: &ShimNode,
) -> anyhow::Result<Vec<(String, String)>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(k2, _)| *k2 != k);
        env.push((k, v));
    };
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match Api::<ConfigMap>::namespaced(client.clone(), ns)
                .get(&r.name)
                .await
            {
                Ok(cm) => {
                    for (k, v) in cm.data.unwrap_or_default() {
                        set(&mut env, format!("{prefix}{k}"), v);
                    }
                }
                Err(_) if r.optional == Some(true) => {}
                Err(e) => return Err(e).with_context(|| format!("envFrom configmap {}", r.name)),
            }
        }
        if let Some(r) = &from.secret_ref {
            match Api::<Secret>::namespaced(client.clone(), ns)
                .get(&r.name)
                .await
            {
                Ok(s) => {
                    for (k, v) in s.data.unwrap_or_default() {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v.0).into_owned(),
                        );
                    }
                }
                Err(_) if r.optional == Some(true) => {}
                Err(e) => return Err(e).with_context(|| format!("envFrom secret {}", r.name)),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &env)
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                field_value(pod, node, &f.field_path).with_context(|| {
                    format!("env {}: unsupported fieldRef {}", e.name, f.field_path)
                })?
            } else if let Some(r) = &from.config_map_key_ref {
                let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
                    .get_opt(&r.name)
                    .await?;
                match cm
                    .and_then(|cm| cm.data)
                    .and_then(|d| d.get(&r.key).cloned())
                {
                    Some(v) => v,
                    None if r.optional == Some(true) => continue,
                    None => anyhow::bail!(
                        "env {}: configmap key {}/{} not found",
                        e.name,
                        r.name,
                        r.key
                    ),
                }
            } else if let Some(r) = &from.secret_key_ref {
                let s = Api::<Secret>::namespaced(client.clone(), ns)
                    .get_opt(&r.name)
                    .await?;
                match s.and_then(|s| s.data).and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => String::from_utf8_lossy(&v.0).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => {
                        anyhow::bail!("env {}: secret key {}/{} not found", e.name, r.name, r.key)
                    }
                }
            } else {
                // resourceFieldRef and others: not emulated.
                continue;
            }
        } else {
            String::new()
        };
        set(&mut env, e.name.clone(), value);
    }
    Ok(env)
}

fn field_value(pod: &Pod, node: &ShimNode, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let key_in = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key).cloned())
                .unwrap_or_default(),
        )
    };
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => Some(node.name.clone()),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone()),
        "status.hostIP" | "status.podIP" | "status.hostIPs" | "status.podIPs" => {
            Some(node.ip.clone())
        }
        _ => key_in("metadata.labels['", &meta.labels)
            .or_else(|| key_in("metadata.annotations['", &meta.annotations)),
    }
}

/// `$(VAR)` expansion as the kubelet does for env values, command and args; `$$` escapes.
pub(super) fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// (mountPath, host path) pairs for hostPath volume mounts, longest mountPath first.
pub(super) fn host_mounts(pod: &Pod, c: &Container, node: &ShimNode) -> Vec<(String, PathBuf)> {
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(hp) = volumes
            .iter()
            .find(|v| v.name == m.name)
            .and_then(|v| v.host_path.as_ref())
        else {
            continue;
        };
        let real = ["/proc", "/sys", "/dev"]
            .iter()
            .any(|p| hp.path == *p || hp.path.starts_with(&format!("{p}/")));
        let mut target = if real {
            PathBuf::from(&hp.path)
        } else {
            node.root.join(hp.path.trim_start_matches('/'))
        };
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            target = target.join(sub);
        }
        if !real {
            let file_like = matches!(
                hp.type_.as_deref(),
                Some("File" | "FileOrCreate" | "Socket" | "CharDevice" | "BlockDevice")
            );
            let dir = if file_like {
                target.parent().map(Path::to_path_buf)
            } else {
                Some(target.clone())
            };
            if let Some(d) = dir {
                let _ = std::fs::create_dir_all(d);
            }
            if hp.type_.as_deref() == Some("FileOrCreate") {
                let _ = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&target);
            }
        }
        out.push((m.mount_path.trim_end_matches('/').to_string(), target));
    }
    out.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    out
}

/// How often the shim re-projects the ConfigMap volumes of running containers. A kubelet does
/// it on its pod sync (`syncFrequency`, 1 min by default, plus jitter); the shim is quicker so
/// tests stay short, and the agent's bound is stated for the kubelet's figure (README).
pub const CONFIG_MAP_SYNC: Duration = Duration::from_secs(5);

/// (mountPath, directory) pairs for ConfigMap volume mounts: each key of the ConfigMap is
/// written as a file under the pod's directory on the node, as the kubelet projects it. Each
/// file is replaced atomically (a reader never sees half a policy) and keys no longer in the
/// ConfigMap are removed, so [`refresh_config_maps`] can call it again. A missing ConfigMap is
/// an error unless the volume is optional, as on a kubelet.
pub(super) async fn config_map_mounts(
    client: &kube::Client,
    pod: &Pod,
    c: &Container,
    node: &ShimNode,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(src) = volumes
            .iter()
            .find(|v| v.name == m.name)
            .and_then(|v| v.config_map.as_ref())
        else {
            continue;
        };
        let dir = node
            .root
            .join("var/lib/shim-volumes")
            .join(pod_name)
            .join(&m.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        match api.get_opt(&src.name).await? {
            Some(cm) => project(&dir, cm.data.unwrap_or_default())?,
            None if src.optional == Some(true) => {}
            None => anyhow::bail!("configmap {ns}/{} not found", src.name),
        }
        out.push((m.mount_path.trim_end_matches('/').to_string(), dir));
    }
    Ok(out)
}

/// Writes each key as a file in `dir` (temporary file, then rename) and removes the files of
/// keys that are gone.
fn project(dir: &Path, data: BTreeMap<String, String>) -> anyhow::Result<()> {
    for (key, value) in &data {
        let path = dir.join(key);
        let tmp = dir.join(format!(".{key}.tmp"));
        std::fs::write(&tmp, value).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && !data.contains_key(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// Re-projects the container's ConfigMap volumes every [`CONFIG_MAP_SYNC`], as a kubelet's pod
/// sync does; runs until aborted. A failed refresh keeps the files as they were.
pub(super) async fn refresh_config_maps(
    client: kube::Client,
    pod: Pod,
    c: Container,
    node: ShimNode,
) {
    loop {
        tokio::time::sleep(CONFIG_MAP_SYNC).await;
        let _ = config_map_mounts(&client, &pod, &c, &node).await;
    }
}

/// Rewrites a leading mount path (also after `--flag=`) to its host path.
pub(super) fn map_path(s: &str, mounts: &[(String, PathBuf)]) -> String {
    let map_one = |v: &str| -> Option<String> {
        mounts.iter().find_map(|(mp, target)| {
            let rest = v.strip_prefix(mp.as_str())?;
            (rest.is_empty() || rest.starts_with('/'))
                .then(|| format!("{}{rest}", target.display()))
        })
    };
    if let Some(m) = map_one(s) {
        return m;
    }
    if let Some((flag, value)) = s.split_once('=')
        && let Some(m) = map_one(value)
    {
        return format!("{flag}={m}");
    }
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_vars() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)/$(B)/$$(A)", &env), "x/$(B)/$(A)");
    }

    #[test]
    fn maps_paths() {
        let mounts = vec![(
            "/var/lib/nodetune".to_string(),
            PathBuf::from("/n/root/var/lib/nodetune"),
        )];
        assert_eq!(
            map_path("/var/lib/nodetune/x", &mounts),
            "/n/root/var/lib/nodetune/x"
        );
        assert_eq!(
            map_path("--state=/var/lib/nodetune", &mounts),
            "--state=/n/root/var/lib/nodetune"
        );
        assert_eq!(
            map_path("/var/lib/nodetunex", &mounts),
            "/var/lib/nodetunex"
        );
    }
}
