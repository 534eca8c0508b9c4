//! The local commands: glue between the CLI and the library, I/O at the edge. Each returns the
//! process exit code.
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use nodetune::agent::persist;
use nodetune::api::{Mode, NodeTuningProfile};
use nodetune::bounded_read::{self, BoundedReadError};
use nodetune::plan::{self, Merged};
use nodetune::sysctl::{self, KeyResult, KeyState, Ledger, Policy, SysctlFs, SysctlIoError};
use nodetune::tcpstat::{self, SnapshotOptions};
use nodetune::{convert, manifest, selector};

use crate::cli::{
    ApplyArgs, ConvertArgs, CrdArgs, LocalWriteArgs, Output, PlanArgs, PolicyArg, RestoreArgs,
    StateDirArg, TcpstatArgs,
};

/// Some key would not apply or was not applied (the others were); see the CLI's exit codes.
pub const EXIT_PARTIAL: i32 = 2;

/// Set once standard output is closed (`nodetune plan | head -1`): later output is dropped and
/// the command finishes quietly with its own exit status.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes to standard output; a closed pipe is not an error.
fn out(text: &str) -> Result<()> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        r => r.context("writing standard output"),
    }
}

pub async fn tcpstat(args: TcpstatArgs) -> Result<i32> {
    let options = SnapshotOptions {
        source: args.source,
        ..Default::default()
    };
    loop {
        let snap = tcpstat::snapshot_with(&options).context("counting TCP sockets")?;
        if args.all_namespaces {
            all_namespaces(&snap, args.output)?;
        } else {
            match args.output {
                Output::Json => out(&format!("{}\n", serde_json::to_string_pretty(&snap)?))?,
                Output::Table => out(&tcpstat::render_table(&snap))?,
            }
        }
        let Some(secs) = args.watch else { return Ok(0) };
        if STDOUT_CLOSED.load(Ordering::Relaxed) {
            return Ok(0);
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(secs.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}

/// `tcpstat --all-namespaces`: this namespace's snapshot, then every other namespace's counts.
/// JSON: `{"host": <tcpstat JSON>, "namespaces": [...], "truncated": bool}`.
fn all_namespaces(host: &tcpstat::TcpSnapshot, output: Output) -> Result<()> {
    use nodetune::podnet::{Limits, listing};
    let listing = listing::list(
        Path::new("/proc"),
        Path::new(listing::POD_LOG_DIR),
        &Limits::default(),
    )
    .context("counting the other network namespaces")?;
    match output {
        Output::Json => out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&serde_json::json!({
                "host": host,
                "namespaces": listing.namespaces,
                "truncated": listing.truncated,
            }))?
        )),
        Output::Table => out(&format!(
            "{}\n{}",
            tcpstat::render_table(host),
            listing::render_table(&listing)
        )),
    }
}

/// Reads at most `max` bytes of a regular file (or of standard input for `-`). A FIFO, device
/// or directory is refused without reading, so `/dev/zero` cannot eat memory nor a FIFO hang.
fn read_bounded(path: &Path, max: usize) -> Result<String> {
    let max = max as u64;
    let text = if path == Path::new("-") {
        bounded_read::read_stream(std::io::stdin().lock(), max)
    } else {
        bounded_read::read_regular_file(path, max)
    };
    text.map_err(|e| match e {
        BoundedReadError::NotRegular => anyhow::anyhow!(
            "{} is not a regular file (a FIFO, device or socket); use -f - to read a stream",
            path.display()
        ),
        BoundedReadError::Io(e) => {
            anyhow::Error::new(e).context(format!("reading {}", shown(path)))
        }
        e => anyhow::anyhow!("{}: {e}", shown(path)),
    })
}

fn shown(path: &Path) -> String {
    if path == Path::new("-") {
        "standard input".into()
    } else {
        path.display().to_string()
    }
}

/// The manifests named by `-f`: a file, `-` (standard input), or a directory's `.yaml`, `.yml`
/// and `.json` files in name order (not recursive), as kubectl reads them.
fn manifest_sources(path: &Path) -> Result<Vec<std::path::PathBuf>> {
    if path == Path::new("-") || !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        let p = entry
            .with_context(|| format!("reading {}", path.display()))?
            .path();
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if matches!(ext, "yaml" | "yml" | "json") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{} holds no .yaml, .yml or .json file", path.display());
    }
    Ok(files)
}

fn load_profiles(path: &Path) -> Result<Vec<NodeTuningProfile>> {
    let mut profiles = Vec::new();
    for source in manifest_sources(path)? {
        let text = read_bounded(&source, manifest::MAX_MANIFEST_BYTES)?;
        profiles.extend(
            manifest::parse_profiles(&text).with_context(|| format!("in {}", shown(&source)))?,
        );
    }
    for p in profiles.iter().filter(|p| p.spec.node_selector.is_some()) {
        eprintln!(
            "note: profile {} has a nodeSelector; local commands act on this machine regardless",
            p.metadata.name.as_deref().unwrap_or_default()
        );
    }
    Ok(profiles)
}

/// The cluster policy of `--policy`; the built-in rules alone without it. A local command stops
/// on an unusable policy rather than guess.
fn load_policy(arg: &PolicyArg) -> Result<Policy> {
    match &arg.policy_file {
        None => Ok(Policy::default()),
        Some(path) => Ok(Policy::from_file(path)?),
    }
}

/// Cross-key warnings for the winning values, with the current TIME_WAIT count when countable.
fn warnings(merged: &Merged) -> Vec<sysctl::Warning> {
    let time_wait = tcpstat::snapshot().ok().map(|s| s.sockstat.tcp_tw);
    sysctl::checks::check(merged.desired.iter().map(|(k, d)| (k, &d.value)), time_wait)
}

/// A value or key as a terminal may show it: whitespace runs as one space, and anything with a
/// control character quoted with escapes, so an escape sequence is never sent raw.
fn printable(v: &str) -> String {
    if v.chars().any(|c| c.is_control() && c != '\t') {
        format!("{v:?}")
    } else {
        sysctl::value::normalize(v)
    }
}

fn exit_for(results: &[KeyResult]) -> i32 {
    if results.iter().any(KeyResult::is_failure) {
        EXIT_PARTIAL
    } else {
        0
    }
}

/// What `plan` says applying would do with a key (from the dry-run result).
fn action(r: &KeyResult, mode: Option<Mode>) -> &'static str {
    match r.state {
        KeyState::DryRun if !r.changed => "none",
        KeyState::DryRun if mode == Some(Mode::DryRun) => "report-only",
        KeyState::DryRun => "set",
        KeyState::Unsupported if r.optional => "skip-optional",
        KeyState::Unsupported => "unsupported",
        KeyState::Denied => "denied",
        KeyState::Invalid => "invalid",
        _ => "failed",
    }
}

/// `plan`: the same checks as `apply` (the shared [`plan::execute`] step as a dry run), the
/// mode of each key's profile, and exit status 2 when any key would not apply.
pub fn plan(args: PlanArgs) -> Result<i32> {
    let policy = load_policy(&args.policy)?;
    let profiles = load_profiles(&args.file)?;
    note_pod_profiles(&profiles);
    let merged = plan::merge(profiles.iter());
    let results = plan::execute(&SysctlFs::default(), None, &policy, &merged);
    let warnings = warnings(&merged);
    let host = host_config(args.host_root.as_deref(), &merged)?;
    let view = PlanView {
        results: &results,
        origin: &key_origins(&merged),
        merged: &merged,
        warnings: &warnings,
        host: host.as_ref(),
    };
    let text = match args.output {
        Output::Json => plan_json(&view)?,
        Output::Table => plan_table(&view),
    };
    out(&text)?;
    Ok(exit_for(&results))
}

/// The mode and profile of each result of [`plan::execute`], in its order: the desired keys
/// first (in map order), then the rejected ones, then the DryRun previews over enforced keys.
fn key_origins(merged: &Merged) -> Vec<(Option<Mode>, &str)> {
    merged
        .desired
        .values()
        .map(|d| (Some(d.mode), d.profile.as_str()))
        .chain(merged.rejected.iter().map(|r| (None, r.profile.as_str())))
        .chain(
            merged
                .previews
                .values()
                .map(|d| (Some(d.mode), d.profile.as_str())),
        )
        .collect()
}

/// What `plan` prints, in either output format.
#[derive(Clone, Copy)]
struct PlanView<'a> {
    results: &'a [KeyResult],
    /// The mode and profile of each result, in its order ([`key_origins`]).
    origin: &'a [(Option<Mode>, &'a str)],
    merged: &'a Merged,
    warnings: &'a [sysctl::Warning],
    host: Option<&'a HostDiffs>,
}

impl PlanView<'_> {
    /// Each result with the mode and profile it came from.
    fn keys(&self) -> impl Iterator<Item = (&KeyResult, Option<Mode>, &str)> {
        self.results
            .iter()
            .zip(self.origin)
            .map(|(r, (mode, profile))| (r, *mode, *profile))
    }
}

/// `plan -o json`: one item per key, the overridden values, the cross-key warnings and, with
/// `--host-root`, the host's boot-time config (`hostConfig`).
fn plan_json(view: &PlanView) -> Result<String> {
    let items: Vec<_> = view
        .keys()
        .map(|(r, mode, profile)| {
            serde_json::json!({
                "key": r.key, "scope": r.scope, "mode": mode, "profile": profile,
                "current": r.actual, "desired": r.desired, "optional": r.optional,
                "state": r.state, "action": action(r, mode), "message": r.message,
            })
        })
        .collect();
    let overridden: Vec<_> = view
        .merged
        .overridden
        .iter()
        .map(|o| serde_json::json!({"key": o.key, "profile": o.profile, "value": o.value, "winner": o.winner}))
        .collect();
    let mut doc =
        serde_json::json!({"items": items, "overridden": overridden, "warnings": view.warnings});
    if let Some((diffs, notes)) = view.host {
        doc["hostConfig"] = serde_json::json!({"differences": diffs, "warnings": notes});
    }
    Ok(format!("{}\n", serde_json::to_string_pretty(&doc)?))
}

/// `plan` as a table, then the overridden values and the warnings, one line each, then (with
/// `--host-root`) the host's boot-time config.
fn plan_table(view: &PlanView) -> String {
    let rows: Vec<Vec<String>> = view
        .keys()
        .map(|(r, mode, profile)| plan_row(r, mode, profile))
        .collect();
    let mut text = table(
        &[
            "KEY", "SCOPE", "MODE", "PROFILE", "CURRENT", "DESIRED", "ACTION", "NOTE",
        ],
        &rows,
    );
    for o in &view.merged.overridden {
        text.push_str(&format!(
            "overridden: {} from {} (wins: {})\n",
            o.key, o.profile, o.winner
        ));
    }
    for w in view.warnings {
        text.push_str(&format!("warning: {}: {}\n", w.key, printable(&w.message)));
    }
    text.push_str(&host_table(view.host));
    text
}

/// One key's row of the `plan` table.
fn plan_row(r: &KeyResult, mode: Option<Mode>, profile: &str) -> Vec<String> {
    let dash = |v: &Option<String>| v.as_deref().map(printable).unwrap_or_else(|| "-".into());
    let key = if r.optional {
        format!("-{}", r.key)
    } else {
        printable(&r.key)
    };
    vec![
        key,
        r.scope.as_str().to_string(),
        mode.map(|m| format!("{m:?}")).unwrap_or_else(|| "-".into()),
        profile.to_string(),
        dash(&r.actual),
        dash(&r.desired),
        action(r, mode).to_string(),
        match r.state {
            KeyState::DryRun => String::new(),
            _ => r.message.as_deref().map(printable).unwrap_or_default(),
        },
    ]
}

/// Says on standard error which profiles target pods: [`plan::merge`] leaves them out of this
/// machine's (host) merge, and silence would read as "nothing to do".
fn note_pod_profiles(profiles: &[NodeTuningProfile]) {
    for p in profiles.iter().filter(|p| p.spec.targets_pods()) {
        eprintln!(
            "note: profile {} targets pods (spec.podSelector or spec.namespaceSelector): its keys \
             are set inside the selected pods' network namespaces by the agent, never in this \
             host's; left out here",
            printable(p.metadata.name.as_deref().unwrap_or_default())
        );
    }
}

type HostDiffs = (Vec<sysctl::hostconf::HostConfigDiff>, Vec<String>);

/// With `--host-root`: where that system's boot-time configuration sets a desired key to
/// another value, and what in it could not be read. A root that does not exist is an error here
/// (it was asked for), unlike in the agent.
fn host_config(root: Option<&Path>, merged: &Merged) -> Result<Option<HostDiffs>> {
    let Some(root) = root else { return Ok(None) };
    let config = sysctl::hostconf::HostConfig::read(root)
        .with_context(|| format!("reading the host root {}", shown(root)))?
        .with_context(|| format!("--host-root {}: no such directory", shown(root)))?;
    let fs = SysctlFs::default();
    let desired: Vec<(sysctl::SysctlKey, &str)> = merged
        .desired
        .iter()
        .filter_map(|(k, d)| Some((sysctl::parse_spec(k).ok()?.0, d.value.as_str())))
        .collect();
    let diffs = config.differences(desired.iter().map(|(k, v)| (k, *v)), |k| {
        fs.path_of(k).exists()
    });
    Ok(Some((diffs, config.warnings)))
}

/// The `--host-root` lines of the table.
fn host_table(host: Option<&HostDiffs>) -> String {
    let Some((diffs, notes)) = host else {
        return String::new();
    };
    let mut text = String::new();
    for d in diffs {
        let via = d
            .glob
            .as_deref()
            .map(|g| format!(" (glob {g})"))
            .unwrap_or_default();
        text.push_str(&format!(
            "host config: {} = {} at {}:{}{via}; the profile wants {} (the node has the boot value until the agent's first pass)\n",
            d.key,
            printable(&d.boot_value),
            printable(&d.file),
            d.line,
            printable(&d.desired)
        ));
    }
    if diffs.is_empty() {
        text.push_str("host config: no boot-time setting differs from the profiles\n");
    }
    for n in notes {
        text.push_str(&format!("warning: {}\n", printable(n)));
    }
    text
}

pub fn apply(args: ApplyArgs) -> Result<i32> {
    let policy = load_policy(&args.write.policy)?;
    let profiles = load_profiles(&args.file)?;
    note_pod_profiles(&profiles);
    let merged = plan::merge(profiles.iter());
    let fs = SysctlFs::default();
    let (mut ledger, set_aside) = open_ledger(&args.write.state, &fs)?;
    for w in warnings(&merged) {
        eprintln!("warning: {}: {}", w.key, printable(&w.message));
    }
    let results = plan::execute(&fs, Some(&mut ledger), &policy, &merged);
    print_results(&results, args.write.output)?;
    Ok(if set_aside {
        EXIT_PARTIAL
    } else {
        exit_for(&results)
    })
}

/// The ledger of `apply --local` and `restore --local`: loaded (what was set aside said on
/// standard error, and true) and rebased after a reboot, before anything is written.
fn open_ledger(state: &StateDirArg, fs: &SysctlFs) -> Result<(Ledger, bool)> {
    let loaded = Ledger::load(&state.state_dir)
        .with_context(|| format!("loading the ledger in {}", state.state_dir.display()))?;
    let set_aside = report_set_aside(&loaded);
    let mut ledger = loaded.ledger;
    rebase_after_reboot(fs, &mut ledger)?;
    Ok((ledger, set_aside))
}

/// After a reboot the ledger's originals are the previous boot's: re-read them from this boot
/// before anything is written or restored (as the agent does). Without a readable boot id
/// nothing changes; a ledger that cannot be rewritten stops the command before any write.
fn rebase_after_reboot(fs: &SysctlFs, ledger: &mut Ledger) -> Result<()> {
    let Ok(boot) = sysctl::boot::read_boot_id(&sysctl::boot::boot_id_path(fs)) else {
        return Ok(());
    };
    if let Some(r) = sysctl::boot::reconcile(fs, ledger, &boot).context("nothing was written")? {
        eprintln!(
            "note: the machine rebooted since the ledger was written; the originals of {} key(s) are now this boot's values",
            r.changed.len()
        );
    }
    Ok(())
}

/// Says on standard error what was set aside and where; true if anything was.
fn report_set_aside(loaded: &sysctl::LoadOutcome) -> bool {
    let Some(aside) = &loaded.set_aside else {
        return false;
    };
    if aside.kept > 0 {
        eprintln!(
            "error: {} ledger entries could not be used ({}); the whole ledger was copied to {}; {} good entries are kept; check the dropped originals by hand",
            aside.dropped,
            aside.reason,
            aside.moved_to.display(),
            aside.kept
        );
    } else {
        eprintln!(
            "error: the ledger could not be used ({}) and was moved to {}; the originals it held are not restored automatically: check them by hand",
            aside.reason,
            aside.moved_to.display()
        );
    }
    true
}

pub fn restore(args: RestoreArgs) -> Result<i32> {
    let LocalWriteArgs {
        state,
        policy,
        output,
    } = &args.write;
    let policy = load_policy(policy)?;
    let fs = SysctlFs::default();
    let (mut ledger, set_aside) = open_ledger(state, &fs)?;
    let results = sysctl::restore_all(&fs, &mut ledger, &policy);
    let unpersisted = remove_persist_file(&args.host_root, &mut ledger);
    if results.is_empty() && *output == Output::Table {
        out(&format!(
            "nothing to restore: the ledger in {} is empty\n",
            state.state_dir.display()
        ))?;
    } else {
        print_results(&results, *output)?;
    }
    let ok = !set_aside && unpersisted && results.iter().all(|r| r.state == KeyState::Restored);
    Ok(if ok { 0 } else { EXIT_PARTIAL })
}

/// Removes the agent's persistence file when the ledger records one, so the next boot does
/// not bring back the values just restored. False (and the record kept) when it could not be
/// removed; a host root that does not exist is an error, not "no file" (a mistyped path must
/// not make the ledger forget the file).
fn remove_persist_file(host_root: &Path, ledger: &mut Ledger) -> bool {
    if ledger.persisted().is_empty() {
        return true;
    }
    let file = host_root.join(persist::DIR).join(persist::FILE_NAME);
    if !host_root.is_dir() {
        eprintln!(
            "error: the ledger records {} but the host root {} is not a directory; the file is kept",
            file.display(),
            host_root.display()
        );
        return false;
    }
    match persist::sync(host_root, ledger, &Default::default()) {
        Ok(s) => {
            if s.changed {
                eprintln!("removed {}", file.display());
            }
            true
        }
        Err(e) => {
            eprintln!("error: {} was not removed: {e}", file.display());
            false
        }
    }
}

fn print_results(results: &[KeyResult], output: Output) -> Result<()> {
    match output {
        Output::Json => out(&format!("{}\n", serde_json::to_string_pretty(results)?)),
        Output::Table => {
            let dash =
                |v: &Option<String>| v.as_deref().map(printable).unwrap_or_else(|| "-".into());
            let rows: Vec<Vec<String>> = results
                .iter()
                .map(|r| {
                    vec![
                        if r.optional {
                            format!("-{}", r.key)
                        } else {
                            printable(&r.key)
                        },
                        format!("{:?}", r.state),
                        dash(&r.previous),
                        dash(&r.actual),
                        r.message.as_deref().map(printable).unwrap_or_default(),
                    ]
                })
                .collect();
            out(&table(
                &["KEY", "STATE", "PREVIOUS", "ACTUAL", "MESSAGE"],
                &rows,
            ))
        }
    }
}

pub fn convert(args: ConvertArgs) -> Result<i32> {
    convert::check_name(&args.name)?;
    let policy = load_policy(&args.policy)?;
    let source = args.file.clone().unwrap_or_else(|| "-".into());
    let text = read_bounded(&source, convert::MAX_CONF_BYTES)?;
    let selector = selector::from_pairs(&args.selectors).map_err(anyhow::Error::msg)?;
    let parsed = convert::parse_sysctl_conf(&text, &policy)?;
    for s in &parsed.skipped {
        eprintln!("{}", printable(&s.to_string()));
    }
    for w in &parsed.warnings {
        eprintln!("warning: {w}");
    }
    if parsed.entries.is_empty() {
        eprintln!("error: no sysctl could be converted; nothing written");
        return Ok(1);
    }
    let fs = SysctlFs::default();
    for e in parsed.entries.iter().filter(|e| !e.optional) {
        if let Err(SysctlIoError::NotFound { .. }) = fs.read(&e.key) {
            eprintln!(
                "warning: line {}: {} does not exist on this kernel (kept; write it as -{} if it may be missing)",
                e.line, e.key, e.key
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
    let profiles = convert::to_profiles(&args.name, selector, &parsed.entries)?;
    if profiles.len() > 1 {
        eprintln!(
            "note: {} keys make {} profiles of at most {} keys each",
            parsed.entries.len(),
            profiles.len(),
            nodetune::api::profile::MAX_SYSCTLS
        );
    }
    out(&convert::render(&profiles))?;
    Ok(if parsed.skipped.is_empty() {
        0
    } else {
        EXIT_PARTIAL
    })
}

pub fn crd(args: CrdArgs) -> Result<i32> {
    use nodetune::api::crd;
    let Some(dir) = args.dir else {
        out(&crd::all_yaml()?)?;
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
