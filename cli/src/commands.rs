//! The subcommands of `coevo` that need no libtorch — `keys`, `fleet`, `broker` (and its
//! hidden `--front-process` mode), `status`, `report` — with their clap definitions and
//! handlers. Both binaries use them: the lean `coevo` runs them in-process (it starts in
//! milliseconds, and each broker front process stays small), and `coevo-ml` flattens
//! [`LeanCommand`] into the full command line, so `coevo --help` lists everything.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use coevo_ops::FleetRegistry;
use std::path::PathBuf;

use crate::provision::{read_key, read_public, write_key_pair};

/// The lean subcommands; `coevo-ml` flattens them into its own subcommand enum.
#[derive(Subcommand)]
pub enum LeanCommand {
    /// Run the embedded MQTT broker (rumqttd) with password auth.
    Broker(BrokerArgs),
    /// Manage Ed25519 signing keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Manage the fleet registry and broker credentials.
    #[command(subcommand)]
    Fleet(FleetCmd),
    /// Print the round reports of a run as a table with its alerts, or write them as an
    /// offline HTML report (--html) or per-client CSV (--csv).
    Report(crate::report_cmd::ReportArgs),
    /// Show the live state of the coordinator writing OUT: round, phase, registered,
    /// connected, uploaded, accepted, rejected and time left, with a progress bar, until the
    /// round closes. Reads OUT/status.json (rewritten every second by a running coordinator),
    /// so it works behind any broker; a file no longer rewritten is reported as a dead
    /// coordinator (non-zero exit).
    Status(StatusArgs),
}

/// `coevo status` flags.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The coordinator's `out` directory (or its status.json).
    pub out: PathBuf,
    /// Print one snapshot and exit.
    #[arg(long)]
    pub once: bool,
    /// JSON: one document with --once, else one line per second until the round closes.
    #[arg(long)]
    pub json: bool,
    /// Call a running coordinator dead when its file is older than this (seconds; default
    /// 5 or 3 of its intervals, whichever is longer).
    #[arg(long)]
    pub stale_after: Option<u64>,
}

/// `coevo broker` flags.
#[derive(clap::Args)]
pub struct BrokerArgs {
    /// Broker config (see broker/broker.sample.toml).
    #[arg(long, short, required_unless_present = "front_process")]
    pub config: Option<PathBuf>,
    /// Internal: serve as one of the broker's front processes (`front_processes` in the
    /// config); started by `coevo broker`, which sends the settings on stdin.
    #[arg(long, hide = true, conflicts_with = "config")]
    pub front_process: bool,
}

/// The lean `coevo` binary's command line: [`LeanCommand`] alone. The binary parses with it
/// only when the first argument names one of its subcommands (see [`is_lean`]); everything
/// else (including `--help`) goes to `coevo-ml`.
#[derive(Parser)]
#[command(
    name = "coevo",
    version,
    about = "Federated co-evolution of a teacher and edge students over MQTT"
)]
pub struct LeanCli {
    #[command(subcommand)]
    pub command: LeanCommand,
}

/// Whether `arg` (the first command-line argument) names a lean subcommand (or an alias of
/// one), asked of clap rather than a list kept by hand, so a new lean subcommand is routed
/// without further edits.
pub fn is_lean(arg: &std::ffi::OsStr) -> bool {
    use clap::CommandFactory;
    let Some(arg) = arg.to_str() else {
        return false;
    };
    LeanCli::command().find_subcommand(arg).is_some()
}

impl LeanCommand {
    /// Runs the subcommand in this process.
    pub fn run(self) -> Result<()> {
        match self {
            LeanCommand::Broker(args) => broker(args),
            LeanCommand::Keys(cmd) => keys(cmd),
            LeanCommand::Fleet(cmd) => fleet(cmd),
            LeanCommand::Report(args) => crate::report_cmd::run(&args),
            LeanCommand::Status(a) => crate::status::run(
                &a.out,
                a.once,
                a.json,
                a.stale_after.map(std::time::Duration::from_secs),
            ),
        }
    }
}

/// Logs filtered by `RUST_LOG`, else by `default`.
fn init_tracing(default: &str, to_stderr: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if to_stderr {
        fmt.with_writer(std::io::stderr).init();
    } else {
        fmt.init();
    }
}

/// `coevo broker`: the embedded broker until Ctrl-C, or (`--front-process`) one of its front
/// processes. The broker runs on its own threads; this thread only waits for the signal, on a
/// current-thread runtime (no idle worker threads in a process that may run many times over).
pub fn broker(args: BrokerArgs) -> Result<()> {
    if args.front_process {
        // stdout is the broker process's readiness pipe: logs go to stderr (shared with it).
        init_tracing("info,rumqttd=error", true);
        coevo_broker::run_front_process()?;
        return Ok(());
    }
    init_tracing("info,rumqttd=error", false);
    let config = args.config.context("--config is required")?;
    let cfg = coevo_broker::BrokerConfig::from_toml_file(&config)?;
    let handle = coevo_broker::start(cfg)?;
    println!("coevo broker listening on {}", handle.addr);
    if let Some(m) = handle.metrics_addr() {
        println!("Prometheus metrics on http://{m}/metrics");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(tokio::signal::ctrl_c())?;
    Ok(())
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Generate a key pair: OUT (PKCS#8, 0600) and OUT with extension .pub (hex public key).
    Gen {
        /// Private key path, e.g. keys/cam-001.pk8.
        out: PathBuf,
        /// Overwrite an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of a private key file.
    Show { key: PathBuf },
    /// Create a fleet CA and a broker TLS certificate signed by it: DIR/ca.pem (every client's
    /// `ca_cert`), DIR/ca.key (0600, keep offline), DIR/broker.pem and DIR/broker.key (0600,
    /// the broker's `[tls]`).
    Tls {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Fleet name (goes into the certificates' subject names).
        #[arg(long)]
        fleet: String,
        /// DNS name or IP address clients dial the broker by; repeat for several
        /// (default: localhost and 127.0.0.1).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity of both certificates, in days.
        #[arg(long, default_value_t = crate::tls::DEFAULT_DAYS)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Where bulk provisioning puts keys and secrets, and the optional Mosquitto export.
#[derive(clap::Args)]
pub struct BulkArgs {
    /// Key folder: ID.pub here is used (a key the device made), else ID.pk8 + ID.pub are
    /// generated here.
    #[arg(long, default_value = "keys")]
    keys: PathBuf,
    /// Folder receiving each device's generated broker secret (file ID, mode 0600).
    #[arg(long, default_value = "passwords")]
    passwords: PathBuf,
    /// Also write Mosquitto's passwd, acl and mosquitto.conf for the whole fleet here.
    #[arg(long, requires = "fleet")]
    mosquitto: Option<PathBuf>,
    /// Fleet name for the Mosquitto ACLs.
    #[arg(long)]
    fleet: Option<String>,
    /// The coordinator's client id (Mosquitto export).
    #[arg(long, default_value = "coordinator")]
    coordinator: String,
    /// Listener address for mosquitto.conf.
    #[arg(long, default_value = "127.0.0.1:1883")]
    listen: std::net::SocketAddr,
}

impl BulkArgs {
    fn options(
        &self,
        registry: PathBuf,
        credentials: PathBuf,
    ) -> crate::fleet_import::ImportOptions {
        crate::fleet_import::ImportOptions {
            registry,
            credentials,
            keys_dir: self.keys.clone(),
            passwords_dir: self.passwords.clone(),
            mosquitto: self
                .mosquitto
                .clone()
                .map(|dir| crate::fleet_import::MosquittoTarget {
                    dir,
                    fleet: self.fleet.clone().unwrap_or_default(),
                    coordinator: self.coordinator.clone(),
                    listen: self.listen,
                    user: None,
                }),
        }
    }
}

fn report_import(
    s: &crate::fleet_import::ImportSummary,
    o: &crate::fleet_import::ImportOptions,
    t: std::time::Instant,
) {
    eprintln!(
        "added {} clients ({} keys generated in {}, {} given; secrets in {}) in {:.1} s; {} now has {} clients{}",
        s.added,
        s.keys_generated,
        o.keys_dir.display(),
        s.keys_given,
        o.passwords_dir.display(),
        t.elapsed().as_secs_f64(),
        o.registry.display(),
        s.registered,
        o.mosquitto
            .as_ref()
            .map(|m| format!("; Mosquitto files in {}", m.dir.display()))
            .unwrap_or_default()
    );
}

#[derive(Subcommand)]
pub enum FleetCmd {
    /// Register clients: public keys in the registry, broker secrets in the credential file
    /// (hashed). One ID with --key: prints the generated secret (or sets --password). Several
    /// IDs: like `fleet import` (keys from/into --keys, secrets into --passwords), one write.
    Add {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Public key (one ID only): hex, or a .pub file from `coevo keys gen`.
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value = "fleet.toml")]
        registry: PathBuf,
        #[arg(long, default_value = "credentials.toml")]
        credentials: PathBuf,
        /// Broker password a human chose (one ID only; stored as argon2id). Default: generate
        /// a 143-bit secret (stored as a fast salted HMAC) and print it.
        #[arg(long, env = "COEVO_NEW_PASSWORD")]
        password: Option<String>,
        #[command(flatten)]
        bulk: BulkArgs,
    },
    /// Register many cameras in one pass: DEVICES is one id per line, or a CSV whose header
    /// names an `id` column (and optionally `public_key`). Writes keys (unless given),
    /// generated secrets, the registry and the credential file once, and optionally the
    /// Mosquitto files. Refuses duplicates and registered ids (with line numbers) before
    /// writing anything.
    Import {
        devices: PathBuf,
        #[arg(long, default_value = "fleet.toml")]
        registry: PathBuf,
        #[arg(long, default_value = "credentials.toml")]
        credentials: PathBuf,
        #[command(flatten)]
        bulk: BulkArgs,
    },
    /// Remove a client from the registry and the credential file. A running embedded broker
    /// (`coevo broker`, `coevo demo`) re-reads the file within ~1 s and closes the client's
    /// connection; Mosquitto needs a re-export and `kill -HUP`.
    Remove {
        id: String,
        #[arg(long, default_value = "fleet.toml")]
        registry: PathBuf,
        #[arg(long, default_value = "credentials.toml")]
        credentials: PathBuf,
    },
    /// List registered clients.
    List {
        #[arg(long, default_value = "fleet.toml")]
        registry: PathBuf,
    },
    /// Write a Mosquitto password file, ACL file (the embedded broker's rules: each camera may
    /// publish only its own delta/{client}/# and status/{client}, and read only the round, the
    /// models and its own receipts) and mosquitto.conf (client id = user name) into DIR.
    ExportMosquitto {
        dir: PathBuf,
        #[command(flatten)]
        fleet: ExportFleet,
        /// Listener address for mosquitto.conf.
        #[arg(long, default_value = "127.0.0.1:1883")]
        listen: std::net::SocketAddr,
        /// User Mosquitto switches to after start (it reads DIR/passwd, 0600, as that user);
        /// default: Mosquitto's own (`mosquitto`). Run as root, the export gives DIR to it.
        #[arg(long)]
        user: Option<String>,
    },
    /// Write a clustered NATS server config (MQTT gateway + JetStream, Debian's `nats-server`)
    /// into DIR: users.conf (bcrypt hashes, the embedded broker's ACL as NATS permissions) and
    /// node-1.conf … node-N.conf. Start each node with `nats-server -c DIR/node-I.conf`; point
    /// clients at every node's MQTT port (`[broker] cluster` in the configs).
    ExportNats {
        dir: PathBuf,
        #[command(flatten)]
        fleet: ExportFleet,
        /// One node per host, each on the same ports (a real cluster). Without it: --nodes
        /// nodes on --host with consecutive ports (a one-box cluster).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Nodes on one host (ignored with --hosts). 3 is the smallest cluster that keeps a
        /// JetStream quorum when a node dies.
        #[arg(long, default_value_t = crate::nats::DEFAULT_NODES)]
        nodes: usize,
        /// Host of a one-box cluster.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// MQTT port of the first node (the next nodes of a one-box cluster count up).
        #[arg(long, default_value_t = 1883)]
        mqtt_port: u16,
        /// NATS client port of the first node (operators' tools; fleet users are MQTT-only).
        #[arg(long, default_value_t = 4222)]
        client_port: u16,
        /// Cluster route port of the first node.
        #[arg(long, default_value_t = 6222)]
        cluster_port: u16,
        /// HTTP monitoring port of the first node (/healthz, /jsz); 0 = off.
        #[arg(long, default_value_t = 8222)]
        monitor_port: u16,
        /// Cluster name.
        #[arg(long, default_value = "coevo")]
        cluster_name: String,
    },
    /// Give a non-client (e.g. the coordinator) a broker password.
    Password {
        id: String,
        #[arg(long, default_value = "credentials.toml")]
        credentials: PathBuf,
        #[arg(long, env = "COEVO_NEW_PASSWORD")]
        password: Option<String>,
    },
}

/// What a broker export reads: the fleet's registry and credentials, and whose rules to write.
#[derive(clap::Args, Debug)]
pub struct ExportFleet {
    /// Fleet name (topic namespace) the rules are for.
    #[arg(long)]
    fleet: String,
    /// The coordinator's client id (gets read/write on the whole fleet).
    #[arg(long, default_value = "coordinator")]
    coordinator: String,
    #[arg(long, default_value = "fleet.toml")]
    registry: PathBuf,
    #[arg(long, default_value = "credentials.toml")]
    credentials: PathBuf,
}

impl ExportFleet {
    fn load(&self) -> Result<(FleetRegistry, coevo_broker::Credentials)> {
        Ok((
            FleetRegistry::load(&self.registry)?,
            coevo_broker::Credentials::load(&self.credentials)?,
        ))
    }
}

/// `coevo keys …`.
pub fn keys(cmd: KeysCmd) -> Result<()> {
    match cmd {
        KeysCmd::Gen { out, force } => {
            if out.exists() && !force {
                bail!("{} exists; pass --force to overwrite", out.display());
            }
            let key = write_key_pair(&out)?;
            println!("{}", key.public_key());
            eprintln!(
                "wrote {} and {}",
                out.display(),
                out.with_extension("pub").display()
            );
        }
        KeysCmd::Show { key } => println!("{}", read_key(&key)?.public_key()),
        KeysCmd::Tls {
            out,
            fleet,
            hosts,
            days,
            force,
        } => {
            let opts = crate::tls::FleetTlsOptions {
                fleet,
                hosts,
                days,
                force,
            };
            let files = crate::tls::write_fleet_tls(&out, &opts)
                .with_context(|| format!("creating TLS files in {}", out.display()))?;
            eprintln!(
                "wrote {} (clients' ca_cert), {} (keep offline), {} and {} (broker [tls])",
                files.ca_cert.display(),
                files.ca_key.display(),
                files.broker_cert.display(),
                files.broker_key.display()
            );
        }
    }
    Ok(())
}

fn load_credentials(path: &std::path::Path) -> Result<coevo_broker::Credentials> {
    if path.exists() {
        Ok(coevo_broker::Credentials::load(path)?)
    } else {
        Ok(coevo_broker::Credentials::default())
    }
}

/// Sets `id`'s broker secret: a generated one (high-entropy) under the fast device-secret
/// hash, one a human chose under argon2id. Returns the generated secret, for the caller to
/// print once.
fn set_secret(
    creds: &mut coevo_broker::Credentials,
    id: &str,
    password: Option<String>,
) -> Result<Option<String>> {
    match password {
        None => {
            let pw = coevo_broker::generate_password();
            creds.set_device_secret(id, &pw)?;
            Ok(Some(pw))
        }
        Some(pw) => {
            creds.set_password(id, &pw)?;
            Ok(None)
        }
    }
}

/// `coevo fleet …`.
pub fn fleet(cmd: FleetCmd) -> Result<()> {
    let load_registry = |p: &std::path::Path| -> Result<FleetRegistry> {
        if p.exists() {
            Ok(FleetRegistry::load(p)?)
        } else {
            Ok(FleetRegistry::default())
        }
    };
    match cmd {
        FleetCmd::Add {
            ids,
            key,
            registry,
            credentials,
            password,
            bulk,
        } => {
            let Some(key) = key else {
                if password.is_some() {
                    bail!("--password needs --key and a single id: bulk adds generate secrets");
                }
                let t = std::time::Instant::now();
                let devices = crate::fleet_import::devices_from_ids(&ids)?;
                let o = bulk.options(registry, credentials);
                let s = crate::fleet_import::import(&devices, &o)?;
                report_import(&s, &o, t);
                return Ok(());
            };
            let [id] = &ids[..] else {
                bail!("--key names one client's key; give one id, or use --keys DIR for several");
            };
            let id = id.clone();
            let pk = read_public(&key)?;
            let mut reg = load_registry(&registry)?;
            reg.add(&id, &pk)?;
            let mut creds = load_credentials(&credentials)?;
            let generated = set_secret(&mut creds, &id, password)?;
            reg.save(&registry)?;
            creds.save(&credentials)?;
            if let Some(dir) = &bulk.mosquitto {
                bail!(
                    "--mosquitto is for bulk adds; run `coevo fleet export-mosquitto {}`",
                    dir.display()
                );
            }
            eprintln!(
                "added {id} to {} and {}",
                registry.display(),
                credentials.display()
            );
            if let Some(pw) = generated {
                println!("{pw}");
            }
        }
        FleetCmd::Remove {
            id,
            registry,
            credentials,
        } => {
            let mut reg = load_registry(&registry)?;
            let mut creds = load_credentials(&credentials)?;
            let removed = reg.remove(&id) | creds.remove(&id);
            if !removed {
                bail!("{id} is not registered");
            }
            reg.save(&registry)?;
            creds.save(&credentials)?;
            eprintln!(
                "removed {id} from {} and {}. A running embedded broker using {} closes its \
                 connection and refuses it within ~1 s; the coordinator refuses its deltas from the next \
                 round on (it reads the registry per round). On Mosquitto: re-run `coevo fleet export-mosquitto` and \
                 `kill -HUP` the broker.",
                registry.display(),
                credentials.display(),
                credentials.display()
            );
        }
        FleetCmd::List { registry } => {
            let reg = load_registry(&registry)?;
            for (id, e) in &reg.clients {
                println!("{id}\t{}", e.public_key);
            }
            eprintln!("{} clients", reg.len());
        }
        FleetCmd::ExportMosquitto {
            dir,
            fleet,
            listen,
            user,
        } => {
            let (reg, creds) = fleet.load()?;
            crate::mosquitto::export(
                &crate::mosquitto::Export {
                    fleet: &fleet.fleet,
                    coordinator_id: &fleet.coordinator,
                    registry: &reg,
                    credentials: &creds,
                    listen_host: &listen.ip().to_string(),
                    listen_port: listen.port(),
                    user: user.as_deref(),
                },
                &dir,
            )?;
            eprintln!(
                "wrote {0}/passwd, {0}/acl and {0}/mosquitto.conf; run: mosquitto -c {0}/mosquitto.conf",
                dir.display()
            );
        }
        FleetCmd::ExportNats {
            dir,
            fleet,
            hosts,
            nodes,
            host,
            mqtt_port,
            client_port,
            cluster_port,
            monitor_port,
            cluster_name,
        } => {
            let (reg, creds) = fleet.load()?;
            let hosts = if hosts.is_empty() { vec![host] } else { hosts };
            let nodes = crate::nats::plan_nodes(
                &hosts,
                nodes,
                mqtt_port,
                client_port,
                cluster_port,
                monitor_port,
            )?;
            let mqtt: Vec<String> = nodes
                .iter()
                .map(|n| format!("{}:{}", n.host, n.mqtt_port))
                .collect();
            let paths = crate::nats::export(
                &crate::nats::Export {
                    fleet: &fleet.fleet,
                    coordinator_id: &fleet.coordinator,
                    registry: &reg,
                    credentials: &creds,
                    nodes,
                    cluster_name: &cluster_name,
                },
                &dir,
            )?;
            eprintln!("wrote {}/users.conf and:", dir.display());
            for p in &paths {
                eprintln!("  {0}   run: nats-server -c {0}", p.display());
            }
            eprintln!(
                "MQTT on {}: list them all as the brokers' `host:port` in [broker] cluster",
                mqtt.join(", ")
            );
        }
        FleetCmd::Import {
            devices,
            registry,
            credentials,
            bulk,
        } => {
            let t = std::time::Instant::now();
            let text = std::fs::read_to_string(&devices)
                .with_context(|| format!("reading {}", devices.display()))?;
            let list = crate::fleet_import::parse_devices(&text)
                .with_context(|| devices.display().to_string())?;
            let o = bulk.options(registry, credentials);
            let s = crate::fleet_import::import(&list, &o)?;
            report_import(&s, &o, t);
        }
        FleetCmd::Password {
            id,
            credentials,
            password,
        } => {
            let mut creds = load_credentials(&credentials)?;
            let generated = set_secret(&mut creds, &id, password)?;
            creds.save(&credentials)?;
            eprintln!(
                "set the password of {id} in {}. A running embedded broker using it closes {id}'s \
                 open connection within ~1 s; it must reconnect with the new password. On \
                 Mosquitto: re-run `coevo fleet export-mosquitto` and `kill -HUP` the broker.",
                credentials.display()
            );
            if let Some(pw) = generated {
                println!("{pw}");
            }
        }
    }
    Ok(())
}
