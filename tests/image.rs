//! The image scripts/image builds (an OCI archive): entrypoint, user and labels as the
//! Dockerfile's runtime stage declares them, one layer holding only the binary, and the binary
//! inside runs. The archive takes a statically linked release build (minutes), so scripts/test
//! builds it on CI; elsewhere this test SKIPS LOUDLY when the archive is missing, unless
//! NODETUNE_REQUIRE_IMAGE (or NODETUNE_REQUIRE_CLUSTER) is set, which makes that a failure.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn archive() -> PathBuf {
    let out = Command::new(root().join("scripts/image"))
        .arg("--path")
        .current_dir(root())
        .output()
        .expect("scripts/image --path runs");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if p.is_absolute() { p } else { root().join(p) }
}

fn required() -> bool {
    ["NODETUNE_REQUIRE_IMAGE", "NODETUNE_REQUIRE_CLUSTER"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty() && v != "0"))
}

fn untar(archive: &Path, into: &Path) {
    std::fs::create_dir_all(into).expect("mkdir");
    let st = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()
        .expect("tar runs");
    assert!(st.success(), "tar -xf {}", archive.display());
}

fn blob(dir: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').expect("digest alg:hex");
    dir.join("blobs").join(alg).join(hex)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
}

/// `KEY="value"` pairs of the Dockerfile's LABEL instruction (runtime stage).
fn dockerfile_labels() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let label = &text[text.rfind("LABEL ").expect("LABEL")..];
    label
        .split('"')
        .collect::<Vec<_>>()
        .chunks(2)
        .filter_map(|c| {
            let key = c
                .first()?
                .trim()
                .trim_start_matches("LABEL")
                .trim()
                .trim_start_matches('\\')
                .trim();
            let key = key.strip_suffix('=')?.trim().to_string();
            Some((key, c.get(1)?.to_string()))
        })
        .collect()
}

#[test]
fn image_archive_has_the_binary_user_and_labels() {
    let path = archive();
    if !path.is_file() {
        let msg = format!(
            "the image archive {} is missing: build it with scripts/image (release build, minutes)",
            path.display()
        );
        if required() {
            panic!("{msg}");
        }
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED image_archive_has_the_binary_user_and_labels: {msg}. \
             Set NODETUNE_REQUIRE_IMAGE=1 to make this a failure."
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let oci = tmp.path().join("oci");
    untar(&path, &oci);
    let index = json(&oci.join("index.json"));
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
    let manifest = json(&blob(
        &oci,
        manifests[0]["digest"].as_str().expect("digest"),
    ));
    let config = json(&blob(
        &oci,
        manifest["config"]["digest"].as_str().expect("config"),
    ));
    let c = &config["config"];
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/nodetune"]));
    assert_eq!(c["User"], "65532:65532", "non-root by default");
    let labels = &c["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    let declared = dockerfile_labels();
    assert!(declared.len() >= 4, "Dockerfile labels: {declared:?}");
    for (k, v) in &declared {
        assert_eq!(
            labels[k.as_str()],
            v.as_str(),
            "label {k}: archive vs Dockerfile"
        );
    }
    assert!(
        labels["org.opencontainers.image.revision"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("ENTRYPOINT [\"/nodetune\"]")
            && dockerfile.contains("USER 65532:65532")
    );

    // One layer, holding only the binary.
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{manifest}");
    let rootfs = tmp.path().join("rootfs");
    untar(
        &blob(&oci, layers[0]["digest"].as_str().expect("layer")),
        &rootfs,
    );
    let entries: Vec<String> = std::fs::read_dir(&rootfs)
        .expect("rootfs")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(entries, ["nodetune"], "only the binary in the image");
    let out = Command::new(rootfs.join("nodetune"))
        .arg("--version")
        .output()
        .expect("the binary in the image runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with(&format!("nodetune {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    // Statically linked: no program interpreter (PT_INTERP) to find in a scratch image.
    let elf = std::fs::read(rootfs.join("nodetune")).expect("binary");
    assert!(!has_interpreter(&elf), "the binary needs a dynamic loader");
}

/// Whether an ELF64 little-endian file has a PT_INTERP program header.
fn has_interpreter(elf: &[u8]) -> bool {
    assert!(
        elf.len() > 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2,
        "an ELF64 file"
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let o = phoff + i * size;
        elf.get(o..o + 4) == Some(&3u32.to_le_bytes()[..])
    })
}
