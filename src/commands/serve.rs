//! `serve`: the metrics and the status documents over HTTP, for Prometheus, Uptime Kuma, Gatus,
//! Homepage and container health checks.
//!
//! It runs unprivileged and only reads: every request asks the namespaces' companions (see
//! [`crate::system::companion`]) for their documents, so no request enters a namespace, runs
//! nft or needs root. Bounded everywhere: a request is at most [`REQUEST_LIMIT`] bytes and must
//! arrive within [`REQUEST_DEADLINE`], answers are written within [`WRITE_DEADLINE`], and at
//! most [`MAX_CONNECTIONS`] are served at once (more are told 503 and closed).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::commands::metrics::{self, Fallback};

/// The default port: next to the WireGuard exporters' 9586 (see the README for the choice).
pub const DEFAULT_PORT: u16 = 9595;
pub const REQUEST_LIMIT: usize = 8 << 10;
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
pub const MAX_CONNECTIONS: usize = 16;

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn json(status: u16, value: &Value) -> Response {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    fn text(status: u16, text: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{text}\n").into_bytes(),
        }
    }

    /// Writes the answer, all of it within `limit` (a client that reads slowly is given up).
    fn write(
        &self,
        stream: &mut TcpStream,
        head_only: bool,
        limit: Duration,
    ) -> std::io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        let body: &[u8] = if head_only { &[] } else { &self.body };
        let until = Instant::now() + limit;
        for mut part in [head.as_bytes(), body] {
            while !part.is_empty() {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                stream.set_write_timeout(Some(left))?;
                match stream.write(part) {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(n) => part = &part[n..],
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// The document of one namespace, or `None` when the host has no such namespace.
fn one(namespace: &str) -> Option<Value> {
    crate::config::check_name(namespace).ok()?;
    metrics::collect_named(&[namespace.to_string()], Fallback::Report)
        .into_iter()
        .next()
}

/// What `path` answers.
fn route(path: &str) -> Response {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let not_found = || Response::text(404, "not found");
    match parts.as_slice() {
        ["metrics"] => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics::render(
                &metrics::collect(Fallback::Report),
                crate::system::state::now_secs(),
            )
            .into_bytes(),
        },
        ["v1", "namespaces"] => Response::json(
            200,
            &json!({ "namespaces": metrics::collect(Fallback::Report) }),
        ),
        ["v1", "namespaces", name] => match one(name) {
            Some(document) => Response::json(200, &document),
            None => not_found(),
        },
        ["v1", "namespaces", name, "health"] => match one(name) {
            Some(document) => {
                let healthy = document.get("verdict").and_then(Value::as_str) == Some("healthy");
                let body = json!({
                    "namespace": name,
                    "verdict": document.get("verdict"),
                    "reasons": document.get("reasons"),
                });
                Response::json(if healthy { 200 } else { 503 }, &body)
            }
            None => not_found(),
        },
        ["v1", "namespaces", name, "forwarded-port"] => match one(name) {
            Some(document) => {
                let ports = document
                    .get("forwardedPorts")
                    .cloned()
                    .unwrap_or_else(|| json!([]));
                // `port` as gluetun's /v1/openvpn/portforwarded has it (0: none), which
                // Homepage's widget reads.
                let port = ports
                    .get(0)
                    .and_then(|p| p.get("port"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                Response::json(
                    200,
                    &json!({ "namespace": name, "port": port, "ports": ports }),
                )
            }
            None => not_found(),
        },
        _ => not_found(),
    }
}

/// Reads one request within the deadline and answers it.
fn handle(mut stream: TcpStream) {
    let until = Instant::now() + REQUEST_DEADLINE;
    let mut buffer = vec![0u8; REQUEST_LIMIT];
    let mut filled = 0;
    let response = loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Some(Response::text(408, "request not received in time"));
        }
        let _ = stream.set_read_timeout(Some(left));
        let n = match stream.read(&mut buffer[filled..]) {
            Ok(0) => break None,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break Some(Response::text(408, "request not received in time"));
            }
            Err(_) => break None,
        };
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buffer[..filled]) {
            Ok(httparse::Status::Complete(_)) => {
                let method = request.method.unwrap_or_default();
                let path = request.path.unwrap_or_default();
                let head_only = method == "HEAD";
                let response = if method == "GET" || head_only {
                    route(path)
                } else {
                    Response::text(405, "only GET and HEAD")
                };
                let _ = response.write(&mut stream, head_only, WRITE_DEADLINE);
                return;
            }
            Ok(httparse::Status::Partial) if filled == buffer.len() => {
                break Some(Response::text(431, "request too large"));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                break Some(Response::text(431, "too many headers"));
            }
            Err(e) => break Some(Response::text(400, &format!("bad request: {e}"))),
        }
    };
    if let Some(response) = response {
        let _ = response.write(&mut stream, false, WRITE_DEADLINE);
    }
}

/// The listening socket: the one systemd passed (socket activation), or a new one on `listen`.
fn listener(listen: SocketAddr) -> Result<(TcpListener, bool)> {
    let mut passed = crate::system::listen::take()?;
    match passed.len() {
        0 => {
            let listener =
                TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
            Ok((listener, false))
        }
        1 => Ok((TcpListener::from(passed.remove(0)), true)),
        n => bail!("{n} sockets were passed; serve takes one"),
    }
}

/// Serves until stopped; when socket-activated, exits after `idle` without a connection.
pub fn run(listen: SocketAddr, idle: Duration) -> Result<i32> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let (listener, activated) = listener(listen)?;
    if nix::unistd::geteuid().is_root() {
        eprintln!(
            "serve: running as root, which it does not need: it reads the companions' sockets, \
             which members of refresh's --metrics-group may read"
        );
    }
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        if activated {
            let timeout = PollTimeout::try_from(idle).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            let ready = match poll(&mut fds, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("waiting for a connection"),
            };
            if ready == 0 && active.load(Ordering::SeqCst) == 0 {
                // systemd keeps the socket and starts us again on the next connection.
                return Ok(crate::exit::code::OK);
            }
            if ready == 0 {
                continue;
            }
        }
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("serve: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = Response::text(503, "busy").write(&mut stream, false, Duration::from_secs(1));
            continue;
        }
        let counted = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name("request".into())
            .spawn(move || {
                handle(stream);
                counted.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            eprintln!("serve: {e}");
        }
    }
}
