//! Reading what iptables reports (init, before the rules): the nat table from
//! `iptables-save`, the backend from `iptables --version`, which backend to use, and
//! what a tool's error output means. Pure: text in, values out. It must not run any
//! tool or decide rules (that is `rules`).

use super::Backend;

/// One rule of an `iptables-save` dump: `-A <chain> <spec>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub spec: String,
}

impl Rule {
    /// The chain this rule jumps (`-j`) or goes (`-g`) to, if any.
    pub fn target(&self) -> Option<&str> {
        let mut tokens = self.spec.split_whitespace();
        while let Some(t) = tokens.next() {
            if t == "-j" || t == "-g" || t == "--jump" || t == "--goto" {
                return tokens.next();
            }
        }
        None
    }
}

/// The nat table as `iptables-save -t nat` shows it: chains and rules in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatState {
    pub chains: Vec<String>,
    pub rules: Vec<Rule>,
}

impl NatState {
    /// Reads the `*nat` section of an `iptables-save` dump; other tables are ignored,
    /// and no `*nat` section is an empty table.
    pub fn parse(save: &str) -> NatState {
        let mut state = NatState::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(table) = line.strip_prefix('*') {
                in_nat = table == "nat";
            } else if !in_nat || line.starts_with('#') {
                continue;
            } else if line == "COMMIT" {
                in_nat = false;
            } else if let Some(chain) = line.strip_prefix(':') {
                if let Some(name) = chain.split_whitespace().next() {
                    state.chains.push(name.to_string());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
                state.rules.push(Rule { chain: chain.to_string(), spec: spec.trim().to_string() });
            }
        }
        state
    }

    pub fn has_chain(&self, name: &str) -> bool {
        self.chains.iter().any(|c| c == name)
    }
}

/// How many rules a whole `iptables-save` dump (all tables) holds.
pub fn count_rules(save: &str) -> usize {
    save.lines().filter(|l| l.trim_start().starts_with("-A ")).count()
}

/// The backend named by `iptables --version`: "iptables v1.8.9 (nf_tables)" or
/// "(legacy)"; versions before 1.8 print no backend and are legacy.
pub fn version_backend(version: &str) -> Option<Backend> {
    if version.contains("(nf_tables)") {
        Some(Backend::Nft)
    } else if version.contains("(legacy)") || version.trim_start().starts_with("iptables v1.") {
        Some(Backend::Legacy)
    } else {
        None
    }
}

/// What was found when probing each backend: `None` when its tools are missing or do
/// not work here, else the number of rules it already holds in this namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub nft_rules: Option<usize>,
    pub legacy_rules: Option<usize>,
    /// The backend of the plain `iptables` command, if there is one.
    pub default: Option<Backend>,
}

/// Picks a backend: the one that already has rules (something in this namespace uses
/// it, and mixing the two hides rules from each other), else the plain `iptables`
/// command's, else nft. Returns the choice and why, or `None` if neither works.
pub fn choose_backend(p: &Probe) -> Option<(Backend, String)> {
    match (p.nft_rules, p.legacy_rules) {
        (None, None) => None,
        (Some(_), None) => Some((Backend::Nft, "the only working backend".into())),
        (None, Some(_)) => Some((Backend::Legacy, "the only working backend".into())),
        (Some(n), Some(l)) if n > l => Some((Backend::Nft, format!("it holds {n} rules here, legacy {l}"))),
        (Some(n), Some(l)) if l > n => Some((Backend::Legacy, format!("it holds {l} rules here, nft {n}"))),
        (Some(_), Some(_)) => Some(match p.default {
            Some(b) => (b, format!("no rules in either backend; `iptables --version` names {b}")),
            None => (Backend::Nft, "no rules in either backend and no plain iptables; nft is the default".into()),
        }),
    }
}

/// What kind of failure a tool's error output shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Missing NET_ADMIN / NET_RAW, or not root.
    Permission,
    /// Anything else, with a hint at the fix ("" if none is known).
    Other(&'static str),
}

pub fn classify_failure(stderr: &str) -> Failure {
    let s = stderr.to_ascii_lowercase();
    if s.contains("permission denied") || s.contains("operation not permitted") || s.contains("you must be root") {
        Failure::Permission
    } else if s.contains("table does not exist") || s.contains("can't initialize") {
        Failure::Other(
            "; the kernel has no nat table for this backend and family: load the iptable_nat / ip6table_nat \
             module on the node, or try the other --iptables-backend",
        )
    } else if s.contains("couldn't load target `redirect'") || (s.contains("redirect") && s.contains("no such file")) {
        Failure::Other("; the kernel lacks the REDIRECT target: load the xt_REDIRECT module on the node")
    } else if s.contains("couldn't load match `owner'") {
        Failure::Other("; the kernel lacks the owner match: load the xt_owner module on the node")
    } else if s.contains("xtables lock") {
        Failure::Other("; another program held the xtables lock for too long: retry")
    } else {
        Failure::Other("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Nov 30 14:16:00 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [12:720]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:NEUTRINO_INBOUND - [0:0]
-A PREROUTING -p tcp -j NEUTRINO_INBOUND
-A OUTPUT -p udp -m udp --dport 53 -j RETURN
-A NEUTRINO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
COMMIT
# Completed on Mon Nov 30 14:16:00 2026
";

    #[test]
    fn init_save_reads_only_the_nat_table() {
        let s = NatState::parse(SAVE);
        assert_eq!(s.chains, ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "NEUTRINO_INBOUND"]);
        assert_eq!(s.rules.len(), 3);
        assert_eq!(s.rules[0], Rule { chain: "PREROUTING".into(), spec: "-p tcp -j NEUTRINO_INBOUND".into() });
        assert_eq!(s.rules[0].target(), Some("NEUTRINO_INBOUND"));
        assert_eq!(s.rules[1].target(), Some("RETURN"));
        assert!(s.has_chain("NEUTRINO_INBOUND"));
        assert_eq!(NatState::parse(""), NatState::default());
        assert_eq!(count_rules(SAVE), 4);
        assert_eq!(Rule { chain: "OUTPUT".into(), spec: "-p tcp".into() }.target(), None);
    }

    #[test]
    fn init_save_version_names_the_backend() {
        assert_eq!(version_backend("iptables v1.8.9 (nf_tables)\n"), Some(Backend::Nft));
        assert_eq!(version_backend("iptables v1.8.7 (legacy)\n"), Some(Backend::Legacy));
        assert_eq!(version_backend("iptables v1.6.1\n"), Some(Backend::Legacy));
        assert_eq!(version_backend("command not found"), None);
    }

    #[test]
    fn init_save_backend_with_rules_wins_then_the_default() {
        let p = |nft, legacy, default| Probe { nft_rules: nft, legacy_rules: legacy, default };
        let b = |p: Probe| choose_backend(&p).map(|(b, _)| b);
        assert_eq!(b(p(Some(0), Some(5), Some(Backend::Nft))), Some(Backend::Legacy));
        assert_eq!(b(p(Some(3), Some(0), Some(Backend::Legacy))), Some(Backend::Nft));
        assert_eq!(b(p(Some(0), Some(0), Some(Backend::Legacy))), Some(Backend::Legacy));
        assert_eq!(b(p(Some(0), Some(0), None)), Some(Backend::Nft));
        assert_eq!(b(p(None, Some(0), Some(Backend::Nft))), Some(Backend::Legacy));
        assert_eq!(b(p(Some(0), None, None)), Some(Backend::Nft));
        assert_eq!(b(p(None, None, Some(Backend::Nft))), None);
        let (_, why) = choose_backend(&p(Some(0), Some(5), None)).expect("choice");
        assert_eq!(why, "it holds 5 rules here, nft 0");
    }

    #[test]
    fn init_save_failures_are_classified() {
        assert_eq!(
            classify_failure(
                "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)"
            ),
            Failure::Permission
        );
        assert_eq!(classify_failure("iptables-save: Operation not permitted"), Failure::Permission);
        assert!(matches!(
            classify_failure("ip6tables-restore: Table does not exist (do you need to insmod?)"),
            Failure::Other(h) if h.contains("ip6table_nat")
        ));
        assert!(matches!(
            classify_failure("Couldn't load target `REDIRECT':No such file or directory"),
            Failure::Other(h) if h.contains("xt_REDIRECT")
        ));
        assert_eq!(classify_failure("Bad argument `foo'"), Failure::Other(""));
    }
}
