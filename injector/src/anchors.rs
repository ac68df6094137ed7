//! The mesh's trust anchors (issue 7): the PEM file `--trust-anchors-file` names, checked
//! ([`check`]) and normalised into the text the proxies get as `NEUTRINO_CA_PEM`, and
//! re-read when the file changes ([`Reloader`]; the webhook's loop is [`watch`]).
//!
//! The anchors are public certificates: every injected pod carries them in its spec. So a
//! file holding anything else (a private key above all) is refused, never passed on.
//! This module must not build containers: it only turns a file into checked PEM text.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use x509_parser::pem::Pem;

/// At most this much PEM: it becomes one environment variable of every proxy, and Linux
/// refuses to start a process with a single variable over 128 KiB.
pub const MAX_PEM_BYTES: usize = 64 * 1024;

/// What a good anchors file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchors {
    /// Only the certificates, re-encoded (64-column base64, `\n` line ends): comments,
    /// blank lines and line-end styles of the file do not reach the pods.
    pub pem: String,
    /// The certificates' subjects, for logs.
    pub subjects: Vec<String>,
}

/// Checks PEM text: one or more `CERTIFICATE` blocks, each a parseable X.509 CA
/// certificate, and nothing else. The reason, when refused, says what to fix.
pub fn check(text: &str) -> Result<Anchors, String> {
    if text.len() > MAX_PEM_BYTES {
        return Err(format!(
            "is {} bytes, over the limit of {MAX_PEM_BYTES} (it is set as an environment variable in every proxy); \
             give only the mesh's root certificates",
            text.len()
        ));
    }
    let mut pem = String::new();
    let mut subjects = Vec::new();
    for (i, block) in Pem::iter_from_buffer(text.as_bytes()).enumerate() {
        let n = i + 1;
        let block = block.map_err(|e| format!("PEM block {n} is malformed ({e})"))?;
        if block.label != "CERTIFICATE" {
            let why = if block.label.contains("PRIVATE KEY") {
                "; a private key must never be given to the injector (every pod would carry it): \
                 the anchors are the root certificates only"
            } else {
                ""
            };
            return Err(format!("PEM block {n} is a {:?}, not a CERTIFICATE{why}", block.label));
        }
        let cert = block.parse_x509().map_err(|e| format!("certificate {n} is not valid X.509 ({e})"))?;
        let subject = cert.subject().to_string();
        if !cert.is_ca() {
            return Err(format!(
                "certificate {n} ({subject}) is not a CA certificate (basicConstraints CA:TRUE): give the mesh's \
                 root (the ca.crt of the Secret neutrino-ca), not a workload or serving certificate"
            ));
        }
        pem.push_str(&encode(&block.contents));
        subjects.push(subject);
    }
    if subjects.is_empty() {
        return Err("holds no PEM CERTIFICATE block; give at least one (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(Anchors { pem, subjects })
}

fn encode(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Reads and checks an anchors file; the reason, when refused, says what to fix.
pub fn read(path: &Path) -> Result<Anchors, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot be read ({e})"))?;
    check(&text)
}

/// Re-reads an anchors file when it changes: its modification time or length (a
/// ConfigMap volume swaps a symlink, so the file seen through it gets a new time).
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl Reloader {
    /// The first [`poll`](Self::poll) reads the file whatever its time.
    pub fn new(path: PathBuf) -> Reloader {
        Reloader { path, seen: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok(None)`: unchanged since the last poll; `Ok(Some)`: changed, and good;
    /// `Err`: changed, and unreadable or refused (reported once per change).
    pub fn poll(&mut self) -> Result<Option<Anchors>, String> {
        let stamp = std::fs::metadata(&self.path)
            .map_err(|e| format!("cannot be read ({e})"))
            .and_then(|m| Ok((m.modified().map_err(|e| format!("has no modification time ({e})"))?, m.len())));
        let stamp = match stamp {
            Ok(s) => s,
            // A missing file is reported once, then again only once it came back.
            Err(e) if self.seen.is_some() => {
                self.seen = None;
                return Err(e);
            }
            Err(_) => return Ok(None),
        };
        if self.seen == Some(stamp) {
            return Ok(None);
        }
        self.seen = Some(stamp);
        read(&self.path).map(Some)
    }
}

/// The webhook's loop: polls `every` and swaps in a config with the new anchors when
/// they change; a refused file is logged as an error and the last good anchors stay.
#[cfg(feature = "server")]
pub async fn watch(
    config: std::sync::Arc<arc_swap::ArcSwap<crate::config::InjectConfig>>,
    mut reloader: Reloader,
    every: std::time::Duration,
) {
    loop {
        tokio::time::sleep(every).await;
        match reloader.poll() {
            Ok(Some(new)) => {
                let current = config.load_full();
                if current.trust_anchors_pem.as_deref() == Some(new.pem.as_str()) {
                    continue;
                }
                config.store(std::sync::Arc::new(crate::config::InjectConfig {
                    trust_anchors_pem: Some(new.pem),
                    ..(*current).clone()
                }));
                tracing::info!(
                    file = %reloader.path().display(),
                    anchors = ?new.subjects,
                    "reloaded the trust anchors: pods injected from now on get them"
                );
            }
            Ok(None) => {}
            Err(reason) => tracing::error!(
                "--trust-anchors-file {}: {reason}; keeping the last good trust anchors",
                reloader.path().display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANCHOR_1: &str = include_str!("../tests/testdata/anchor-1.pem");
    const ANCHOR_2: &str = include_str!("../tests/testdata/anchor-2.pem");
    const LEAF: &str = include_str!("../tests/testdata/leaf.pem");

    #[test]
    fn good_anchors_are_normalised_and_bundles_kept_whole() {
        let one = check(ANCHOR_1).expect("one anchor");
        assert_eq!(one.pem, ANCHOR_1, "openssl writes the same 64-column PEM");
        assert_eq!(one.subjects, ["CN=neutrino test mesh root 1"]);
        let noisy = format!("# the mesh root\r\n\n{}\n", ANCHOR_1.replace('\n', "\r\n"));
        assert_eq!(check(&noisy).expect("comments and CRLF").pem, ANCHOR_1);
        let both = check(&format!("{ANCHOR_1}{ANCHOR_2}")).expect("a rotation bundle");
        assert_eq!((both.pem, both.subjects.len()), (format!("{ANCHOR_1}{ANCHOR_2}"), 2));
    }

    #[test]
    fn bad_anchors_are_refused_with_what_to_fix() {
        let refused = |text: &str| check(text).expect_err("refused");
        assert!(refused("").contains("no PEM CERTIFICATE block"));
        assert!(refused("just some text\n").contains("no PEM CERTIFICATE block"));
        let key = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        let e = refused(&format!("{ANCHOR_1}{key}"));
        assert!(e.contains("PEM block 2 is a \"PRIVATE KEY\"") && e.contains("must never be given"), "{e}");
        let e = refused(LEAF);
        assert!(e.contains("certificate 1 (CN=not a ca) is not a CA certificate"), "{e}");
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(refused(garbage).contains("certificate 1 is not valid X.509"));
        let e = refused("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n");
        assert!(e.contains("PEM block 1 is malformed"), "{e}");
        let truncated = &ANCHOR_1[..ANCHOR_1.len() - 30];
        assert!(refused(truncated).contains("malformed"));
        assert!(refused(&ANCHOR_1.repeat(200)).contains("over the limit"));
    }

    #[test]
    fn the_reloader_reads_each_change_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("anchors.pem");
        let mut r = Reloader::new(path.clone());
        assert_eq!(r.poll(), Ok(None), "no file yet: nothing to report");
        std::fs::write(&path, ANCHOR_1).expect("write");
        assert_eq!(r.poll().expect("good").map(|a| a.pem), Some(ANCHOR_1.to_string()));
        assert_eq!(r.poll(), Ok(None), "unchanged");
        std::fs::write(&path, format!("{ANCHOR_1}{ANCHOR_2}")).expect("write");
        assert_eq!(r.poll().expect("good").map(|a| a.subjects.len()), Some(2));
        std::fs::write(&path, "oops").expect("write");
        assert!(r.poll().expect_err("refused").contains("no PEM CERTIFICATE block"));
        assert_eq!(r.poll(), Ok(None), "reported once");
        std::fs::remove_file(&path).expect("remove");
        assert!(r.poll().expect_err("gone").contains("cannot be read"));
        assert_eq!(r.poll(), Ok(None), "reported once");
        std::fs::write(&path, ANCHOR_2).expect("write");
        assert_eq!(r.poll().expect("good").map(|a| a.pem), Some(ANCHOR_2.to_string()));
    }
}
