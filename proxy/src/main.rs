//! The `switchyard` command: `run` serves, `check` validates a
//! configuration, `plugin test` shows a plugin's decision, `iptables`
//! writes the transparent-capture rules.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::config::{Config, PoolKind, EMBEDDED_DEFAULT};
use switchyard::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy. Without --config, serves the small model in-process
    /// on 127.0.0.1:8080 (the embedded default configuration).
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log line format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate a configuration file and exit: 0 when it is valid.
    Check {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Send a request set through the small pool and show, for a range
    /// of mean-logprob thresholds, the escalation rate, the share of
    /// hard requests caught and the cost.
    Calibrate {
        /// Configuration file (TOML) with the pools and their prices.
        #[arg(long, short)]
        config: PathBuf,
        /// JSON lines: {"request": {..}, "label": "easy"|"hard",
        /// "headers": {..}}.
        #[arg(long)]
        requests: PathBuf,
        /// The small pool.
        #[arg(long, default_value = "small")]
        small: String,
        /// The pool escalations go to.
        #[arg(long, default_value = "large")]
        large: String,
        /// Thresholds to try, comma-separated. Default
        /// -0.1,-0.25,-0.5,-0.75,-1,-1.5,-2.
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        thresholds: Vec<f32>,
    },
    /// Print the iptables rules that redirect the pod's outbound TCP
    /// connections to model servers to the transparent listener
    /// (`[server.transparent]`), or run them (--apply) from an init
    /// container with NET_ADMIN.
    Iptables {
        /// Run the rules with the `iptables` binary instead of printing
        /// them.
        #[arg(long)]
        apply: bool,
        /// Port of `server.transparent.listen`.
        #[arg(
            long,
            default_value_t = switchyard::iptables::DEFAULT_PROXY_PORT,
            value_parser = switchyard::iptables::parse_port
        )]
        proxy_port: u16,
        /// User Switchyard runs as; its own connections are not captured.
        #[arg(long, default_value_t = switchyard::iptables::DEFAULT_UID)]
        uid: u32,
        /// Destination ports to capture, comma-separated (8000,8080).
        #[arg(
            long,
            value_delimiter = ',',
            value_parser = switchyard::iptables::parse_port
        )]
        ports: Vec<u16>,
        /// Destination addresses or CIDR blocks to capture,
        /// comma-separated (10.0.0.0/16,fd00::/64). IPv6 blocks get
        /// ip6tables rules.
        #[arg(long, value_delimiter = ',')]
        destinations: Vec<String>,
    },
    /// Tools for plugin authors.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Load a plugin, give it one request and print its decision (and,
    /// with --answer, its review) as JSON. Nothing is sent upstream.
    Test {
        /// The plugin (`.wasm` component).
        plugin: PathBuf,
        /// The plugin's configuration, as JSON. Default `{}`.
        #[arg(long, default_value = "{}")]
        config: String,
        /// A JSON file with an OpenAI request body; `messages`, `prompt`
        /// or `input` says which endpoint.
        #[arg(long)]
        request: PathBuf,
        /// A request header, `name: value`; repeat for more.
        #[arg(long)]
        header: Vec<String>,
        /// A JSON file with an OpenAI answer to review as the small
        /// pool's.
        #[arg(long)]
        answer: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Calibrate {
            config,
            requests,
            small,
            large,
            thresholds,
        } => calibrate(&config, &requests, small, large, thresholds),
        Command::Iptables {
            apply,
            proxy_port,
            uid,
            ports,
            destinations,
        } => {
            let rules = switchyard::iptables::CaptureRules {
                proxy_port,
                uid,
                ports,
                destinations,
            };
            iptables(&rules, apply)
        }
        Command::Plugin {
            command:
                PluginCommand::Test {
                    plugin,
                    config,
                    request,
                    header,
                    answer,
                },
        } => {
            // The plugin's own log lines and panic messages, beside the
            // report on stdout.
            telemetry::init_on_stderr();
            plugin_test(plugin, &config, &request, header, answer.as_deref())
        }
        Command::Run { config, log_format } => {
            telemetry::init(log_format);
            match run(config.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    // The plugin is loaded too: a file that exists but does not load, or
    // whose init rejects its configuration, fails here rather than at run.
    if let Some(policy) = &config.policy {
        if let Err(e) = switchyard_policy::Policy::load(&policy.settings()) {
            eprintln!("{}: policy.plugin: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    // A local pool's model file is opened and its weights checked, without
    // starting the executor.
    for (i, pool) in config.pool.iter().enumerate() {
        if pool.kind != PoolKind::Local {
            continue;
        }
        if let Err(e) = switchyard_executor::check_model(&pool.model_path()) {
            eprintln!("{}: pool[{i}].model_path: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let pools = match config.pool.len() {
        1 => "1 pool".to_string(),
        n => format!("{n} pools"),
    };
    eprintln!(
        "{}: ok ({pools}, policy: {})",
        path.display(),
        config
            .policy
            .as_ref()
            .map_or("none".to_string(), |p| p.plugin.display().to_string())
    );
    ExitCode::SUCCESS
}

fn calibrate(
    config: &std::path::Path,
    requests: &std::path::Path,
    small: String,
    large: String,
    thresholds: Vec<f32>,
) -> ExitCode {
    let result = (|| {
        let config = Config::load(config).map_err(|e| format!("{}: {e}", config.display()))?;
        let requests = std::fs::read_to_string(requests)
            .map_err(|e| format!("--requests {}: {e}", requests.display()))?;
        let thresholds = if thresholds.is_empty() {
            switchyard::calibrate::DEFAULT_THRESHOLDS.to_vec()
        } else {
            thresholds
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        runtime.block_on(switchyard::calibrate::run(
            switchyard::calibrate::Calibration {
                config,
                requests,
                small,
                large,
                thresholds,
            },
        ))
    })();
    match result {
        Ok(table) => {
            use std::io::Write;
            let _ = write!(std::io::stdout().lock(), "{table}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchyard calibrate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn iptables(rules: &switchyard::iptables::CaptureRules, apply: bool) -> ExitCode {
    use std::io::Write;
    let result = if apply {
        rules.apply(&mut std::io::stderr()).map(|count| {
            eprintln!("switchyard iptables: {count} rules in place");
        })
    } else {
        rules.script().map(|script| {
            let _ = write!(std::io::stdout().lock(), "{script}");
        })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard iptables: {e}");
            ExitCode::FAILURE
        }
    }
}

fn plugin_test(
    plugin: PathBuf,
    config: &str,
    request: &std::path::Path,
    headers: Vec<String>,
    answer: Option<&std::path::Path>,
) -> ExitCode {
    let read_json = |what: &str, path: &std::path::Path| -> Result<serde_json::Value, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--{what} {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("--{what} {}: {e}", path.display()))
    };
    let result = (|| {
        let test = switchyard::plugin_test::PluginTest {
            plugin,
            config: serde_json::from_str(config).map_err(|e| format!("--config: {e}"))?,
            request: read_json("request", request)?,
            headers,
            answer: answer.map(|a| read_json("answer", a)).transpose()?,
        };
        switchyard::plugin_test::run(&test)
    })();
    match result {
        Ok(report) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{report:#}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchyard plugin test: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: Option<&std::path::Path>) -> Result<(), String> {
    let config = match path {
        Some(path) => Config::load(path).map_err(|e| format!("{}: {e}", path.display()))?,
        None => {
            tracing::info!("no --config given; using the embedded default (pool \"small\", local)");
            Config::parse(EMBEDDED_DEFAULT).map_err(|e| format!("embedded default: {e}"))?
        }
    };
    let policy = match &config.policy {
        Some(policy) => Some(
            switchyard_policy::Policy::load(&policy.settings())
                .map_err(|e| format!("policy.plugin: {e}"))?,
        ),
        None => None,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let metrics = switchyard::metrics::install()?;
        let path = path.map(std::path::Path::to_path_buf);
        switchyard::server::run(config, path, policy, metrics, shutdown_signal()).await
    })
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a SIGTERM that arrives
/// while the server is still starting begins a graceful shutdown rather
/// than killing the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM and SIGINT");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
