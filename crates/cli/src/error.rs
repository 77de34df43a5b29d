//! What can go wrong in a `forkd` command, worded for the person who ran it.

use std::fmt;

/// Text after an error when the daemon cannot be reached.
const START_HINT: &str = "start one with `forkd-daemon serve` (or run `forkd quickstart`, \
which starts its own), or point FORKD_URL / --daemon-url at the one you run";

/// Text after a 401.
const TOKEN_HINT: &str =
    "pass the daemon's token with --daemon-token, --daemon-token-file or FORKD_TOKEN";

/// An error a command ends with; `main` prints it as `forkd: <error>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliError {
    /// Nothing answered at the daemon's address.
    Unreachable {
        /// The daemon URL tried.
        url: String,
        /// What the connection attempt said.
        detail: String,
    },
    /// The daemon answered with an error status.
    Api {
        /// The HTTP status.
        status: u16,
        /// The daemon's `error` text (or the body, when it is not one).
        message: String,
    },
    /// The daemon did not answer in time.
    Timeout {
        /// The request's URL.
        url: String,
        /// The timeout that ran out.
        secs: u64,
    },
    /// The TLS handshake or the CA certificate failed.
    Tls {
        /// The daemon URL.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The daemon answered something that is not the expected JSON.
    BadAnswer {
        /// The route.
        path: String,
        /// What did not parse.
        detail: String,
    },
    /// The command line asks for something that cannot be done.
    Usage(String),
    /// Anything else, already worded.
    Other(String),
}

impl CliError {
    /// The HTTP status, for daemon errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            CliError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether this is a 404 from the daemon.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Unreachable { url, detail } => {
                write!(
                    f,
                    "cannot reach forkd-daemon at {url} ({detail}): {START_HINT}"
                )
            }
            CliError::Api { status, message } => {
                write!(f, "{message} (HTTP {status})")?;
                if *status == 401 && !message.contains("FORKD_TOKEN") {
                    write!(f, "; {TOKEN_HINT}")?;
                }
                Ok(())
            }
            CliError::Timeout { url, secs } => write!(
                f,
                "no answer from forkd-daemon at {url} within {secs} s (raise --timeout, or check \
                 the daemon's log)"
            ),
            CliError::Tls { url, detail } => write!(
                f,
                "TLS with {url} failed ({detail}); for a daemon with a self-signed certificate \
                 pass --ca-cert PATH (or FORKD_CA_CERT)"
            ),
            CliError::BadAnswer { path, detail } => {
                write!(f, "unexpected answer from {path}: {detail}")
            }
            CliError::Usage(m) | CliError::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CliError {}

/// The message of an error answer: the `error` field of `{"error": "..."}`,
/// else the body itself (shortened), else the status' reason.
pub fn error_message(status: u16, body: &str) -> String {
    if let Ok(e) = serde_json::from_str::<proto::api::ErrorBody>(body) {
        return e.error;
    }
    let body = body.trim();
    if body.is_empty() {
        return reason(status).to_string();
    }
    const MAX: usize = 300;
    if body.len() <= MAX {
        return body.to_string();
    }
    let mut end = MAX;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &body[..end])
}

/// The reason phrase of the statuses the daemon answers.
fn reason(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not found",
        405 => "method not allowed",
        409 => "conflict",
        413 => "payload too large",
        422 => "unprocessable entity",
        429 => "too many requests",
        500 => "internal server error",
        502 => "bad gateway",
        503 => "service unavailable",
        504 => "gateway timeout",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_show_the_daemon_text_and_status() {
        let e = CliError::Api {
            status: 409,
            message: error_message(409, r#"{"error":"snapshot t has dependents: a, b"}"#),
        };
        assert_eq!(e.to_string(), "snapshot t has dependents: a, b (HTTP 409)");
    }

    #[test]
    fn unauthorized_says_how_to_pass_the_token() {
        let e = CliError::Api {
            status: 401,
            message: error_message(401, r#"{"error":"missing bearer token"}"#),
        };
        let s = e.to_string();
        assert!(s.starts_with("missing bearer token (HTTP 401); "), "{s}");
        assert!(s.contains("--daemon-token"), "{s}");
        assert!(s.contains("FORKD_TOKEN"), "{s}");
    }

    #[test]
    fn the_token_hint_is_not_repeated() {
        let e = CliError::Api {
            status: 401,
            message: "wrong bearer token (forkd: --daemon-token or FORKD_TOKEN)".into(),
        };
        assert_eq!(
            e.to_string(),
            "wrong bearer token (forkd: --daemon-token or FORKD_TOKEN) (HTTP 401)"
        );
    }

    #[test]
    fn non_json_bodies_are_shown_shortened() {
        assert_eq!(error_message(502, "  upstream down \n"), "upstream down");
        assert_eq!(error_message(404, ""), "not found");
        assert_eq!(error_message(418, ""), "error");
        let long = "é".repeat(400);
        let m = error_message(500, &long);
        assert!(m.ends_with("...") && m.len() <= 303, "{}", m.len());
    }

    #[test]
    fn unreachable_says_what_to_do() {
        let e = CliError::Unreachable {
            url: "http://127.0.0.1:8889".into(),
            detail: "connection refused".into(),
        };
        let s = e.to_string();
        assert!(s.contains("http://127.0.0.1:8889"), "{s}");
        assert!(s.contains("forkd-daemon serve"), "{s}");
        assert!(s.contains("FORKD_URL"), "{s}");
    }

    #[test]
    fn tls_failures_point_at_the_ca_option() {
        let e = CliError::Tls {
            url: "https://h:8889".into(),
            detail: "invalid peer certificate: UnknownIssuer".into(),
        };
        assert!(e.to_string().contains("--ca-cert"));
    }

    #[test]
    fn not_found_is_recognised() {
        let e = CliError::Api {
            status: 404,
            message: "x".into(),
        };
        assert!(e.is_not_found());
        assert!(!CliError::Other("x".into()).is_not_found());
    }
}
