//! The `/metrics` endpoint (hyper's HTTP/1 server on a thread of its own) and a minimal
//! HTTP/1.0 client to scrape one.

use crate::TelemetryError;
use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// What the text format is served as (Prometheus' text exposition format 0.0.4).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Produces the text format; called on every scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A running `/metrics` endpoint. Dropping it stops the server (open scrapes finish first).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl MetricsServer {
    /// Binds `listen` (port 0 picks a free port; [`Self::addr`] says which) and serves `GET
    /// /metrics` (the text format from `render`) and `GET /health` (`OK`); anything else is
    /// 404. Binding happens before this returns, so a taken port is an error here.
    pub fn start(listen: SocketAddr, name: &str, render: Render) -> Result<Self, TelemetryError> {
        let listener = TcpListener::bind(listen).map_err(|source| TelemetryError::Bind {
            addr: listen,
            source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| TelemetryError::Bind {
                addr: listen,
                source,
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| TelemetryError::Start(e.to_string()))?;
        // A runtime of its own: the broker starts without one, and a scrape must not wait on
        // a coordinator busy in blocking work.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TelemetryError::Start(format!("runtime: {e}")))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = {
            let _guard = runtime.enter();
            hyper::Server::from_tcp(listener)
                .map_err(|e| TelemetryError::Start(e.to_string()))?
                .http1_only(true)
                .serve(make_service_fn(move |_| {
                    let render = render.clone();
                    async move {
                        Ok::<_, Infallible>(service_fn(move |req| {
                            let render = render.clone();
                            async move { Ok::<_, Infallible>(answer(&req, &render)) }
                        }))
                    }
                }))
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
        };
        std::thread::Builder::new()
            .name(format!("{name}-metrics"))
            .spawn(move || {
                if let Err(e) = runtime.block_on(server) {
                    tracing::error!(error = %e, "the /metrics endpoint failed");
                }
            })
            .map_err(|e| TelemetryError::Start(format!("thread: {e}")))?;
        tracing::info!(%addr, "serving Prometheus metrics on http://{addr}/metrics");
        Ok(MetricsServer {
            addr,
            stop: Some(stop),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn answer(req: &Request<Body>, render: &Render) -> Response<Body> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Body::from(body));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = reply(StatusCode::OK, render());
            if let Ok(v) = hyper::header::HeaderValue::from_str(CONTENT_TYPE) {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        "/health" => reply(StatusCode::OK, "OK\n".into()),
        _ => reply(
            StatusCode::NOT_FOUND,
            "not found: Prometheus metrics are at /metrics\n".into(),
        ),
    }
}

/// GETs `url` (`http://host:port/path`, or `host:port`, whose path defaults to `/metrics`)
/// with plain HTTP/1.0 and returns the body of a 200 answer. No TLS: the endpoints are meant
/// for a local or private scrape network.
pub fn scrape(url: &str, timeout: Duration) -> Result<String, TelemetryError> {
    let fail = |reason: String| TelemetryError::Scrape {
        url: url.to_string(),
        reason,
    };
    if url.starts_with("https://") {
        return Err(fail(
            "https is not supported: scrape the endpoint over http".into(),
        ));
    }
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let addr = host
        .to_socket_addrs()
        .map_err(|e| fail(format!("bad address {host:?}: {e}")))?
        .next()
        .ok_or_else(|| fail(format!("{host:?} resolves to no address")))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| fail(format!("connect: {e}")))?;
    let io = |e: std::io::Error| fail(e.to_string());
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8(raw).map_err(|_| fail("answer is not UTF-8".into()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("no HTTP header in the answer".into()))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(fail(format!("answered {status:?}")));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_fresh_text_on_every_scrape_and_stops_when_dropped() {
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let render: Render = {
            let n = n.clone();
            Arc::new(move || {
                let v = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                format!("coevo_scrapes_total {v}\n")
            })
        };
        let server = MetricsServer::start("127.0.0.1:0".parse().unwrap(), "test", render).unwrap();
        let addr = server.addr();
        assert_ne!(addr.port(), 0);
        let t = Duration::from_secs(5);
        let first = crate::parse(&scrape(&format!("http://{addr}/metrics"), t).unwrap()).unwrap();
        let second = crate::parse(&scrape(&addr.to_string(), t).unwrap()).unwrap();
        assert_eq!(first.value("coevo_scrapes_total", &[]), Some(0.0));
        assert_eq!(second.value("coevo_scrapes_total", &[]), Some(1.0));
        assert_eq!(scrape(&format!("http://{addr}/health"), t).unwrap(), "OK\n");
        let e = scrape(&format!("http://{addr}/other"), t).unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
        // A taken port is a typed error at start.
        let e = MetricsServer::start(addr, "test", Arc::new(String::new)).unwrap_err();
        assert!(matches!(e, TelemetryError::Bind { .. }), "{e}");
        drop(server);
        let t0 = std::time::Instant::now();
        while scrape(&addr.to_string(), Duration::from_millis(200)).is_ok() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "still serving after drop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
