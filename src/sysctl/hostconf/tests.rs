//! One test per precedence rule, on a fake host root in a temporary directory.
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::*;

fn root() -> tempfile::TempDir {
    tempfile::tempdir().expect("tmp")
}

fn put(root: &Path, host_path: &str, text: &str) {
    let p = root.join(host_path.trim_start_matches('/'));
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, text).expect("write");
}

fn key(s: &str) -> SysctlKey {
    SysctlKey::parse(s).expect("key")
}

/// `(file, line, value)` of the boot setting of `k` (the key counted as existing).
fn boot(root: &Path, k: &str) -> Option<(String, u32, String)> {
    let c = HostConfig::read(root).expect("read").expect("root exists");
    c.setting_for(&key(k), true).map(|a| {
        (
            a.file.clone(),
            a.line.line,
            a.line.value.clone().unwrap_or_default(),
        )
    })
}

const FIN: &str = "net.ipv4.tcp_fin_timeout";

#[test]
fn a_missing_root_turns_the_feature_off() {
    let r = root();
    assert!(
        HostConfig::read(&r.path().join("nope"))
            .expect("ok")
            .is_none()
    );
}

#[test]
fn rule1_files_sort_by_name_across_directories() {
    let r = root();
    put(
        r.path(),
        "/usr/lib/sysctl.d/50-default.conf",
        "net.ipv4.tcp_fin_timeout = 50\n",
    );
    put(
        r.path(),
        "/etc/sysctl.d/10-early.conf",
        "net.ipv4.tcp_fin_timeout = 10\n",
    );
    put(
        r.path(),
        "/run/sysctl.d/70-run.conf",
        "\nnet.ipv4.tcp_fin_timeout = 70\n",
    );
    put(
        r.path(),
        "/usr/local/lib/sysctl.d/60-local.conf",
        "net.ipv4.tcp_fin_timeout = 60\n",
    );
    put(
        r.path(),
        "/etc/sysctl.d/README",
        "net.ipv4.tcp_fin_timeout = 1\n",
    );
    assert_eq!(
        boot(r.path(), FIN),
        Some(("/run/sysctl.d/70-run.conf".into(), 2, "70".into()))
    );
    let c = HostConfig::read(r.path()).expect("read").expect("root");
    assert_eq!(
        c.files,
        [
            "/etc/sysctl.d/10-early.conf",
            "/usr/lib/sysctl.d/50-default.conf",
            "/usr/local/lib/sysctl.d/60-local.conf",
            "/run/sysctl.d/70-run.conf"
        ]
    );
}

#[test]
fn rule2_an_earlier_directory_masks_the_same_name() {
    let r = root();
    put(
        r.path(),
        "/usr/lib/sysctl.d/50-x.conf",
        "net.ipv4.tcp_fin_timeout = 50\n",
    );
    put(
        r.path(),
        "/run/sysctl.d/50-x.conf",
        "net.ipv4.tcp_fin_timeout = 51\n",
    );
    assert_eq!(
        boot(r.path(), FIN).map(|b| b.2),
        Some("51".into()),
        "/run over /usr/lib"
    );
    put(
        r.path(),
        "/etc/sysctl.d/50-x.conf",
        "net.ipv4.tcp_fin_timeout = 52\n",
    );
    assert_eq!(
        boot(r.path(), FIN),
        Some(("/etc/sysctl.d/50-x.conf".into(), 1, "52".into())),
        "/etc over /run"
    );
    // Masked by a link to /dev/null: the name sets nothing at all.
    fs::remove_file(r.path().join("etc/sysctl.d/50-x.conf")).expect("rm");
    symlink("/dev/null", r.path().join("etc/sysctl.d/50-x.conf")).expect("ln");
    assert_eq!(boot(r.path(), FIN), None);
    // And by an empty file.
    fs::remove_file(r.path().join("etc/sysctl.d/50-x.conf")).expect("rm");
    put(r.path(), "/etc/sysctl.d/50-x.conf", "");
    assert_eq!(boot(r.path(), FIN), None);
}

#[test]
fn rule1_lib_is_skipped_when_it_is_usr_lib() {
    let r = root();
    put(
        r.path(),
        "/usr/lib/sysctl.d/50-x.conf",
        "net.ipv4.tcp_fin_timeout = 50\n",
    );
    symlink("usr/lib", r.path().join("lib")).expect("ln");
    let c = HostConfig::read(r.path()).expect("read").expect("root");
    assert_eq!(c.files, ["/usr/lib/sysctl.d/50-x.conf"]);
    // A split /lib is read in its place in the order.
    let r = root();
    put(
        r.path(),
        "/lib/sysctl.d/20-lib.conf",
        "net.ipv4.tcp_fin_timeout = 20\n",
    );
    assert_eq!(
        boot(r.path(), FIN).map(|b| b.0),
        Some("/lib/sysctl.d/20-lib.conf".into())
    );
}

#[test]
fn rule3_sysctl_conf_comes_last_and_counts_once() {
    let r = root();
    put(
        r.path(),
        "/etc/sysctl.conf",
        "# admin\nnet.ipv4.tcp_fin_timeout = 99\n",
    );
    put(
        r.path(),
        "/etc/sysctl.d/98-z.conf",
        "net.ipv4.tcp_fin_timeout = 98\n",
    );
    assert_eq!(
        boot(r.path(), FIN),
        Some(("/etc/sysctl.conf".into(), 2, "99".into()))
    );
    // Linked in as 99-sysctl.conf (a relative link, resolved inside the root): read once, there.
    symlink(
        "../sysctl.conf",
        r.path().join("etc/sysctl.d/99-sysctl.conf"),
    )
    .expect("ln");
    put(
        r.path(),
        "/etc/sysctl.d/99-zz.conf",
        "net.ipv4.tcp_fin_timeout = 100\n",
    );
    let c = HostConfig::read(r.path()).expect("read").expect("root");
    assert_eq!(
        c.files,
        [
            "/etc/sysctl.d/98-z.conf",
            "/etc/sysctl.d/99-sysctl.conf",
            "/etc/sysctl.d/99-zz.conf"
        ]
    );
    assert_eq!(boot(r.path(), FIN).map(|b| b.2), Some("100".into()));
}

#[test]
fn rule4_the_last_assignment_wins_and_an_equal_one_keeps_its_origin() {
    let r = root();
    put(
        r.path(),
        "/etc/sysctl.d/10-a.conf",
        "net.ipv4.tcp_fin_timeout = 30\nnet/ipv4/tcp_fin_timeout=40\n",
    );
    put(
        r.path(),
        "/etc/sysctl.d/20-b.conf",
        "; same value\nnet.ipv4.tcp_fin_timeout = 40\n",
    );
    assert_eq!(
        boot(r.path(), FIN),
        Some(("/etc/sysctl.d/10-a.conf".into(), 2, "40".into()))
    );
}

#[test]
fn rule5_globs_expand_to_existing_keys_and_explicit_entries_beat_them() {
    let r = root();
    put(
        r.path(),
        "/etc/sysctl.d/10-explicit.conf",
        "net.ipv4.conf.all.rp_filter = 2\n-net.ipv4.conf.lo.rp_filter\n",
    );
    put(
        r.path(),
        "/etc/sysctl.d/90-glob.conf",
        "-net.ipv4.conf.*.rp_filter = 1\n",
    );
    let c = HostConfig::read(r.path()).expect("read").expect("root");
    let all = key("net.ipv4.conf.all.rp_filter");
    let eth = key("net.ipv4.conf.eth0/100.rp_filter");
    let lo = key("net.ipv4.conf.lo.rp_filter");
    // The explicit entry wins although the glob comes later.
    assert_eq!(
        c.setting_for(&all, true)
            .and_then(|a| a.line.value.clone())
            .as_deref(),
        Some("2")
    );
    let g = c.setting_for(&eth, true).expect("glob");
    assert_eq!(
        (g.file.as_str(), g.line.line, g.line.ignore_failure),
        ("/etc/sysctl.d/90-glob.conf", 1, true)
    );
    assert!(c.setting_for(&eth, false).is_none(), "only keys that exist");
    assert!(
        c.setting_for(&lo, true).is_none(),
        "a negative match keeps the glob off"
    );
    let diffs = c.differences([(&eth, "2"), (&all, "2")], |_| true);
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert_eq!(diffs[0].glob.as_deref(), Some("net.ipv4.conf.*.rp_filter"));
    assert_eq!(
        (diffs[0].boot_value.as_str(), diffs[0].desired.as_str()),
        ("1", "2")
    );
}

#[test]
fn rule5_of_two_globs_the_later_wins() {
    let r = root();
    put(
        r.path(),
        "/etc/sysctl.d/10-a.conf",
        "net.ipv4.conf.*.rp_filter = 1\n",
    );
    put(
        r.path(),
        "/etc/sysctl.d/20-b.conf",
        "net.ipv4.conf.e*.rp_filter = 0\n",
    );
    assert_eq!(
        boot(r.path(), "net.ipv4.conf.eth0.rp_filter").map(|b| b.2),
        Some("0".into())
    );
    assert_eq!(
        boot(r.path(), "net.ipv4.conf.lo.rp_filter").map(|b| b.2),
        Some("1".into())
    );
}

#[test]
fn untrusted_input_is_bounded_and_confined() {
    let r = root();
    let outside = root();
    put(
        outside.path(),
        "/secret.conf",
        "net.ipv4.tcp_fin_timeout = 1\n",
    );
    // An absolute link leading out of the root means the path inside the root.
    symlink(outside.path().join("secret.conf"), {
        fs::create_dir_all(r.path().join("etc/sysctl.d")).expect("mkdir");
        r.path().join("etc/sysctl.d/10-escape.conf")
    })
    .expect("ln");
    symlink(
        "../../../../../../..",
        r.path().join("etc/sysctl.d/11-up.conf"),
    )
    .expect("ln");
    // Oversized, FIFO, not UTF-8, control characters.
    let big = r.path().join("etc/sysctl.d/20-big.conf");
    fs::File::create(&big)
        .expect("f")
        .set_len(files::MAX_FILE_BYTES + 1)
        .expect("len");
    let fifo = r.path().join("etc/sysctl.d/30-fifo.conf");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    fs::write(
        r.path().join("etc/sysctl.d/40-bin.conf"),
        b"net.ipv4.tcp_fin_timeout = \xff\n",
    )
    .expect("w");
    put(
        r.path(),
        "/etc/sysctl.d/50-ctl.conf",
        "net.ipv4.tcp_fin_timeout = 5\x07\n",
    );
    let c = HostConfig::read(r.path()).expect("read").expect("root");
    assert_eq!(c.setting_for(&key(FIN), true), None, "{:?}", c.warnings);
    let all = c.warnings.join("\n");
    for needle in [
        "20-big.conf not read: larger",
        "30-fifo.conf not read: not a regular",
        "40-bin.conf not read: not UTF-8",
        "50-ctl.conf:1 ignored: it contains control",
    ] {
        assert!(all.contains(needle), "{needle}: {all}");
    }
}

/// A hostile host: one glob reassigned over and over is compiled once, the total read is
/// bounded, and the report gets a few warnings, not thousands.
#[test]
fn hostile_volume_is_bounded() {
    let r = root();
    let line = "net.ipv4.conf.*.rp_filter = 1\nnet.ipv4.conf.*.rp_filter = 2\nbad line\n";
    let file = line.repeat(5000); // ~290 KiB: over the per-file bound
    let small = line.repeat(2000); // ~116 KiB
    put(r.path(), "/etc/sysctl.d/00-big.conf", &file);
    for i in 1..40 {
        put(r.path(), &format!("/etc/sysctl.d/{i:02}.conf"), &small);
    }
    let c = HostConfig::read(r.path()).expect("read").expect("root");
    assert_eq!(c.compiled.len(), 1, "one distinct glob, compiled once");
    assert!(c.warnings.len() <= MAX_WARNINGS + 1, "{}", c.warnings.len());
    assert!(
        c.warnings
            .last()
            .is_some_and(|w| w.contains("more problems")),
        "{:?}",
        c.warnings
    );
    assert!(
        c.files.len() < 39,
        "the total bound stops reading: {}",
        c.files.len()
    );
    let g = c
        .setting_for(&key("net.ipv4.conf.eth0.rp_filter"), true)
        .expect("glob");
    assert_eq!(g.line.value.as_deref(), Some("2"));
}
