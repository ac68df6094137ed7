//! Apply (init, the IO): finds the iptables tools and picks the backend, reads each
//! family's nat table with `iptables-save`, and feeds the text from `rules` to
//! `iptables-restore --noflush` in one transaction per family. Thin: it must not decide
//! rules or read dumps itself (that is `rules` and `save`), and it never writes outside
//! the network namespace it runs in.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::save::{self, Failure, NatState, Probe};
use super::{Backend, BackendChoice, Family, InitConfig, InitError, Ipv6Mode, Step, rules};

/// How long iptables-restore waits for the xtables lock (held by kube-proxy and CNI
/// plugins on the same node) before failing, in seconds.
const LOCK_WAIT_SECS: &str = "30";

/// Installs (or with `cleanup`, removes) the rules; returns a summary to print.
pub fn run(config: &InitConfig, backend: BackendChoice, ipv6: Ipv6Mode, cleanup: bool) -> Result<String, InitError> {
    let (tools, why) = detect(backend)?;
    let mut report = format!("iptables backend: {} ({why})\n", tools.backend);
    for family in families(ipv6)? {
        let dump = tools.run(family, "save", &["-t", "nat"], None, Step::Read(family))?;
        let state = NatState::parse(&dump);
        let restore = tools.name(family, "restore");
        if cleanup {
            let Some(text) = rules::cleanup(&state) else {
                report.push_str(&format!("{family}: nothing of ours to remove\n"));
                continue;
            };
            tracing::debug!(%family, %text, "removing rules");
            tools.run(family, "restore", &["--noflush", "-w", LOCK_WAIT_SECS], Some(&text), Step::Remove(family))?;
            let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
            report.push_str(&format!(
                "{family}: removed {} jump(s) and {} chain(s) with {restore}\n",
                count("-D "),
                count("-X ")
            ));
        } else {
            let text = rules::install(config, family, &state);
            tracing::debug!(%family, %text, "installing rules");
            tools.run(family, "restore", &["--noflush", "-w", LOCK_WAIT_SECS], Some(&text), Step::Install(family))?;
            report.push_str(&format!("{family}: nat rules installed with {restore}\n"));
        }
    }
    Ok(report)
}

/// The families to handle: IPv6 too when it is enabled in this namespace (`auto`).
fn families(mode: Ipv6Mode) -> Result<Vec<Family>, InitError> {
    let enabled = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6").is_ok_and(|s| s.trim() == "0");
    match (mode, enabled) {
        (Ipv6Mode::Off, _) | (Ipv6Mode::Auto, false) => Ok(vec![Family::V4]),
        (Ipv6Mode::On | Ipv6Mode::Auto, true) => Ok(vec![Family::V4, Family::V6]),
        (Ipv6Mode::On, false) => Err(InitError::Ipv6Unavailable),
    }
}

/// The commands of one backend: `iptables-nft-save` etc., or the plain `iptables-save`
/// etc. when those are that backend and the suffixed ones are not installed.
#[derive(Debug, Clone, Copy)]
struct Tools {
    backend: Backend,
    suffixed: bool,
}

impl Tools {
    fn name(&self, family: Family, kind: &str) -> String {
        if self.suffixed {
            format!("{}-{}-{kind}", family.tool_prefix(), self.backend)
        } else {
            format!("{}-{kind}", family.tool_prefix())
        }
    }

    /// Runs a tool of this backend; its stdout, or an error naming `step`.
    fn run(
        &self,
        family: Family,
        kind: &str,
        args: &[&str],
        input: Option<&str>,
        step: Step,
    ) -> Result<String, InitError> {
        run_tool(&self.name(family, kind), args, input, step)
    }
}

/// Picks the backend (see [`save::choose_backend`]) and its commands, and says why.
fn detect(choice: BackendChoice) -> Result<(Tools, String), InitError> {
    let default = find_on_path("iptables")
        .and_then(|_| run_tool("iptables", &["--version"], None, Step::DetectBackend).ok())
        .and_then(|v| save::version_backend(&v));
    let resolve = |backend: Backend| {
        let suffixed = Tools { backend, suffixed: true };
        let plain = Tools { backend, suffixed: false };
        let has = |t: &Tools| ["save", "restore"].iter().all(|k| find_on_path(&t.name(Family::V4, k)).is_some());
        if has(&suffixed) {
            Some(suffixed)
        } else if default == Some(backend) && has(&plain) {
            Some(plain)
        } else {
            None
        }
    };
    let forced = |backend: Backend| {
        let tools = resolve(backend).ok_or_else(|| InitError::ToolMissing {
            step: Step::DetectBackend,
            tool: format!("iptables-{backend}-restore"),
        })?;
        Ok((tools, "set by --iptables-backend".to_string()))
    };
    match choice {
        BackendChoice::Nft => return forced(Backend::Nft),
        BackendChoice::Legacy => return forced(Backend::Legacy),
        BackendChoice::Auto => {}
    }
    let (nft, legacy) = (resolve(Backend::Nft), resolve(Backend::Legacy));
    let mut first_error = None;
    let mut count = |tools: Option<Tools>| {
        let tools = tools?;
        match tools.run(Family::V4, "save", &[], None, Step::DetectBackend) {
            Ok(dump) => Some(save::count_rules(&dump)),
            Err(e) => {
                first_error.get_or_insert(e);
                None
            }
        }
    };
    let probe = Probe { nft_rules: count(nft), legacy_rules: count(legacy), default };
    match save::choose_backend(&probe) {
        Some((Backend::Nft, why)) => nft.map(|t| (t, why)),
        Some((Backend::Legacy, why)) => legacy.map(|t| (t, why)),
        None => None,
    }
    .ok_or_else(|| {
        first_error.unwrap_or_else(|| InitError::ToolMissing {
            step: Step::DetectBackend,
            tool: "iptables-restore (nft or legacy)".to_string(),
        })
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Runs `tool args`, writing `input` to its stdin; returns its stdout. A missing tool, a
/// failure to start, or a non-zero exit is an error naming `step`, with a hint.
fn run_tool(tool: &str, args: &[&str], input: Option<&str>, step: Step) -> Result<String, InitError> {
    let path = find_on_path(tool).ok_or_else(|| InitError::ToolMissing { step, tool: tool.to_string() })?;
    let io_error = |source| InitError::Io { step, tool: tool.to_string(), source };
    let mut child = Command::new(path)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_error)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // The tool reads all its input before it answers; the rules fit a pipe's buffer.
        stdin.write_all(text.as_bytes()).map_err(io_error)?;
    }
    let out = child.wait_with_output().map_err(io_error)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let tool = tool.to_string();
    Err(match save::classify_failure(&stderr) {
        Failure::Permission => InitError::PermissionDenied { step, tool, stderr },
        Failure::Other(hint) => InitError::Failed { step, tool, status: out.status.to_string(), stderr, hint },
    })
}
