//! The front end in child processes ([`BrokerConfig::front_processes`]).
//!
//! Why: with the front end in the broker process every client costs three descriptors there
//! (its socket, the front end's socket to rumqttd, rumqttd's end of it). Where the hard
//! `RLIMIT_NOFILE` is 20,000 and cannot be raised (an unprivileged container), that stops the
//! broker at ~6,600 cameras. Split, a client costs two descriptors in one front process and one
//! in the rumqttd process, and each process stays under its own limit.
//!
//! How: the broker process binds `listen` with SO_REUSEPORT, starts rumqttd, then runs
//! `PROGRAM broker --front-process` K times. Each child reads its [`FrontSpec`] (the config,
//! rumqttd's loopback listeners and the per-process secret rumqttd admits) from stdin, binds
//! `listen` with SO_REUSEPORT, serves it exactly like the in-process front end (auth, ACLs,
//! TLS, admission control, credential reloads) and prints `ready` on stdout. The parent then
//! closes its own socket, so the kernel spreads new connections over the children only.
//! Each child then writes its counters to stdout once a second when they changed (`stats
//! {json}`); the broker process adds them into its own, so `BrokerHandle::stats` and
//! `/metrics` cover every process. A child exits when its stdin closes: when the broker process ends, however it ends, its
//! front processes go with it.

use crate::{front, BrokerConfig, BrokerError, BrokerStats};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What a front process needs from the broker process. Sent on the child's stdin as one line
/// of JSON (it carries the secret, so never on the command line or in a file).
#[derive(Serialize, Deserialize)]
pub(crate) struct FrontSpec {
    pub config: BrokerConfig,
    pub backends: Vec<SocketAddr>,
    pub secret: String,
}

/// Largest spec a front process reads (the config is a few KiB).
const MAX_SPEC_BYTES: u64 = 1 << 20;
/// Longest line read from a front process's stdout.
const MAX_LINE_BYTES: u64 = 64 * 1024;
/// A front process's counters, once a second: `stats {BrokerStats as JSON}`.
const STATS_PREFIX: &str = "stats ";
/// How often a front process reports its counters.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// How long a front process may take to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running front process; its stdin is held open for its whole life (closing it stops it).
pub(crate) struct FrontChild {
    child: Child,
    _stdin: ChildStdin,
}

/// Starts `config.front_processes` front processes on `addr` and returns once all listen.
pub(crate) fn spawn_fronts(
    config: &BrokerConfig,
    addr: SocketAddr,
    front: &Arc<front::Front>,
) -> Result<Vec<FrontChild>, BrokerError> {
    let (backends, secret) = (&front.backends, &front.secret);
    let program = match &config.front_program {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| BrokerError::Start(format!("cannot locate this executable: {e}")))?,
    };
    let spec = FrontSpec {
        config: BrokerConfig {
            // The resolved port (the config may say 0).
            listen: addr,
            front_processes: 0,
            ..config.clone()
        },
        backends: backends.to_vec(),
        secret: secret.to_owned(),
    };
    let mut line = serde_json::to_vec(&spec)
        .map_err(|e| BrokerError::Start(format!("cannot encode the front spec: {e}")))?;
    line.push(b'\n');
    let mut started: Vec<(Child, ChildStdin)> = Vec::new();
    for i in 0..config.front_processes {
        let mut child = Command::new(&program)
            .args(["broker", "--front-process"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                BrokerError::Start(format!(
                    "cannot run front process {i} ({} broker --front-process): {e}",
                    program.display()
                ))
            })?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| BrokerError::Start("front process without stdin".into()))?;
        stdin.write_all(&line)?;
        stdin.flush()?;
        started.push((child, stdin));
    }
    let mut out = Vec::new();
    for (i, (mut child, stdin)) in started.into_iter().enumerate() {
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BrokerError::Start("front process without stdout".into()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let counters = Arc::clone(front);
        // `ready` on a line of its own, then `stats {json}` lines; anything else is passed on.
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let said = loop {
                match read_bounded_line(&mut stdout) {
                    Some(l) if l.trim() == "ready" => break l,
                    Some(l) => eprintln!("{l}"),
                    None => break String::new(),
                }
            };
            let ready = !said.is_empty();
            let _ = tx.send(said);
            if ready {
                follow_stats(i, &mut stdout, &counters.counters);
            }
        });
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(l) if l.trim() == "ready" => {}
            Ok(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                return Err(BrokerError::Start(format!(
                    "front process {i} ended before it was ready (exit {status:?}; see its log above)"
                )));
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BrokerError::Start(format!(
                    "front process {i} not listening within {READY_TIMEOUT:?}"
                )));
            }
        }
        out.push(FrontChild {
            child,
            _stdin: stdin,
        });
    }
    tracing::info!(
        processes = out.len(),
        %addr,
        "front end running in child processes"
    );
    Ok(out)
}

/// One line of at most [`MAX_LINE_BYTES`] (longer lines are cut there); `None` at the end.
fn read_bounded_line(r: &mut impl BufRead) -> Option<String> {
    let mut buf = Vec::new();
    match r.take(MAX_LINE_BYTES).read_until(b'\n', &mut buf) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(String::from_utf8_lossy(&buf).trim_end().to_owned()),
    }
}

/// Adds each report of front process `i` into the broker's counters, as a change from its
/// previous one; when the process ends, its connections are no longer open.
fn follow_stats(i: usize, r: &mut impl BufRead, counters: &front::Counters) {
    let mut last = BrokerStats::default();
    while let Some(line) = read_bounded_line(r) {
        let Some(json) = line.strip_prefix(STATS_PREFIX) else {
            eprintln!("{line}");
            continue;
        };
        match serde_json::from_str::<BrokerStats>(json) {
            Ok(now) => {
                counters.apply_change(&last, &now);
                last = now;
            }
            Err(e) => {
                tracing::warn!(process = i, error = %e, "unreadable stats from a front process")
            }
        }
    }
    let gone = BrokerStats {
        connections_open: 0,
        ..last
    };
    counters.apply_change(&last, &gone);
}

/// A thread that owns the front processes and ends (so [`crate::BrokerHandle::is_running`]
/// turns false) as soon as one of them exits.
pub(crate) fn supervise(mut children: Vec<FrontChild>) -> Result<JoinHandle<()>, BrokerError> {
    std::thread::Builder::new()
        .name("coevo-broker-fronts".to_owned())
        .spawn(move || loop {
            for (i, c) in children.iter_mut().enumerate() {
                if let Ok(Some(status)) = c.child.try_wait() {
                    tracing::error!(process = i, %status, "a broker front process exited; clients it served reconnect to the others, new ones may be refused");
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        })
        .map_err(|e| BrokerError::Start(format!("cannot spawn the front supervisor: {e}")))
}

/// Entry point of a front process (`coevo broker --front-process`): reads its [`FrontSpec`]
/// from stdin, serves `listen` until stdin closes (the broker process ended), then returns.
pub fn run_front_process() -> Result<(), BrokerError> {
    let stdin = std::io::stdin();
    let mut line = String::new();
    stdin
        .lock()
        .take(MAX_SPEC_BYTES)
        .read_line(&mut line)
        .map_err(|e| BrokerError::Config(format!("front process: reading its spec: {e}")))?;
    let spec: FrontSpec = serde_json::from_str(&line).map_err(|e| {
        BrokerError::Config(format!(
            "front process: bad spec on stdin ({e}); this mode is started by `coevo broker` with front_processes > 0, not by hand"
        ))
    })?;
    let config = spec.config;
    config.validate()?;
    let capacity = crate::fd_capacity(&config, 2);
    let acceptor = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
    let verifier = crate::load_verifier(&config)?;
    let public = crate::bind_listener(config.listen, true).map_err(|e| {
        BrokerError::Start(format!(
            "front process: cannot listen on {}: {e}",
            config.listen
        ))
    })?;
    let state = Arc::new(crate::new_front(
        &config,
        verifier.clone(),
        spec.secret,
        spec.backends,
    ));
    let thread = front::spawn(public, acceptor, Arc::clone(&state), capacity)?;
    crate::spawn_watcher(&config, verifier, &state)?;
    tracing::info!(
        listen = %config.listen,
        pid = std::process::id(),
        capacity,
        "broker front process serving"
    );
    let mut out = std::io::stdout();
    writeln!(out, "ready")?;
    out.flush()?;
    // Serve until the broker process closes our stdin (it exited or is shutting down), or
    // until serving fails.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut rest);
        let _ = tx.send(());
    });
    let mut reported = BrokerStats::default();
    loop {
        if thread.is_finished() {
            return Err(BrokerError::Start("front process: serving failed".into()));
        }
        if rx.recv_timeout(STATS_INTERVAL).is_ok() {
            return Ok(());
        }
        let now = state.counters.snapshot();
        if now != reported {
            let json = serde_json::to_string(&now)
                .map_err(|e| BrokerError::Start(format!("cannot encode stats: {e}")))?;
            writeln!(out, "{STATS_PREFIX}{json}")?;
            out.flush()?;
            reported = now;
        }
    }
}
