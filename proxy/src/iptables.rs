//! `switchyard iptables`: the netfilter rules that redirect a pod's
//! outbound TCP connections to model servers to Switchyard's transparent
//! listener, printed as commands for an init container's script or run
//! with the `iptables` binary (`--apply`).
//!
//! The rules live in the `nat` table: a chain of Switchyard's own
//! (`SWITCHYARD_OUTPUT`), jumped to from `OUTPUT` for every TCP
//! connection the pod opens. In that chain, in order: connections of
//! Switchyard's user return untouched (its own upstream traffic must not
//! come back to it), so do connections to loopback (the app's explicit
//! requests to `server.listen`, local servers), and the connections to
//! the chosen ports and destinations are redirected to the proxy port.
//!
//! This module only builds and runs commands; which pool serves a
//! redirected connection is `transparent`'s business.

use std::fmt;
use std::net::IpAddr;
use std::process::Command;

/// The chain the redirect rules live in.
pub const CHAIN: &str = "SWITCHYARD_OUTPUT";
/// Default `--proxy-port`: `server.transparent.listen`'s default port.
pub const DEFAULT_PROXY_PORT: u16 = crate::transparent::DEFAULT_TRANSPARENT_PORT;
/// Default `--uid`: the user the example runs Switchyard as (Istio's
/// sidecar uses the same).
pub const DEFAULT_UID: u32 = 1337;

/// What to capture, from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRules {
    /// Where redirected connections go, on loopback.
    pub proxy_port: u16,
    /// Switchyard's user: its connections are never redirected.
    pub uid: u32,
    /// Destination ports to capture; empty means any port of
    /// `destinations`.
    pub ports: Vec<u16>,
    /// Destination blocks (`10.0.0.0/16`, `fd00::/64`, an address alone)
    /// to capture; empty means any IPv4 destination on `ports`.
    pub destinations: Vec<String>,
}

/// The address families netfilter keeps apart: each has its own tables
/// and its own binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn binary(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

/// What a rule's command does, which decides how `--apply` treats a
/// rule that is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `-N`: an existing chain is emptied and refilled instead.
    CreateChain,
    /// `-A` into Switchyard's chain.
    Append,
    /// `-A OUTPUT`: skipped when `-C` finds it already.
    Jump,
}

/// One `iptables` or `ip6tables` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    family: Family,
    step: Step,
    args: Vec<String>,
}

impl Rule {
    fn new(family: Family, step: Step, args: &[&str]) -> Self {
        Self {
            family,
            step,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// The command's arguments with `-A` (append) swapped for `op`.
    fn args_with(&self, op: &str) -> Vec<String> {
        let mut args = self.args.clone();
        if let Some(append) = args.iter_mut().find(|a| *a == "-A") {
            *append = op.to_string();
        }
        args
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family.binary(), self.args.join(" "))
    }
}

impl CaptureRules {
    /// The commands, in the order they must run: the chain is filled
    /// before `OUTPUT` jumps to it, so no connection meets half the rules.
    pub fn rules(&self) -> Result<Vec<Rule>, String> {
        if self.ports.is_empty() && self.destinations.is_empty() {
            return Err(NOTHING_TO_CAPTURE.to_string());
        }
        if let Some(port) = self.ports.iter().find(|p| **p == 0) {
            return Err(format!("--ports: {}", not_a_port(&port.to_string())));
        }
        if self.proxy_port == 0 {
            return Err(format!("--proxy-port: {}", not_a_port("0")));
        }
        let mut blocks = Vec::new();
        for text in &self.destinations {
            let block = parse_block(text)?;
            // A /0 block without ports is every outbound connection,
            // which is refused above when asked for plainly.
            if self.ports.is_empty() && block.1.ends_with("/0") {
                return Err(format!(
                    "--destinations: {text:?} is every address, and without \
                     --ports it captures {EVERYTHING}; give --ports or \
                     narrower blocks"
                ));
            }
            blocks.push(block);
        }

        // Ports alone capture IPv4; IPv6 is captured where a block asks.
        let mut families = Vec::new();
        let v4 = blocks.iter().any(|(f, _)| *f == Family::V4);
        if v4 || blocks.is_empty() {
            families.push(Family::V4);
        }
        if blocks.iter().any(|(f, _)| *f == Family::V6) {
            families.push(Family::V6);
        }

        let uid = self.uid.to_string();
        let to_port = self.proxy_port.to_string();
        let mut rules = Vec::new();
        for family in families {
            let nat = |step, args: &[&str]| {
                let mut all = vec!["-t", "nat"];
                all.extend_from_slice(args);
                Rule::new(family, step, &all)
            };
            rules.push(nat(Step::CreateChain, &["-N", CHAIN]));
            let owner = [
                "-A",
                CHAIN,
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                "-j",
                "RETURN",
            ];
            rules.push(nat(Step::Append, &owner));
            let loopback = ["-A", CHAIN, "-d", family.loopback(), "-j", "RETURN"];
            rules.push(nat(Step::Append, &loopback));

            let blocks: Vec<Option<&str>> = if blocks.is_empty() {
                vec![None]
            } else {
                let ours = blocks.iter().filter(|(f, _)| *f == family);
                ours.map(|(_, block)| Some(block.as_str())).collect()
            };
            let ports: Vec<Option<String>> = if self.ports.is_empty() {
                vec![None]
            } else {
                self.ports.iter().map(|p| Some(p.to_string())).collect()
            };
            for block in &blocks {
                for port in &ports {
                    let mut args = vec!["-A", CHAIN, "-p", "tcp"];
                    if let Some(block) = block {
                        args.extend(["-d", block]);
                    }
                    if let Some(port) = port {
                        args.extend(["--dport", port]);
                    }
                    args.extend(["-j", "REDIRECT", "--to-ports", &to_port]);
                    rules.push(nat(Step::Append, &args));
                }
            }
            rules.push(nat(Step::Jump, &["-A", "OUTPUT", "-p", "tcp", "-j", CHAIN]));
        }
        Ok(rules)
    }

    /// The rules as a shell script for a fresh network namespace (a new
    /// pod's), with a comment saying what they capture.
    pub fn script(&self) -> Result<String, String> {
        let rules = self.rules()?;
        let ports = match self.ports.as_slice() {
            [] => "any port".to_string(),
            ports => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                format!("port {}", list.join(","))
            }
        };
        let destinations = match self.destinations.as_slice() {
            [] => "any IPv4 address".to_string(),
            blocks => blocks.join(","),
        };
        let mut script = format!(
            "# Switchyard transparent capture: outbound TCP to {destinations} \
             on {ports}\n# goes to the transparent listener on port {}.\n\
             # Connections of uid {} (Switchyard) and to loopback are left \
             alone.\n# Written for a fresh network namespace; `switchyard \
             iptables --apply`\n# also replaces an earlier run's rules.\n",
            self.proxy_port, self.uid
        );
        for rule in rules {
            script.push_str(&rule.to_string());
            script.push('\n');
        }
        Ok(script)
    }

    /// Runs the rules with the `iptables` (and `ip6tables`) binary, each
    /// command echoed to `log` first. Running twice leaves one set: the
    /// chain is emptied and refilled, and the jump is added once. Stops at
    /// the first command that fails, saying which and why.
    pub fn apply(&self, log: &mut dyn std::io::Write) -> Result<usize, String> {
        let rules = self.rules()?;
        for rule in &rules {
            let binary = rule.family.binary();
            match rule.step {
                Step::CreateChain => {
                    let _ = writeln!(log, "{rule}");
                    if let Err(e) = run(binary, &rule.args) {
                        if !e.contains("already exists") {
                            return Err(e);
                        }
                        let flush = ["-t", "nat", "-F", CHAIN].map(String::from);
                        let _ = writeln!(log, "{binary} {} (it existed)", flush.join(" "));
                        run(binary, &flush)?;
                    }
                }
                Step::Append => {
                    let _ = writeln!(log, "{rule}");
                    run(binary, &rule.args)?;
                }
                Step::Jump => {
                    if run(binary, &rule.args_with("-C")).is_ok() {
                        let _ = writeln!(log, "{rule} (already there)");
                        continue;
                    }
                    let _ = writeln!(log, "{rule}");
                    run(binary, &rule.args)?;
                }
            }
        }
        Ok(rules.len())
    }
}

/// Why a loopback destination is refused, here and in `pool.capture`.
pub const LOOPBACK_NEVER_CAPTURED: &str = "is loopback, which the rules never \
     capture (the app reaches Switchyard itself there)";

/// Why a rule set with neither ports nor destinations is refused.
const NOTHING_TO_CAPTURE: &str = "give --ports, --destinations or both: \
     capturing every outbound connection would send traffic that no pool \
     serves (DNS over TCP, databases, the API server) to Switchyard";

/// What capturing everything does, for the refusal of a /0 block alone.
const EVERYTHING: &str = "every outbound connection, which would send \
     traffic that no pool serves (DNS over TCP, databases, the API server) \
     to Switchyard";

/// Parses one `--ports` or `--proxy-port` value; 0 and values past 65535
/// are refused with the same message.
pub fn parse_port(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(not_a_port(text)),
    }
}

fn not_a_port(text: &str) -> String {
    format!("{text} is not a port (1 to 65535)")
}

/// A destination block: `10.0.0.0/16`, `fd00::/64` or an address alone.
fn parse_block(text: &str) -> Result<(Family, String), String> {
    let (ip, prefix) = match text.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| {
        format!(
            "--destinations: {text:?} is not an address or CIDR block \
             (10.0.0.0/16, fd00::/64); resolve host names first"
        )
    })?;
    if ip.is_loopback() {
        return Err(format!(
            "--destinations: {text:?} {LOOPBACK_NEVER_CAPTURED}"
        ));
    }
    let (family, max) = match ip {
        IpAddr::V4(_) => (Family::V4, 32),
        IpAddr::V6(_) => (Family::V6, 128),
    };
    let prefix = match prefix {
        None => max,
        Some(prefix) => match prefix.parse::<u8>() {
            Ok(len) if len <= max => len,
            _ => {
                return Err(format!(
                    "--destinations: {text:?}: prefix must be 0 to {max}"
                ))
            }
        },
    };
    Ok((family, format!("{ip}/{prefix}")))
}

/// Runs one command; an error names it and says what it printed.
fn run(binary: &str, args: &[String]) -> Result<(), String> {
    let command = format!("{binary} {}", args.join(" "));
    let output = Command::new(binary).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "cannot run `{command}`: {binary} is not installed (the init \
                 container's image needs it)"
            )
        } else {
            format!("cannot run `{command}`: {e}")
        }
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let hint = if stderr.contains("Permission denied") || stderr.contains("you must be root") {
        " (needs root or the NET_ADMIN capability)"
    } else {
        ""
    };
    Err(format!(
        "`{command}` failed ({}){hint}: {}",
        output.status,
        stderr.trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(ports: &[u16], destinations: &[&str]) -> Vec<String> {
        let capture = CaptureRules {
            proxy_port: 15001,
            uid: 1337,
            ports: ports.to_vec(),
            destinations: destinations.iter().map(|d| d.to_string()).collect(),
        };
        capture
            .rules()
            .unwrap()
            .iter()
            .map(Rule::to_string)
            .collect()
    }

    #[test]
    fn ports_alone_redirect_ipv4_after_the_owner_and_loopback_returns() {
        assert_eq!(
            rules(&[8000, 8080], &[]),
            [
                "iptables -t nat -N SWITCHYARD_OUTPUT",
                "iptables -t nat -A SWITCHYARD_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "iptables -t nat -A SWITCHYARD_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "iptables -t nat -A SWITCHYARD_OUTPUT -p tcp --dport 8000 \
                 -j REDIRECT --to-ports 15001",
                "iptables -t nat -A SWITCHYARD_OUTPUT -p tcp --dport 8080 \
                 -j REDIRECT --to-ports 15001",
                "iptables -t nat -A OUTPUT -p tcp -j SWITCHYARD_OUTPUT",
            ]
        );
    }

    #[test]
    fn destinations_split_by_family_and_cross_the_ports() {
        let all = rules(&[8000], &["10.0.0.0/16", "fd00::/64", "10.1.2.3"]);
        let redirects: Vec<&String> = all.iter().filter(|r| r.contains("REDIRECT")).collect();
        assert_eq!(
            redirects,
            [
                "iptables -t nat -A SWITCHYARD_OUTPUT -p tcp -d 10.0.0.0/16 \
                 --dport 8000 -j REDIRECT --to-ports 15001",
                "iptables -t nat -A SWITCHYARD_OUTPUT -p tcp -d 10.1.2.3/32 \
                 --dport 8000 -j REDIRECT --to-ports 15001",
                "ip6tables -t nat -A SWITCHYARD_OUTPUT -p tcp -d fd00::/64 \
                 --dport 8000 -j REDIRECT --to-ports 15001",
            ]
        );
        assert!(all.contains(&"ip6tables -t nat -A SWITCHYARD_OUTPUT -d ::1/128 -j RETURN".into()));
        let jumps = all.iter().filter(|r| r.contains("-A OUTPUT")).count();
        assert_eq!(jumps, 2, "one jump per family: {all:#?}");
        assert_eq!(
            all.last().map(String::as_str),
            Some("ip6tables -t nat -A OUTPUT -p tcp -j SWITCHYARD_OUTPUT")
        );
    }

    #[test]
    fn destinations_alone_capture_every_port() {
        let all = rules(&[], &["10.0.0.5"]);
        assert!(all.contains(
            &"iptables -t nat -A SWITCHYARD_OUTPUT -p tcp -d 10.0.0.5/32 \
              -j REDIRECT --to-ports 15001"
                .to_string()
        ));
    }

    #[test]
    fn bad_requests_for_rules_say_what_to_give() {
        let capture = |ports: Vec<u16>, destinations: Vec<&str>| CaptureRules {
            proxy_port: 15001,
            uid: 1337,
            ports,
            destinations: destinations.into_iter().map(String::from).collect(),
        };
        let err = capture(vec![], vec![]).rules().unwrap_err();
        assert!(err.contains("--ports, --destinations"), "{err}");
        let err = capture(vec![], vec!["vllm.svc"]).rules().unwrap_err();
        assert!(err.contains("resolve host names"), "{err}");
        let err = capture(vec![], vec!["127.0.0.1"]).rules().unwrap_err();
        assert!(err.contains("loopback"), "{err}");
        let err = capture(vec![], vec!["10.0.0.0/40"]).rules().unwrap_err();
        assert!(err.contains("0 to 32"), "{err}");
        let err = capture(vec![0], vec![]).rules().unwrap_err();
        assert!(err.contains("--ports"), "{err}");
    }

    #[test]
    fn a_zero_prefix_without_ports_is_refused_like_no_options() {
        let capture = |ports: Vec<u16>, destination: &str| CaptureRules {
            proxy_port: 15001,
            uid: 1337,
            ports,
            destinations: vec![destination.to_string()],
        };
        for everything in ["0.0.0.0/0", "::/0", "10.0.0.0/0"] {
            let err = capture(vec![], everything).rules().unwrap_err();
            assert!(err.contains("every outbound connection"), "{err}");
            assert!(err.contains("--ports"), "{err}");
        }
        // With ports, /0 only says which family's ports.
        assert!(capture(vec![8000], "0.0.0.0/0").rules().is_ok());
    }

    #[test]
    fn ports_out_of_range_get_one_message() {
        assert_eq!(parse_port("8000"), Ok(8000));
        let zero = parse_port("0").unwrap_err();
        let big = parse_port("70000").unwrap_err();
        assert_eq!(zero, "0 is not a port (1 to 65535)");
        assert_eq!(big, "70000 is not a port (1 to 65535)");
    }

    #[test]
    fn the_script_says_what_it_captures_then_lists_the_commands() {
        let capture = CaptureRules {
            proxy_port: 15001,
            uid: 1337,
            ports: vec![8000],
            destinations: vec![],
        };
        let script = capture.script().unwrap();
        assert!(
            script.starts_with("# Switchyard transparent capture"),
            "{script}"
        );
        assert!(script.contains("uid 1337"), "{script}");
        let commands: Vec<&str> = script.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(commands.len(), 5, "{script}");
    }

    #[test]
    fn the_jump_is_checked_with_the_same_arguments() {
        let rule = Rule::new(Family::V4, Step::Jump, &["-t", "nat", "-A", "OUTPUT"]);
        assert_eq!(rule.args_with("-C"), ["-t", "nat", "-C", "OUTPUT"]);
    }
}
