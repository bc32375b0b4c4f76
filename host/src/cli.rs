//! The command line: arguments parsed, the one-shot commands (`check`, `plugins`,
//! `routes`, `status`, `health`) run here, `run` handed to [`crate::daemon`]. The only
//! module where `anyhow` is used: a one-shot command reports any error and exits.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config::Config;
use crate::logging::{self, LogFormat};
use crate::plugins::{self, CallOptions, PluginHost};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

use warden_plugin_api::Kind;

#[derive(Parser)]
#[command(
    name = "warden",
    version,
    about = "Keeps a host's router in step with its containers; scales ECS tasks from plugin metrics."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Load plugin files and directories that are writable by group/others or owned by
    /// another user (development only).
    #[arg(long, global = true)]
    allow_insecure_plugins: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect plugin files.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
    /// Validate the config and every plugin config it references.
    Check {
        #[arg(long, env = "WARDEN_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Show the leader, the hosts and every managed service's last decision.
    Status {
        #[arg(long, env = "WARDEN_CONFIG")]
        config: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show this host's routing table as the router sees it: front-ends, backends, servers
    /// and their containers, conflicts, keys left alone, containers not routed.
    Routes {
        #[arg(long, env = "WARDEN_CONFIG")]
        config: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running warden's HTTP endpoint whether it is ready (`/readyz`): exit 0 when it
    /// answers 200, 1 otherwise. For container health checks in images without a shell.
    Health {
        #[arg(long, env = "WARDEN_CONFIG")]
        config: Option<PathBuf>,
        /// Address to ask instead of the configured `http.listen`.
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
        /// Path to ask (`/livez` for liveness only).
        #[arg(long, default_value = "/readyz")]
        path: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Hosts one isolated plugin instance for a warden daemon (started by warden itself).
    #[command(hide = true, name = "plugin-host")]
    PluginHost {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        socket: PathBuf,
        /// The file's SHA-256 pin: checked on the descriptor that is then loaded.
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Run the daemon until SIGTERM or SIGINT.
    Run {
        #[arg(long, env = "WARDEN_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// List the plugins in the plugin directories, one a line.
    List {
        /// Directory to scan (repeatable); default: the configured plugin directories.
        #[arg(long = "dir")]
        dirs: Vec<PathBuf>,
        #[arg(long, env = "WARDEN_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Loads one file as warden would and prints a JSON report (used by warden itself, in
    /// a child process, before it loads a file into the daemon).
    #[command(hide = true)]
    Probe { file: PathBuf },
    /// Load one plugin file and validate it (and a config for it).
    Check {
        file: PathBuf,
        /// Instance config (JSON) to validate against the plugin's schema and create.
        #[arg(long)]
        config: Option<String>,
        /// Which kind the config is for, when the plugin offers several.
        #[arg(long)]
        kind: Option<String>,
        /// Also call the instance once (`measure`, or `list` for service definitions).
        #[arg(long)]
        call: bool,
    },
    /// Load one plugin file, create an instance and call it as the daemon does (schema
    /// check, panic guard, timeout); print the answer, the error kind and the time taken
    /// as JSON. Exit 1 when a call fails.
    Call {
        file: PathBuf,
        /// Instance config (JSON).
        #[arg(long, default_value = "{}")]
        config: String,
        /// Which kind the config is for, when the plugin offers several.
        #[arg(long)]
        kind: Option<String>,
        /// Operation: measure or map (metric sources), list or generation (service
        /// definitions). Default: measure, or list for a service-definitions plugin.
        #[arg(long)]
        op: Option<String>,
        /// The value given to `map`.
        #[arg(long)]
        value: Option<f64>,
        /// Call this many times (the time taken is then given as min, median and max).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Longest one call may take, in ms (the daemon's plugins.call_timeout_ms).
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

/// `warden`'s `main`: parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for the process (Redis over TLS; the AWS SDK brings its own
    // client but shares the library): aws-lc-rs, already linked by the AWS SDK.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    if let Command::Plugins {
        command: PluginsCommand::Probe { file },
    } = &cli.command
    {
        let report = plugins::probe::run_here(file);
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report serializes")
        );
        return ExitCode::SUCCESS;
    }
    // Every plugin file is probed in a child (this same binary) before it is loaded here.
    if let Ok(exe) = std::env::current_exe() {
        plugins::probe::set_command(exe);
    }
    // The daemon logs what it does; one-shot commands print results and log only problems.
    let level = if matches!(
        cli.command,
        Command::Run { .. } | Command::PluginHost { .. }
    ) {
        "info"
    } else {
        "warn"
    };
    logging::init(cli.log_format, level);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warden: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(Config::load(path, |k| std::env::var(k).ok())?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let insecure = cli.allow_insecure_plugins;
    match cli.command {
        Command::Plugins {
            command: PluginsCommand::List { dirs, config },
        } => plugins_list(dirs, config, insecure),
        Command::Plugins {
            command:
                PluginsCommand::Check {
                    file,
                    config,
                    kind,
                    call,
                },
        } => plugins_check(file, config, kind, call, insecure),
        Command::Plugins {
            command:
                PluginsCommand::Call {
                    file,
                    config,
                    kind,
                    op,
                    value,
                    repeat,
                    timeout_ms,
                },
        } => crate::plugins::call::run(
            &file,
            crate::plugins::call::Request {
                config,
                kind,
                op,
                value,
                repeat,
                timeout: std::time::Duration::from_millis(timeout_ms),
            },
            insecure,
        ),
        Command::Plugins {
            command: PluginsCommand::Probe { .. },
        } => unreachable!("handled before logging is set up"),
        Command::Check { config } => check(config, insecure),
        Command::Run { config } => daemon(config, insecure),
        Command::PluginHost {
            file,
            socket,
            sha256,
        } => {
            plugins::isolated::serve(&file, &socket, sha256.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Health {
            config,
            addr,
            path,
            timeout,
        } => health(config, addr, &path, timeout),
        Command::Routes { config, json } => routes(config, json),
        Command::Status { config, json } => status(config, json),
    }
}

/// `warden plugins list`: name, version, kinds, interface version and path of each.
fn plugins_list(
    dirs: Vec<PathBuf>,
    config: Option<PathBuf>,
    insecure: bool,
) -> anyhow::Result<ExitCode> {
    let dirs = if dirs.is_empty() {
        load_config(config.as_deref())?.plugins.dirs
    } else {
        dirs
    };
    let host = PluginHost::load_dirs(&dirs, insecure);
    for p in host.plugins() {
        let m = p.manifest();
        println!(
            "{}\t{}\t{}\tapi {}\t{}",
            m.name,
            m.version,
            m.kind_names().join(","),
            m.api_version,
            p.path().display()
        );
    }
    for f in host.failures() {
        eprintln!("not loaded: {f}");
    }
    Ok(ExitCode::SUCCESS)
}

/// A runtime for one command's I/O.
fn one_shot() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// `warden routes`: this host's routing table, as text or JSON.
fn routes(config: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let config = load_config(config.as_deref())?;
    let routes = one_shot()?.block_on(crate::routes::read(
        &config.registrar.local_redis,
        config.registrar.local_redis_ca_file.as_deref(),
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&routes)?);
    } else {
        print!("{}", crate::routes::render(&routes));
    }
    Ok(ExitCode::SUCCESS)
}

/// `warden status`: the cluster's leader and managed services, from the central Redis.
fn status(config: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    let config = load_config(config.as_deref())?;
    let url = config
        .manager
        .central_redis
        .context("manager.central_redis is not set (or WARDEN_CENTRAL_REDIS): nothing to ask")?;
    let status = one_shot()?.block_on(crate::status::read(
        &url,
        config.manager.central_redis_ca_file.as_deref(),
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", crate::status::render(&status));
    }
    Ok(ExitCode::SUCCESS)
}

fn plugins_check(
    file: PathBuf,
    config: Option<String>,
    kind: Option<String>,
    call: bool,
    insecure: bool,
) -> anyhow::Result<ExitCode> {
    let plugin = match plugins::load_file(&file, insecure) {
        Ok(p) => Arc::new(p),
        Err(reason) => {
            println!("{}: refused: {reason}", file.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let m = plugin.manifest();
    println!(
        "{}: ok: plugin {} {} (api {}), offers {}",
        file.display(),
        m.name,
        m.version,
        m.api_version,
        m.kind_names().join(", ")
    );
    let Some(config) = config else {
        return Ok(ExitCode::SUCCESS);
    };
    let kind = match kind.as_deref() {
        Some(k) => Kind::parse(k).with_context(|| {
            format!("--kind: expected metric-source or service-definitions, got {k:?}")
        })?,
        None if m.kinds.len() == 1 => m.kinds[0].kind,
        None => anyhow::bail!(
            "--kind: plugin {} offers several kinds ({}); say which",
            m.name,
            m.kind_names().join(", ")
        ),
    };
    let value: serde_json::Value = serde_json::from_str(&config).context("--config: not JSON")?;
    if let Err(e) = plugins::check_plugin_config(&plugin, kind, &value) {
        println!("{}: config refused: {e}", file.display());
        return Ok(ExitCode::FAILURE);
    }
    let rt = tokio::runtime::Runtime::new()?;
    let created = rt.block_on(plugins::create_instance(
        plugin.clone(),
        kind,
        &value,
        CallOptions::default(),
    ));
    let client = match created {
        Ok(client) => client,
        Err(e) => {
            println!("{}: config refused: {e}", file.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    println!(
        "{}: ok: config accepted and {kind} instance created",
        file.display()
    );
    let client: Arc<dyn plugins::PluginClient> = client;
    let code = if call {
        call_once(&rt, &file, &client, kind)
    } else {
        ExitCode::SUCCESS
    };
    client.shutdown();
    Ok(code)
}

/// `plugins check --call`: the kind's default call once, its answer and time printed.
fn call_once(
    rt: &tokio::runtime::Runtime,
    file: &std::path::Path,
    client: &Arc<dyn plugins::PluginClient>,
    kind: Kind,
) -> ExitCode {
    let started = std::time::Instant::now();
    match rt.block_on(crate::plugins::call::once(client, kind, None, None)) {
        Ok(answer) => {
            println!(
                "{}: ok: {} answered {answer} in {:.1} ms",
                file.display(),
                crate::plugins::call::default_op(kind),
                started.elapsed().as_secs_f64() * 1000.0
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "{}: call failed ({}): {e}",
                file.display(),
                crate::plugins::call::kind_of(&e)
            );
            ExitCode::FAILURE
        }
    }
}

fn health(
    config: Option<PathBuf>,
    addr: Option<std::net::SocketAddr>,
    path: &str,
    timeout: u64,
) -> anyhow::Result<ExitCode> {
    let addr = match addr {
        Some(a) => a,
        None => {
            let mut a = load_config(config.as_deref())?
                .http
                .addr()
                .map_err(|m| anyhow::anyhow!("http.listen: {m}"))?
                .context("http.listen is off: there is no endpoint to ask")?;
            // A wildcard listen is asked on loopback.
            if a.ip().is_unspecified() {
                a.set_ip(if a.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            a
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(crate::http::probe(
        addr,
        path,
        std::time::Duration::from_secs(timeout),
    )) {
        Ok(body) => {
            println!("{body}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("warden health: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn check(path: Option<PathBuf>, insecure: bool) -> anyhow::Result<ExitCode> {
    // The same exit code as `run` for the same file: 78 for any configuration error.
    let config = match load_config(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            println!("{e:#}");
            return Ok(ExitCode::from(crate::supervisor::EXIT_CONFIG));
        }
    };
    let file = path.as_ref().map_or("(embedded defaults)".to_owned(), |p| {
        p.display().to_string()
    });
    let host = crate::daemon::load_plugins(&config, insecure);
    let problems = crate::daemon::problems(&config, &host);
    for p in &problems {
        println!("{file}: {p}");
    }
    for f in host.failures() {
        println!("warning: plugin not loaded: {f}");
    }
    if !problems.is_empty() {
        return Ok(ExitCode::from(crate::supervisor::EXIT_CONFIG));
    }
    println!(
        "{file}: ok ({} plugins loaded, {} plugin configs checked)",
        host.plugins().len(),
        config.plugin_refs().len()
    );
    Ok(ExitCode::SUCCESS)
}

fn daemon(path: Option<PathBuf>, insecure: bool) -> anyhow::Result<ExitCode> {
    // The same checks as `warden check`: a configuration that cannot work stops here.
    let config = match load_config(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            for line in format!("{e:#}").lines() {
                eprintln!("warden: {line}");
            }
            return Ok(ExitCode::from(crate::supervisor::EXIT_CONFIG));
        }
    };
    // A panic anywhere is said in the log, with where it happened.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        let text = crate::supervisor::panic_text(info.payload());
        tracing::error!("panic{at}: {text}");
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = rt.block_on(async move {
        // Listen before anything else, so that a signal sent once we say we run is never
        // taken by the default action.
        let shutdown = shutdown_signal()?;
        let reload = other_signals()?;
        Ok::<_, anyhow::Error>(crate::daemon::run(config, path, insecure, shutdown, reload).await)
    })?;
    // A plugin stuck in `new` holds a blocking thread: do not wait for it.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match outcome {
        Ok(()) => {
            // The last line of a clean stop: every task has ended, nothing logs after it.
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(fatal) => {
            for line in fatal.to_string().lines() {
                eprintln!("warden: {line}");
            }
            Ok(ExitCode::from(fatal.exit_code()))
        }
    }
}

/// Signals that are logged and ignored: their default action would end warden (or dump
/// its core) without a word and without giving up its lease, and log rotators and
/// process supervisors send some of them (USR1, USR2) as a matter of course. SIGPIPE is
/// ignored by Rust's runtime already (a closed peer is an error on the write).
const IGNORED: [(libc::c_int, &str); 10] = [
    (libc::SIGUSR1, "SIGUSR1"),
    (libc::SIGUSR2, "SIGUSR2"),
    (libc::SIGALRM, "SIGALRM"),
    (libc::SIGVTALRM, "SIGVTALRM"),
    (libc::SIGPROF, "SIGPROF"),
    (libc::SIGIO, "SIGIO"),
    (libc::SIGPWR, "SIGPWR"),
    (libc::SIGXFSZ, "SIGXFSZ"),
    (libc::SIGXCPU, "SIGXCPU"),
    (libc::SIGWINCH, "SIGWINCH"),
];

/// SIGHUP asks for a configuration reload (the receiver gets one message per signal);
/// the [`IGNORED`] ones are logged and ignored. None is ever fatal.
fn other_signals() -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    for (number, name) in IGNORED {
        let mut stream = signal(SignalKind::from_raw(number))
            .with_context(|| format!("cannot listen for {name}"))?;
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                tracing::info!(signal = name, "{name} received; ignored");
            }
        });
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the configuration");
            let _ = tx.send(());
        }
    });
    Ok(rx)
}

/// Resolves on the first SIGTERM, SIGINT or SIGQUIT (each a stop with handover: a
/// core dump on QUIT would cost the lease and the routes' drain); the handlers are in
/// place when this returns.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut quit = signal(SignalKind::quit()).context("cannot listen for SIGQUIT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "SIGTERM received: stopping"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "SIGINT received: stopping"),
            _ = quit.recv() => tracing::info!(signal = "SIGQUIT", "SIGQUIT received: stopping"),
        }
    })
}
