//! The local commands: glue between the CLI and the library, I/O at the edge. Each returns the
//! process exit code.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use nodetune::api::{KeyState, Mode, NodeTuningProfile};
use nodetune::plan::{self, Current, Merged};
use nodetune::sysctl::{self, KeyResult, Ledger, SysctlFs, SysctlIoError};
use nodetune::tcpstat::{self, SnapshotOptions};
use nodetune::{convert, manifest, selector};

use crate::cli::{ApplyArgs, ConvertArgs, CrdArgs, Output, PlanArgs, RestoreArgs, TcpstatArgs};

/// Some key was not applied (the others were).
pub const EXIT_PARTIAL: i32 = 2;

pub async fn tcpstat(args: TcpstatArgs) -> Result<i32> {
    let options = SnapshotOptions {
        source: args.source,
        ..Default::default()
    };
    loop {
        let snap = tcpstat::snapshot_with(&options).context("counting TCP sockets")?;
        match args.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&snap)?),
            Output::Table => print!("{}", tcpstat::render_table(&snap)),
        }
        let Some(secs) = args.watch else { return Ok(0) };
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(secs.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}

fn load_profiles(path: &Path) -> Result<Vec<NodeTuningProfile>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let profiles =
        manifest::parse_profiles(&text).with_context(|| format!("in {}", path.display()))?;
    for p in profiles.iter().filter(|p| p.spec.node_selector.is_some()) {
        eprintln!(
            "note: profile {} has a nodeSelector; local commands act on this machine regardless",
            p.metadata.name.as_deref().unwrap_or_default()
        );
    }
    Ok(profiles)
}

fn read_current(fs: &SysctlFs, merged: &Merged) -> BTreeMap<String, Current> {
    merged
        .desired
        .iter()
        .map(|(k, d)| {
            let cur = match fs.read(&d.key) {
                Ok(v) => Current::Value(v),
                Err(SysctlIoError::NotFound { .. }) => Current::Missing,
                Err(e) => Current::Unreadable(e.to_string()),
            };
            (k.clone(), cur)
        })
        .collect()
}

/// Cross-key warnings for the winning values, with the current TIME_WAIT count when countable.
fn warnings(merged: &Merged) -> Vec<sysctl::Warning> {
    let time_wait = tcpstat::snapshot().ok().map(|s| s.sockstat.tcp_tw);
    sysctl::checks::check(merged.desired.iter().map(|(k, d)| (k, &d.value)), time_wait)
}

pub fn plan(args: PlanArgs) -> Result<i32> {
    let profiles = load_profiles(&args.file)?;
    let merged = plan::merge(profiles.iter());
    let items = plan::diff(&merged, &read_current(&SysctlFs::default(), &merged));
    let warnings = warnings(&merged);
    match args.output {
        Output::Json => {
            let overridden: Vec<_> = merged
                .overridden
                .iter()
                .map(|o| serde_json::json!({"key": o.key, "profile": o.profile, "value": o.value, "winner": o.winner}))
                .collect();
            let out =
                serde_json::json!({"items": items, "overridden": overridden, "warnings": warnings});
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|i| {
                    vec![
                        i.key.clone(),
                        i.scope
                            .map(|s| s.as_str().to_string())
                            .unwrap_or_else(|| "-".into()),
                        i.current
                            .clone()
                            .map(|v| sysctl::value::normalize(&v))
                            .unwrap_or_else(|| "-".into()),
                        i.desired.clone(),
                        i.action.as_str().to_string(),
                        i.message.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["KEY", "SCOPE", "CURRENT", "DESIRED", "ACTION", "NOTE"],
                    &rows
                )
            );
            for o in &merged.overridden {
                println!(
                    "overridden: {} from {} (wins: {})",
                    o.key, o.profile, o.winner
                );
            }
            for w in &warnings {
                println!("warning: {}: {}", w.key, w.message);
            }
        }
    }
    Ok(0)
}

fn load_ledger(state_dir: &Path) -> Result<Ledger> {
    let loaded = Ledger::load(state_dir)
        .with_context(|| format!("loading the ledger in {}", state_dir.display()))?;
    if let Some(aside) = &loaded.set_aside {
        eprintln!(
            "warning: the ledger was unreadable and has been moved to {} ({}); the originals it held are no longer restored automatically",
            aside.moved_to.display(),
            aside.reason
        );
    }
    Ok(loaded.ledger)
}

pub fn apply(args: ApplyArgs) -> Result<i32> {
    let profiles = load_profiles(&args.file)?;
    let merged = plan::merge(profiles.iter());
    let fs = SysctlFs::default();
    let mut ledger = load_ledger(&args.state.state_dir)?;
    for w in warnings(&merged) {
        eprintln!("warning: {}: {}", w.key, w.message);
    }
    let mut results: Vec<KeyResult> = merged
        .desired
        .values()
        .map(|d| match d.mode {
            Mode::Enforce => sysctl::apply_one(
                &fs,
                &mut ledger,
                &d.key.to_string(),
                &d.value,
                Some(&d.profile),
            ),
            Mode::DryRun => sysctl::dry_run_one(&fs, Some(&ledger), &d.key.to_string(), &d.value),
        })
        .collect();
    // Rejected keys go through the engine too, which refuses them with the same per-key states.
    results.extend(
        merged
            .rejected
            .iter()
            .map(|r| sysctl::apply_one(&fs, &mut ledger, &r.key, &r.value, Some(&r.profile))),
    );
    print_results(&results, args.output)?;
    let ok = results
        .iter()
        .all(|r| matches!(r.state, KeyState::Applied | KeyState::DryRun));
    Ok(if ok { 0 } else { EXIT_PARTIAL })
}

pub fn restore(args: RestoreArgs) -> Result<i32> {
    let fs = SysctlFs::default();
    let mut ledger = load_ledger(&args.state.state_dir)?;
    let results = sysctl::restore_all(&fs, &mut ledger);
    if results.is_empty() && args.output == Output::Table {
        println!(
            "nothing to restore: the ledger in {} is empty",
            args.state.state_dir.display()
        );
        return Ok(0);
    }
    print_results(&results, args.output)?;
    let ok = results.iter().all(|r| r.state == KeyState::Restored);
    Ok(if ok { 0 } else { EXIT_PARTIAL })
}

fn print_results(results: &[KeyResult], output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(results)?),
        Output::Table => {
            let dash = |v: &Option<String>| {
                v.as_deref()
                    .map(sysctl::value::normalize)
                    .unwrap_or_else(|| "-".into())
            };
            let rows: Vec<Vec<String>> = results
                .iter()
                .map(|r| {
                    vec![
                        r.key.clone(),
                        format!("{:?}", r.state),
                        dash(&r.previous),
                        dash(&r.actual),
                        r.message.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["KEY", "STATE", "PREVIOUS", "ACTUAL", "MESSAGE"], &rows)
            );
        }
    }
    Ok(())
}

pub fn convert(args: ConvertArgs) -> Result<i32> {
    let text = match args.file.as_deref() {
        None => read_stdin()?,
        Some(p) if p == Path::new("-") => read_stdin()?,
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
    };
    let selector = selector::from_pairs(&args.selectors).map_err(anyhow::Error::msg)?;
    let parsed = match convert::parse_sysctl_conf(&text) {
        Ok(p) => p,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            return Ok(1);
        }
    };
    for w in &parsed.warnings {
        eprintln!("warning: {w}");
    }
    let fs = SysctlFs::default();
    for e in &parsed.entries {
        if let Err(SysctlIoError::NotFound { .. }) = fs.read(&e.key) {
            eprintln!(
                "warning: line {}: {} does not exist on this kernel (kept in the profile)",
                e.line, e.key
            );
        }
    }
    let desired = parsed
        .entries
        .iter()
        .map(|e| (e.key.to_string(), e.value.clone()));
    for w in sysctl::checks::check(desired, None) {
        eprintln!("warning: {}: {}", w.key, w.message);
    }
    let profile = convert::to_profile(&args.name, selector, &parsed.entries);
    print!("{}", serde_yaml::to_string(&profile)?);
    Ok(0)
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading standard input")?;
    Ok(s)
}

pub fn crd(args: CrdArgs) -> Result<i32> {
    use nodetune::api::crd;
    let Some(dir) = args.dir else {
        print!("{}", crd::all_yaml()?);
        return Ok(0);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for c in crd::all() {
        let path = dir.join(crd::file_name(&c));
        std::fs::write(&path, crd::to_yaml(&c)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(0)
}

/// Left-aligned columns separated by two spaces, like kubectl.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
