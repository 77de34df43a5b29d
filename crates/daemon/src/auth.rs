//! Bearer-token authentication.
//!
//! The token comes from a file (first line, trimmed). Presented tokens are
//! compared in constant time: both sides are hashed to fixed-length digests
//! first, so neither the content nor the length of the secret leaks through
//! timing. The audit log names a token by a short id derived from its hash,
//! never by the token itself.

use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a token is not taken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token file could not be read.
    #[error("cannot read the token file {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The token is a placeholder from an example configuration.
    #[error("the token is the placeholder {0:?} from an example configuration: put a secret there (e.g. `head -c 24 /dev/urandom | base64`)")]
    Placeholder(&'static str),
    /// The token is too short to be a secret.
    #[error("the token has {len} characters; use at least {MIN_TOKEN_LEN} (e.g. `head -c 24 /dev/urandom | base64`)")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// The token in a file is not taken.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: Box<Error>,
    },
}

/// The configured token.
pub struct Auth {
    digest: [u8; 32],
    id: String,
}

/// Shortest token accepted: a guessable token is worse than none because
/// it looks like protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// Tokens refused whatever their length: the placeholders example
/// configurations ship (upstream's k8s manifest has `REPLACE_ME...`).
pub const PLACEHOLDERS: [&str; 2] = ["REPLACE_ME", "CHANGE_ME"];

impl Auth {
    /// Reads the token file.
    pub fn from_file(path: &Path) -> Result<Auth, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let token = text.lines().next().unwrap_or("").trim();
        Auth::new(token).map_err(|e| Error::InFile {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    /// A token given directly.
    pub fn new(token: &str) -> Result<Auth, Error> {
        if let Some(p) = PLACEHOLDERS.iter().find(|p| token.starts_with(**p)) {
            return Err(Error::Placeholder(p));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(Error::TooShort { len: token.len() });
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let id = format!(
            "tok-{}",
            digest[..4]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        Ok(Auth { digest, id })
    }

    /// The id the audit log names this token by.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether an `Authorization` header value carries the token.
    pub fn check(&self, header: Option<&str>) -> bool {
        let Some(presented) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        digest.ct_eq(&self.digest).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_passes() {
        let auth = Auth::new("s3cret-token-0123456789").unwrap();
        assert!(auth.check(Some("Bearer s3cret-token-0123456789")));
        assert!(!auth.check(Some("Bearer s3cret-token-012345678")));
        assert!(!auth.check(Some("Bearer s3cret-token-01234567890")));
        assert!(!auth.check(Some("s3cret-token-0123456789")));
        assert!(!auth.check(Some("Basic s3cret-token-0123456789")));
        assert!(!auth.check(None));
        assert!(auth.id().starts_with("tok-") && auth.id().len() == 12);
        assert!(!auth.id().contains("s3cret"));
    }

    #[test]
    fn placeholder_tokens_are_refused_at_any_length() {
        for t in [
            "REPLACE_ME_WITH_A_LONG_SECRET_0123",
            "CHANGE_ME-0123456789abcdef",
        ] {
            assert!(matches!(Auth::new(t), Err(Error::Placeholder(_))), "{t}");
        }
        assert!(Auth::new("my-REPLACE_ME-0123456789").is_ok());
    }

    #[test]
    fn a_short_token_is_refused() {
        assert!(matches!(
            Auth::new("short"),
            Err(Error::TooShort { len: 5 })
        ));
    }
}
