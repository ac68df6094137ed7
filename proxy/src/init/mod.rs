//! Interception setup (`neutrino-proxy init`, data-path step 1 "intercept"): installs
//! the nat rules that send a pod's TCP traffic to the proxy, inbound to 15006 and
//! outbound to 15001, exactly as the injected init container runs it, and removes them
//! with `--cleanup`.
//!
//! This module holds the flags, the config they become and the typed error; the rules
//! themselves are a pure function in [`rules`] (fed by the pure reader in [`save`]), and
//! [`apply`] is the thin IO around them. It must not run the proxy, read mesh config or
//! touch any table but `nat` and any chain but its own and the jumps into them.

pub mod apply;
pub mod rules;
pub mod save;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use thiserror::Error;

/// The proxy's outbound listener: apps' outgoing TCP is redirected here.
pub const OUTBOUND_PORT: u16 = 15001;
/// The proxy's inbound listener: TCP arriving at the pod is redirected here.
pub const INBOUND_PORT: u16 = 15006;
/// Ports never redirected, in either direction: the proxy's own listeners (so they are
/// not redirected into themselves), its admin port, and the control plane's ports.
pub const MESH_PORTS: [u16; 6] = [OUTBOUND_PORT, INBOUND_PORT, 15010, 15012, 15014, crate::ADMIN_PORT];
/// The UID the proxy runs as, whose traffic is never redirected.
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// `neutrino-proxy init` flags. Lists are comma-separated and the flags may repeat.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// UID the proxy runs as; its own connections are never redirected.
    #[arg(long, default_value_t = DEFAULT_PROXY_UID)]
    pub proxy_uid: u32,
    /// Inbound destination ports redirected to 15006: "*" for all (the default), a list
    /// such as "8080,9090", or "" for none.
    #[arg(long)]
    pub inbound_include_ports: Vec<String>,
    /// Inbound destination ports never redirected (15001, 15006, 15010, 15012, 15014 and
    /// 15020 never are).
    #[arg(long)]
    pub inbound_exclude_ports: Vec<String>,
    /// Outbound destination ports never redirected (the same mesh ports never are).
    #[arg(long)]
    pub outbound_exclude_ports: Vec<String>,
    /// Outbound destinations redirected to 15001: "*" for all of IPv4 and IPv6 (the
    /// default), CIDRs such as "10.0.0.0/8,fd00::/8" (a family without one is not
    /// redirected), or "" for none.
    #[arg(long)]
    pub outbound_include_cidrs: Vec<String>,
    /// Outbound destination CIDRs never redirected, e.g. "169.254.169.254/32".
    #[arg(long)]
    pub outbound_exclude_cidrs: Vec<String>,
    /// Which iptables to drive. `auto` picks the backend that already has rules in this
    /// network namespace, else the one `iptables --version` names.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub iptables_backend: BackendChoice,
    /// IPv6 rules (ip6tables): `auto` installs them when IPv6 is enabled in the namespace.
    #[arg(long, value_enum, default_value_t = Ipv6Mode::Auto)]
    pub ipv6: Ipv6Mode,
    /// Remove everything init added (its chains and the jumps into them), and only that.
    #[arg(long, conflicts_with = "dry_run")]
    pub cleanup: bool,
    /// Print the iptables-restore input for a namespace without our rules; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Nft,
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    Auto,
    On,
    Off,
}

/// The two iptables implementations; the kernel keeps their rules apart, so init must
/// write to the one the rest of the namespace (and the operator) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// `iptables` or `ip6tables`: the prefix of every tool of this family.
    pub fn tool_prefix(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// All, or only the listed items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select<T> {
    All,
    Only(Vec<T>),
}

/// A network in CIDR notation, host bits cleared (`10.1.2.3/8` is `10.0.0.0/8`, a bare
/// address is a /32 or /128), printed the way iptables-save prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn family(&self) -> Family {
        if self.addr.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

impl FromStr for Cidr {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| "is not an IP address or CIDR (e.g. 10.0.0.0/8, fd00::/8)")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err("has a prefix length out of range (0-32 for IPv4, 0-128 for IPv6)"),
            },
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What the rules are made from: the flags, checked, sorted and without duplicates, so
/// that the same intent always gives the same rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    pub proxy_uid: u32,
    pub inbound_include_ports: Select<u16>,
    pub inbound_exclude_ports: Vec<u16>,
    pub outbound_exclude_ports: Vec<u16>,
    pub outbound_include_cidrs: Select<Cidr>,
    pub outbound_exclude_cidrs: Vec<Cidr>,
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            proxy_uid: DEFAULT_PROXY_UID,
            inbound_include_ports: Select::All,
            inbound_exclude_ports: Vec::new(),
            outbound_exclude_ports: Vec::new(),
            outbound_include_cidrs: Select::All,
            outbound_exclude_cidrs: Vec::new(),
        }
    }
}

impl InitArgs {
    /// Checks the flags and builds the config; every error names the flag and value.
    pub fn config(&self) -> Result<InitConfig, InitError> {
        if self.proxy_uid == 0 {
            return Err(flag_error(
                "proxy-uid",
                "0",
                "would exempt every root process from capture; use the proxy's own UID",
            ));
        }
        Ok(InitConfig {
            proxy_uid: self.proxy_uid,
            inbound_include_ports: select("inbound-include-ports", &self.inbound_include_ports, port)?,
            inbound_exclude_ports: list("inbound-exclude-ports", &self.inbound_exclude_ports, port)?,
            outbound_exclude_ports: list("outbound-exclude-ports", &self.outbound_exclude_ports, port)?,
            outbound_include_cidrs: select("outbound-include-cidrs", &self.outbound_include_cidrs, cidr)?,
            outbound_exclude_cidrs: list("outbound-exclude-cidrs", &self.outbound_exclude_cidrs, cidr)?,
        })
    }
}

fn port(s: &str) -> Result<u16, &'static str> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err("is not a port (1-65535)"),
    }
}

fn cidr(s: &str) -> Result<Cidr, &'static str> {
    s.parse()
}

fn flag_error(flag: &'static str, value: &str, reason: &'static str) -> InitError {
    InitError::Flag { flag, value: value.to_string(), reason }
}

/// Every comma-separated item of every occurrence of a flag, sorted, without duplicates
/// and empty items.
fn list<T: Ord>(
    flag: &'static str,
    values: &[String],
    parse: fn(&str) -> Result<T, &'static str>,
) -> Result<Vec<T>, InitError> {
    let mut out = Vec::new();
    for item in values.iter().flat_map(|v| v.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
        out.push(parse(item).map_err(|reason| flag_error(flag, item, reason))?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Like [`list`], where a missing flag or a `*` item means all, and `""` means none.
fn select<T: Ord>(
    flag: &'static str,
    values: &[String],
    parse: fn(&str) -> Result<T, &'static str>,
) -> Result<Select<T>, InitError> {
    if values.is_empty() || values.iter().flat_map(|v| v.split(',')).any(|s| s.trim() == "*") {
        return Ok(Select::All);
    }
    Ok(Select::Only(list(flag, values, parse)?))
}

/// The step of init that failed, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    DetectBackend,
    Read(Family),
    Install(Family),
    Remove(Family),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::DetectBackend => f.write_str("detecting the iptables backend"),
            Step::Read(fam) => write!(f, "reading the {fam} nat rules"),
            Step::Install(fam) => write!(f, "installing the {fam} nat rules"),
            Step::Remove(fam) => write!(f, "removing the {fam} nat rules"),
        }
    }
}

#[derive(Debug, Error)]
pub enum InitError {
    #[error("--{flag}: {value:?} {reason}")]
    Flag { flag: &'static str, value: String, reason: &'static str },
    #[error(
        "{step}: {tool} not found on PATH: install the iptables package (it brings iptables, ip6tables and both backends)"
    )]
    ToolMissing { step: Step, tool: String },
    #[error(
        "{step}: permission denied running {tool}: init needs NET_ADMIN and NET_RAW (run it as root, or add both \
         capabilities to the init container's securityContext): {stderr}"
    )]
    PermissionDenied { step: Step, tool: String, stderr: String },
    #[error("{step}: {tool} failed ({status}): {stderr}{hint}")]
    Failed { step: Step, tool: String, status: String, stderr: String, hint: &'static str },
    #[error("{step}: running {tool}: {source}")]
    Io { step: Step, tool: String, source: std::io::Error },
    #[error(
        "--ipv6 on: IPv6 is not enabled in this network namespace (net.ipv6.conf.all.disable_ipv6 is not 0, or the \
         kernel has no IPv6); use --ipv6 auto or off"
    )]
    Ipv6Unavailable,
}

/// Runs `neutrino-proxy init`; returns what to print (the rules for `--dry-run`, else a
/// summary of what was done).
pub fn run(args: &InitArgs) -> Result<String, InitError> {
    let config = args.config()?;
    if args.dry_run {
        let families: &[Family] = match args.ipv6 {
            Ipv6Mode::Off => &[Family::V4],
            Ipv6Mode::Auto | Ipv6Mode::On => &[Family::V4, Family::V6],
        };
        return Ok(rules::dry_run(&config, families));
    }
    apply::run(&config, args.iptables_backend, args.ipv6, args.cleanup)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        init: InitArgs,
    }

    fn parse(args: &[&str]) -> Result<InitConfig, InitError> {
        let cli = Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied())).expect("flags parse");
        cli.init.config()
    }

    #[test]
    fn init_defaults_capture_everything() {
        assert_eq!(parse(&[]).expect("config"), InitConfig::default());
    }

    #[test]
    fn init_lists_are_comma_separated_repeatable_sorted_and_deduplicated() {
        let c = parse(&[
            "--inbound-exclude-ports",
            "9090, 22",
            "--inbound-exclude-ports=22",
            "--outbound-include-cidrs",
            "10.1.2.3/8,fd00::1/8",
            "--outbound-exclude-cidrs",
            "169.254.169.254",
            "--inbound-include-ports",
            "8080",
            "--proxy-uid",
            "1500",
        ])
        .expect("config");
        assert_eq!(c.proxy_uid, 1500);
        assert_eq!(c.inbound_exclude_ports, vec![22, 9090]);
        assert_eq!(c.inbound_include_ports, Select::Only(vec![8080]));
        let include = match c.outbound_include_cidrs {
            Select::Only(v) => v.iter().map(ToString::to_string).collect::<Vec<_>>(),
            Select::All => vec![],
        };
        assert_eq!(include, ["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(c.outbound_exclude_cidrs[0].to_string(), "169.254.169.254/32");
    }

    #[test]
    fn init_star_means_all_and_empty_means_none() {
        let c = parse(&["--inbound-include-ports", "", "--outbound-include-cidrs", "10.0.0.0/8,*"]).expect("config");
        assert_eq!(c.inbound_include_ports, Select::Only(vec![]));
        assert_eq!(c.outbound_include_cidrs, Select::All);
        assert!(parse(&["--outbound-exclude-ports", ""]).expect("config").outbound_exclude_ports.is_empty());
    }

    #[test]
    fn init_bad_flags_name_the_flag_and_value() {
        let e = parse(&["--outbound-exclude-ports", "80,http"]).expect_err("bad port");
        assert_eq!(e.to_string(), "--outbound-exclude-ports: \"http\" is not a port (1-65535)");
        let e = parse(&["--outbound-exclude-cidrs", "10.0.0.0/33"]).expect_err("bad prefix");
        assert!(e.to_string().starts_with("--outbound-exclude-cidrs: \"10.0.0.0/33\" has a prefix length"), "{e}");
        let e = parse(&["--inbound-exclude-ports", "0"]).expect_err("port 0");
        assert!(e.to_string().contains("not a port"), "{e}");
        let e = parse(&["--proxy-uid", "0"]).expect_err("uid 0");
        assert!(e.to_string().contains("every root process"), "{e}");
        assert!(Cli::try_parse_from(["init", "--cleanup", "--dry-run"]).is_err());
    }

    #[test]
    fn init_cidrs_are_normalized() {
        let c = |s: &str| s.parse::<Cidr>().map(|c| c.to_string());
        assert_eq!(c("10.1.2.3/8"), Ok("10.0.0.0/8".to_string()));
        assert_eq!(c("0.0.0.0/0"), Ok("0.0.0.0/0".to_string()));
        assert_eq!(c("1.2.3.4/0"), Ok("0.0.0.0/0".to_string()));
        assert_eq!(c("2001:db8::1/32"), Ok("2001:db8::/32".to_string()));
        assert_eq!(c("::1"), Ok("::1/128".to_string()));
        assert!(c("10.0.0.0/x").is_err());
        assert!(c("example.com").is_err());
    }

    #[test]
    fn init_errors_hint_at_the_fix() {
        let e = InitError::ToolMissing { step: Step::Install(Family::V6), tool: "ip6tables-restore".into() };
        assert_eq!(
            e.to_string(),
            "installing the IPv6 nat rules: ip6tables-restore not found on PATH: install the iptables package \
             (it brings iptables, ip6tables and both backends)"
        );
        let e = InitError::PermissionDenied {
            step: Step::Read(Family::V4),
            tool: "iptables-save".into(),
            stderr: "Permission denied (you must be root)".into(),
        };
        assert!(e.to_string().contains("init needs NET_ADMIN and NET_RAW"), "{e}");
    }
}
