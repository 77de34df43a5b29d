//! A blocking HTTP(S) client of forkd-daemon's REST API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use crate::error::{error_message, CliError};

/// Largest answer body read (a list of 1000 sandboxes is far smaller).
const MAX_BODY: u64 = 64 << 20;
/// Longest wait for a TCP (and TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach the daemon.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Base URL, e.g. `http://127.0.0.1:8889`.
    pub url: String,
    /// Bearer token.
    pub token: Option<String>,
    /// PEM file with the certificate(s) to trust for https URLs.
    pub ca_cert: Option<PathBuf>,
    /// Longest wait for one answer.
    pub timeout: Duration,
}

/// A client of one daemon.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    timeout: Duration,
}

/// A 2xx answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Its status.
    pub status: u16,
    /// The route it answered.
    pub path: String,
    /// Its body, as sent.
    pub raw: String,
}

impl Answer {
    /// The body as `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, CliError> {
        serde_json::from_str(&self.raw).map_err(|e| CliError::BadAnswer {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    /// The body, indented, in the daemon's own key order (what `--json`
    /// prints); `null` for an empty body.
    pub fn pretty(&self) -> String {
        if self.raw.trim().is_empty() {
            "null".to_string()
        } else {
            crate::format::pretty_json(&self.raw)
        }
    }
}

enum Method {
    Get,
    Post,
    Delete,
}

impl Client {
    /// A client for `opts`; reads the CA certificate file now.
    pub fn new(opts: &ClientOptions) -> Result<Self, CliError> {
        let base = normalize_base(&opts.url)?;
        let mut tls = TlsConfig::builder();
        if let Some(path) = &opts.ca_cert {
            tls = tls.root_certs(read_ca(path)?);
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .max_idle_connections_per_host(64)
            .max_idle_connections(64)
            .user_agent(concat!("forkd/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            .build()
            .into();
        Ok(Client {
            base,
            token: opts.token.clone(),
            agent,
            timeout: opts.timeout,
        })
    }

    /// The base URL (normalized).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The same daemon with another request timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            timeout,
            ..self.clone()
        }
    }

    /// The full URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Answer, CliError> {
        self.send(Method::Get, path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post<B: Serialize>(&self, path: &str, body: &B) -> Result<Answer, CliError> {
        let body = serde_json::to_vec(body).map_err(|e| CliError::Other(e.to_string()))?;
        self.send(Method::Post, path, Some(body))
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Answer, CliError> {
        self.send(Method::Delete, path, None)
    }

    /// The bearer token, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `PUT path` with `body` streamed from a reader (no timeout: the
    /// transfer takes as long as it takes).
    pub fn put_reader(&self, path: &str, body: &mut dyn std::io::Read) -> Result<Answer, CliError> {
        let mut req = self.agent.put(&self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req
            .header("Content-Type", "application/octet-stream")
            .send(ureq::SendBody::from_reader(body))
            .map_err(|e| self.classify(e))?;
        self.answer(path, resp)
    }

    /// `GET path`, its body streamed into `out` (no timeout); answers the
    /// bytes written. An error answer is read as JSON, as any other.
    pub fn get_to(&self, path: &str, out: &mut dyn std::io::Write) -> Result<u64, CliError> {
        let mut req = self.agent.get(&self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.call().map_err(|e| self.classify(e))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            self.answer(path, resp)?;
            unreachable!("a non-2xx answer is an error");
        }
        let want = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut body = resp.into_body().into_reader();
        let n = std::io::copy(&mut body, out).map_err(|e| {
            CliError::Other(format!("the download from {} broke off: {e}", self.base))
        })?;
        if want.is_some_and(|w| w != n) {
            return Err(CliError::Other(format!(
                "the download from {} ended after {n} of {} bytes",
                self.base,
                want.unwrap_or(0)
            )));
        }
        Ok(n)
    }

    /// `POST path`, its newline-delimited JSON answer handed to `each`
    /// line by line as it comes (false stops reading); no timeout.
    pub fn post_lines<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        mut each: impl FnMut(&str) -> Result<bool, CliError>,
    ) -> Result<(), CliError> {
        use std::io::BufRead;
        let body = serde_json::to_vec(body).map_err(|e| CliError::Other(e.to_string()))?;
        let mut req = self.agent.post(&self.url(path));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req
            .header("Content-Type", "application/json")
            .send(&body[..])
            .map_err(|e| self.classify(e))?;
        if !(200..300).contains(&resp.status().as_u16()) {
            self.answer(path, resp)?;
            unreachable!("a non-2xx answer is an error");
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        for line in reader.lines() {
            let line = line.map_err(|e| {
                CliError::Other(format!("the stream from {} broke off: {e}", self.base))
            })?;
            if !each(&line)? {
                break;
            }
        }
        Ok(())
    }

    /// A response as an [`Answer`], or the error it says.
    fn answer(
        &self,
        path: &str,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<Answer, CliError> {
        let status = resp.status().as_u16();
        let raw = resp
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .map_err(|e| self.classify(e))?;
        if !(200..300).contains(&status) {
            return Err(CliError::Api {
                status,
                message: error_message(status, &raw),
            });
        }
        Ok(Answer {
            status,
            path: path.to_string(),
            raw,
        })
    }

    fn send(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Answer, CliError> {
        let url = self.url(path);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match method {
            Method::Get | Method::Delete => {
                let mut req = match method {
                    Method::Get => self.agent.get(&url),
                    _ => self.agent.delete(&url),
                };
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req.config()
                    .timeout_global(Some(self.timeout))
                    .build()
                    .call()
            }
            Method::Post => {
                let mut req = self.agent.post(&url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                let req = req.config().timeout_global(Some(self.timeout)).build();
                match body {
                    Some(b) => req.header("Content-Type", "application/json").send(&b[..]),
                    None => req.send_empty(),
                }
            }
        };
        let resp = result.map_err(|e| self.classify(e))?;
        self.answer(path, resp)
    }

    /// A ureq error in the user's terms.
    fn classify(&self, e: ureq::Error) -> CliError {
        use std::io::ErrorKind;
        use ureq::Timeout;
        let unreachable = |detail: String| CliError::Unreachable {
            url: self.base.clone(),
            detail,
        };
        match e {
            ureq::Error::Io(io) if tls_error(&io).is_some() => CliError::Tls {
                url: self.base.clone(),
                detail: tls_error(&io).expect("checked").to_string(),
            },
            ureq::Error::Io(io) => match io.kind() {
                ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::NotConnected
                | ErrorKind::AddrNotAvailable
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable => unreachable(io.to_string()),
                ErrorKind::TimedOut => CliError::Timeout {
                    url: self.base.clone(),
                    secs: self.timeout.as_secs(),
                },
                _ => CliError::Other(format!("talking to {}: {io}", self.base)),
            },
            ureq::Error::HostNotFound => unreachable("host not found".into()),
            ureq::Error::ConnectionFailed => unreachable("connection failed".into()),
            ureq::Error::Timeout(Timeout::Connect | Timeout::Resolve) => {
                unreachable("no connection within 5 s".into())
            }
            ureq::Error::Timeout(_) => CliError::Timeout {
                url: self.base.clone(),
                secs: self.timeout.as_secs(),
            },
            ureq::Error::Tls(m) => CliError::Tls {
                url: self.base.clone(),
                detail: m.to_string(),
            },
            ureq::Error::Rustls(r) => CliError::Tls {
                url: self.base.clone(),
                detail: r.to_string(),
            },
            ureq::Error::Protocol(p) => CliError::Other(format!(
                "{} answered something that is not HTTP ({p}); if the daemon serves TLS, use an https:// URL",
                self.base
            )),
            ureq::Error::BadUri(u) => CliError::Usage(format!(
                "bad daemon URL {u:?}: give one like http://127.0.0.1:8889"
            )),
            other => CliError::Other(format!("talking to {}: {other}", self.base)),
        }
    }
}

/// The TLS error inside an I/O error, if that is what it is.
fn tls_error(io: &std::io::Error) -> Option<&rustls::Error> {
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// The certificates in a PEM file, as the only roots to trust.
fn read_ca(path: &Path) -> Result<RootCerts, CliError> {
    let pem = std::fs::read(path).map_err(|e| {
        CliError::Usage(format!(
            "cannot read the CA certificate {}: {e}",
            path.display()
        ))
    })?;
    let mut certs: Vec<Certificate<'static>> = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(CliError::Usage(format!(
                    "{} is not a PEM certificate file: {e}",
                    path.display()
                )))
            }
        }
    }
    if certs.is_empty() {
        return Err(CliError::Usage(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(RootCerts::new_with_certs(&certs))
}

/// The daemon URL without a trailing slash; `host:port` alone means http.
pub fn normalize_base(url: &str) -> Result<String, CliError> {
    let url = url.trim();
    let url = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let (scheme, rest) = url.split_once("://").expect("has a scheme");
    if scheme != "http" && scheme != "https" {
        return Err(CliError::Usage(format!(
            "daemon URL {url:?}: only http:// and https:// are supported"
        )));
    }
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.starts_with('/') {
        return Err(CliError::Usage(format!(
            "daemon URL {url:?} names no host: give one like http://127.0.0.1:8889"
        )));
    }
    Ok(format!("{scheme}://{rest}"))
}

/// The token: the file's first line when a file is given, else the value.
pub fn resolve_token(
    token: Option<&str>,
    token_file: Option<&Path>,
) -> Result<Option<String>, CliError> {
    if let Some(path) = token_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::Usage(format!(
                "cannot read the token file {}: {e}",
                path.display()
            ))
        })?;
        let t = text.lines().next().unwrap_or("").trim().to_string();
        if t.is_empty() {
            return Err(CliError::Usage(format!(
                "the token file {} is empty",
                path.display()
            )));
        }
        return Ok(Some(t));
    }
    Ok(token
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string))
}

/// Routes of the v1 API, built with encoded segments.
pub use proto::routes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalized() {
        assert_eq!(
            normalize_base("http://127.0.0.1:8889/").unwrap(),
            "http://127.0.0.1:8889"
        );
        assert_eq!(
            normalize_base("127.0.0.1:8889").unwrap(),
            "http://127.0.0.1:8889"
        );
        assert_eq!(
            normalize_base(" https://forkd.example:443/api// ").unwrap(),
            "https://forkd.example:443/api"
        );
        assert!(normalize_base("ftp://h").is_err());
        assert!(normalize_base("http://").is_err());
        assert!(normalize_base("http:///x").is_err());
    }

    #[test]
    fn client_urls_join_base_and_route() {
        let c = Client::new(&ClientOptions {
            url: "http://127.0.0.1:1/".into(),
            token: None,
            ca_cert: None,
            timeout: Duration::from_secs(1),
        })
        .unwrap();
        assert_eq!(c.url(routes::HEALTHZ), "http://127.0.0.1:1/healthz");
        assert_eq!(
            c.url(&routes::sandbox_op("x", routes::SandboxOp::Ping)),
            "http://127.0.0.1:1/v1/sandboxes/x/ping"
        );
    }

    #[test]
    fn tokens_come_from_the_file_first() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(
            resolve_token(Some("other"), Some(&f)).unwrap(),
            Some("s3cret".into())
        );
        assert_eq!(resolve_token(Some(" t "), None).unwrap(), Some("t".into()));
        assert_eq!(resolve_token(Some(""), None).unwrap(), None);
        assert_eq!(resolve_token(None, None).unwrap(), None);
        std::fs::write(&f, "\n").unwrap();
        assert!(resolve_token(None, Some(&f)).is_err());
        assert!(resolve_token(None, Some(&dir.path().join("missing"))).is_err());
    }

    #[test]
    fn ca_files_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        let e = read_ca(&f).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        assert!(read_ca(&dir.path().join("missing.pem")).is_err());
    }

    #[test]
    fn a_closed_port_is_unreachable() {
        // Bind then drop: nothing listens on that port afterwards.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let c = Client::new(&ClientOptions {
            url: format!("http://127.0.0.1:{port}"),
            token: None,
            ca_cert: None,
            timeout: Duration::from_secs(2),
        })
        .unwrap();
        match c.get(routes::HEALTHZ) {
            Err(CliError::Unreachable { url, .. }) => {
                assert_eq!(url, format!("http://127.0.0.1:{port}"))
            }
            other => panic!("expected unreachable, got {other:?}"),
        }
    }
}
