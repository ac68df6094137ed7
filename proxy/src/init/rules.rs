//! Rules (init, the decision): the nat rules as the text fed to
//! `iptables-restore --noflush` / `ip6tables-restore --noflush`, and the text that
//! removes them. Pure: a config and the table as it is now in, text out. It must not run
//! any tool, read the system, or name any chain but its own and the jumps into them.
//!
//! Idempotency: one restore transaction re-declares our chains (with `--noflush`,
//! declaring an existing chain flushes it) and fills them again, and adds each jump from
//! PREROUTING / OUTPUT only if the table lacks it; extra or outdated jumps into our
//! chains are deleted in the same transaction. Rules are written the way iptables-save
//! prints them, so a dump shows the same lines.

use std::fmt::Write;

use super::save::NatState;
use super::{Cidr, Family, INBOUND_PORT, InitConfig, MESH_PORTS, OUTBOUND_PORT, Select};

/// Inbound TCP (from PREROUTING): exemptions, then the ports to capture.
pub const INBOUND: &str = "NEUTRINO_INBOUND";
/// Redirects to the inbound listener.
pub const IN_REDIRECT: &str = "NEUTRINO_IN_REDIRECT";
/// Outbound TCP (from OUTPUT): exemptions, then the destinations to capture.
pub const OUTPUT: &str = "NEUTRINO_OUTPUT";
/// Redirects to the outbound listener.
pub const REDIRECT: &str = "NEUTRINO_REDIRECT";
/// Every chain init creates, in the order it declares them.
pub const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];

const BUILTIN_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// The jumps into our chains: (built-in chain, rule spec as iptables-save prints it).
fn jumps() -> [(&'static str, String); 2] {
    [("PREROUTING", format!("-p tcp -j {INBOUND}")), ("OUTPUT", format!("-p tcp -j {OUTPUT}"))]
}

/// A rule in a built-in chain that jumps into one of our chains.
fn is_our_jump(chain: &str, target: Option<&str>) -> bool {
    BUILTIN_CHAINS.contains(&chain) && target.is_some_and(|t| CHAINS.contains(&t))
}

/// The restore text that installs the rules for `family` into a nat table that is
/// `existing` now.
pub fn install(config: &InitConfig, family: Family, existing: &NatState) -> String {
    let mut t = Text::default();
    t.line(format_args!(
        "# neutrino-proxy init: {family} nat rules, input of `{}-restore --noflush`",
        family.tool_prefix()
    ));
    t.line(format_args!("*nat"));
    for chain in CHAINS {
        t.line(format_args!(":{chain} - [0:0]"));
    }

    t.line(format_args!("# the proxy's listeners"));
    t.rule(IN_REDIRECT, format_args!("-p tcp -j REDIRECT --to-ports {INBOUND_PORT}"));
    t.rule(REDIRECT, format_args!("-p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}"));

    t.line(format_args!("# inbound: mesh ports and excluded ports pass, then the included ports are captured"));
    let exempt = exempt_ports(&config.inbound_exclude_ports);
    for port in &exempt {
        t.rule(INBOUND, format_args!("-p tcp -m tcp --dport {port} -j RETURN"));
    }
    match &config.inbound_include_ports {
        Select::All => t.rule(INBOUND, format_args!("-p tcp -j {IN_REDIRECT}")),
        Select::Only(ports) => {
            // An exempt port returned above already; a rule for it would never match.
            for port in ports.iter().filter(|p| !exempt.contains(p)) {
                t.rule(INBOUND, format_args!("-p tcp -m tcp --dport {port} -j {IN_REDIRECT}"));
            }
        }
    }

    t.line(format_args!(
        "# outbound: the proxy's own traffic, loopback, mesh ports, excluded ports and CIDRs pass, then the included \
         CIDRs are captured"
    ));
    t.rule(OUTPUT, format_args!("-m owner --uid-owner {} -j RETURN", config.proxy_uid));
    t.rule(OUTPUT, format_args!("-o lo -j RETURN"));
    for port in exempt_ports(&config.outbound_exclude_ports) {
        t.rule(OUTPUT, format_args!("-p tcp -m tcp --dport {port} -j RETURN"));
    }
    for cidr in of_family(&config.outbound_exclude_cidrs, family) {
        t.rule(OUTPUT, format_args!("{}-j RETURN", dest(cidr)));
    }
    match &config.outbound_include_cidrs {
        Select::All => t.rule(OUTPUT, format_args!("-p tcp -j {REDIRECT}")),
        Select::Only(cidrs) => {
            let cidrs: Vec<&Cidr> = of_family(cidrs, family).collect();
            if cidrs.iter().any(|c| c.prefix() == 0) {
                t.rule(OUTPUT, format_args!("-p tcp -j {REDIRECT}"));
            } else {
                for cidr in cidrs {
                    t.rule(OUTPUT, format_args!("{}-p tcp -j {REDIRECT}", dest(cidr)));
                }
            }
        }
    }

    let wanted = jumps();
    let mut present = [false; 2];
    let mut stale = Vec::new();
    for rule in existing.rules.iter().filter(|r| is_our_jump(&r.chain, r.target())) {
        match wanted.iter().position(|(chain, spec)| *chain == rule.chain && *spec == rule.spec) {
            Some(i) if !present[i] => present[i] = true,
            _ => stale.push(rule),
        }
    }
    if !stale.is_empty() || present.contains(&false) {
        t.line(format_args!("# jumps into our chains, each once"));
    }
    for rule in stale {
        t.line(format_args!("-D {} {}", rule.chain, rule.spec));
    }
    for ((chain, spec), present) in wanted.iter().zip(present) {
        if !present {
            t.rule(chain, format_args!("{spec}"));
        }
    }
    t.line(format_args!("COMMIT"));
    t.0
}

/// The restore text that removes our jumps and chains from a nat table that is
/// `existing` now, or `None` if nothing of ours is there. Other rules stay.
pub fn cleanup(existing: &NatState) -> Option<String> {
    let jumps: Vec<_> = existing.rules.iter().filter(|r| is_our_jump(&r.chain, r.target())).collect();
    let chains: Vec<&str> = CHAINS.into_iter().filter(|c| existing.has_chain(c)).collect();
    if jumps.is_empty() && chains.is_empty() {
        return None;
    }
    let mut t = Text::default();
    t.line(format_args!("*nat"));
    for rule in jumps {
        t.line(format_args!("-D {} {}", rule.chain, rule.spec));
    }
    for chain in &chains {
        t.line(format_args!("-F {chain}"));
    }
    for chain in &chains {
        t.line(format_args!("-X {chain}"));
    }
    t.line(format_args!("COMMIT"));
    Some(t.0)
}

/// What `--dry-run` prints: the install text for each family, for a table without
/// our rules.
pub fn dry_run(config: &InitConfig, families: &[Family]) -> String {
    families.iter().map(|f| install(config, *f, &NatState::default())).collect()
}

/// The mesh ports and the excluded ones, sorted, each once.
fn exempt_ports(excluded: &[u16]) -> Vec<u16> {
    let mut ports: Vec<u16> = MESH_PORTS.iter().chain(excluded).copied().collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn of_family(cidrs: &[Cidr], family: Family) -> impl Iterator<Item = &Cidr> {
    cidrs.iter().filter(move |c| c.family() == family)
}

/// `-d <cidr> `, or nothing for a /0 (iptables-save prints no `-d` for it).
fn dest(cidr: &Cidr) -> String {
    if cidr.prefix() == 0 { String::new() } else { format!("-d {cidr} ") }
}

#[derive(Default)]
struct Text(String);

impl Text {
    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.0, "{args}");
    }

    fn rule(&mut self, chain: &str, spec: std::fmt::Arguments<'_>) {
        self.line(format_args!("-A {chain} {spec}"));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::init::save::Rule;

    /// Compares with `testdata/<name>`; `NEUTRINO_UPDATE_GOLDEN=1` rewrites the file.
    fn golden(name: &str, actual: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/init/testdata").join(name);
        if std::env::var_os("NEUTRINO_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).expect("writing golden file");
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert!(
            actual == expected,
            "{name} differs from the golden file; if the change is intended, rerun with NEUTRINO_UPDATE_GOLDEN=1\n\
             --- expected\n{expected}--- actual\n{actual}"
        );
    }

    fn cidrs(s: &[&str]) -> Vec<Cidr> {
        s.iter().map(|c| c.parse().expect("cidr")).collect()
    }

    fn with_exclusions() -> InitConfig {
        InitConfig {
            proxy_uid: 1500,
            inbound_include_ports: Select::Only(vec![8080, 9090, 15020]),
            inbound_exclude_ports: vec![22],
            outbound_exclude_ports: vec![3306, 15001],
            outbound_include_cidrs: Select::Only(cidrs(&["10.0.0.0/8", "192.168.0.0/16", "fd00::/8"])),
            outbound_exclude_cidrs: cidrs(&["10.96.0.1/32", "169.254.169.254/32", "fd00::1/128"]),
        }
    }

    /// The table as iptables-save would show it after `text` was restored into an
    /// empty nat table.
    fn applied(text: &str) -> NatState {
        let dump = text.lines().filter(|l| !l.starts_with("-D")).collect::<Vec<_>>().join("\n");
        NatState::parse(&format!("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{dump}\n"))
    }

    #[test]
    fn init_rules_default_golden() {
        golden("default.rules", &install(&InitConfig::default(), Family::V4, &NatState::default()));
    }

    #[test]
    fn init_rules_exclusions_golden() {
        golden("exclusions.rules", &install(&with_exclusions(), Family::V4, &NatState::default()));
    }

    #[test]
    fn init_rules_ipv6_golden() {
        golden("ipv6.rules", &install(&with_exclusions(), Family::V6, &NatState::default()));
    }

    #[test]
    fn init_rules_dry_run_golden() {
        golden("dry-run.rules", &dry_run(&InitConfig::default(), &[Family::V4, Family::V6]));
    }

    #[test]
    fn init_rules_second_run_keeps_one_jump_each_golden() {
        let mut state = applied(&install(&InitConfig::default(), Family::V4, &NatState::default()));
        // A duplicate and an outdated jump, as an older init or a hand edit could leave.
        state.rules.push(Rule { chain: "OUTPUT".into(), spec: format!("-p tcp -j {OUTPUT}") });
        state.rules.push(Rule { chain: "OUTPUT".into(), spec: format!("-o eth0 -j {REDIRECT}") });
        golden("second-run.rules", &install(&InitConfig::default(), Family::V4, &state));
    }

    #[test]
    fn init_rules_second_run_adds_no_jump() {
        let config = with_exclusions();
        let first = install(&config, Family::V4, &NatState::default());
        let second = install(&config, Family::V4, &applied(&first));
        let jump_lines =
            |t: &str| t.lines().filter(|l| l.starts_with("-A PREROUTING") || l.starts_with("-A OUTPUT")).count();
        assert_eq!(jump_lines(&first), 2);
        assert_eq!(jump_lines(&second), 0);
        assert!(!second.contains("-D "), "{second}");
        // Apart from the jumps the text is the same: the chains are flushed and refilled.
        let body = |t: &str| {
            t.lines()
                .filter(|l| {
                    !l.contains("-j NEUTRINO_INBOUND") && !l.contains("-j NEUTRINO_OUTPUT") && !l.starts_with("# jumps")
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(body(&first), body(&second));
    }

    #[test]
    fn init_rules_cleanup_removes_only_ours_golden() {
        let mut state = applied(&install(&InitConfig::default(), Family::V4, &NatState::default()));
        state.chains.push("KUBE_SOMETHING".into());
        state.rules.push(Rule { chain: "OUTPUT".into(), spec: "-p udp -m udp --dport 53 -j RETURN".into() });
        state.rules.push(Rule { chain: "OUTPUT".into(), spec: "-j KUBE_SOMETHING".into() });
        let text = cleanup(&state).expect("something to remove");
        assert!(!text.contains("KUBE_SOMETHING") && !text.contains("udp"), "{text}");
        golden("cleanup.rules", &text);
        assert_eq!(cleanup(&NatState::default()), None);
    }

    #[test]
    fn init_rules_include_all_of_a_family_and_none_of_another() {
        let config = InitConfig {
            outbound_include_cidrs: Select::Only(cidrs(&["10.0.0.0/8", "0.0.0.0/0"])),
            inbound_include_ports: Select::Only(vec![]),
            ..InitConfig::default()
        };
        let v4 = install(&config, Family::V4, &NatState::default());
        assert!(v4.contains(&format!("-A {OUTPUT} -p tcp -j {REDIRECT}\n")), "{v4}");
        assert!(!v4.contains("10.0.0.0/8"), "{v4}");
        assert!(!v4.contains(&format!("-j {IN_REDIRECT}\n-A")), "no inbound port is captured: {v4}");
        let v6 = install(&config, Family::V6, &NatState::default());
        assert!(!v6.contains(&format!("-j {REDIRECT}\n-A")), "no IPv6 destination is captured: {v6}");
    }

    #[test]
    fn init_rules_never_redirect_the_listeners_into_themselves() {
        let text = install(&InitConfig::default(), Family::V4, &NatState::default());
        for port in [OUTBOUND_PORT, INBOUND_PORT] {
            for chain in [INBOUND, OUTPUT] {
                let exempt = format!("-A {chain} -p tcp -m tcp --dport {port} -j RETURN");
                let exempt_at = text.find(&exempt).unwrap_or_else(|| panic!("{exempt} missing:\n{text}"));
                let capture_at = text.find(&format!("-A {chain} -p tcp -j NEUTRINO_")).expect("capture rule");
                assert!(exempt_at < capture_at, "{port} exempt before capture in {chain}");
            }
        }
    }
}
