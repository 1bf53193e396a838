//! Bearer tokens: `TRAINYARD_API_TOKENS` is a comma-separated list of bare
//! `TOKEN`s (full access) or `NAME:SCOPE:TOKEN` with SCOPE `read|submit|admin`
//! (each scope includes the ones before it). Tokens are compared in constant
//! time, against every configured token.

use subtle::ConstantTimeEq;

/// What a token may do; each scope includes the lower ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read jobs, events, logs, models.
    Read,
    /// Also submit, cancel and retry jobs.
    Submit,
    /// Also replay dead letters, promote and roll back models.
    Admin,
}

/// A configured token.
#[derive(Clone)]
pub struct Token {
    /// Who holds it (recorded as the trigger source of what it submits).
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    secret: Vec<u8>,
}

impl Token {
    /// The secret, as the key that signs this token's console sessions.
    pub(crate) fn secret(&self) -> &[u8] {
        &self.secret
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("name", &self.name).field("scope", &self.scope).finish_non_exhaustive()
    }
}

/// Why a token list did not parse.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A bad entry (the secret is never echoed).
    #[error("failed to parse TRAINYARD_API_TOKENS entry {index}: {reason}")]
    Entry {
        /// 1-based position.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The token file could not be read.
    #[error("failed to read token file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Vec<Token>);

impl Tokens {
    /// Parses `a,NAME:SCOPE:b,…`; entries may also be separated by newlines.
    pub fn parse(spec: &str) -> Result<Self, TokenError> {
        let mut tokens = Vec::new();
        for (i, entry) in spec.split([',', '\n']).map(str::trim).filter(|e| !e.is_empty() && !e.starts_with('#')).enumerate() {
            let bad = |reason: &str| TokenError::Entry { index: i + 1, reason: reason.into() };
            let token = match entry.splitn(3, ':').collect::<Vec<_>>()[..] {
                [secret] => Token { name: format!("token-{}", i + 1), scope: Scope::Admin, secret: secret.as_bytes().to_vec() },
                [name, scope, secret] => {
                    let scope = match scope {
                        "read" => Scope::Read,
                        "submit" => Scope::Submit,
                        "admin" => Scope::Admin,
                        _ => return Err(bad("scope must be read, submit or admin")),
                    };
                    if name.is_empty() || secret.is_empty() {
                        return Err(bad("name and token must not be empty"));
                    }
                    Token { name: name.into(), scope, secret: secret.as_bytes().to_vec() }
                }
                _ => return Err(bad("expected TOKEN or NAME:SCOPE:TOKEN")),
            };
            tokens.push(token);
        }
        Ok(Self(tokens))
    }

    /// Parses the value of `TRAINYARD_API_TOKENS`, or the file it names as `@PATH` or `file:PATH`.
    pub fn from_setting(value: &str) -> Result<Self, TokenError> {
        match value.strip_prefix('@').or_else(|| value.strip_prefix("file:")) {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| TokenError::File { path: path.into(), source })?;
                Self::parse(&text)
            }
            None => Self::parse(value),
        }
    }

    /// No token configured (then every `/v1/` request is refused).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every configured token.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Token> {
        self.0.iter()
    }

    /// The token matching `presented`, comparing against every token in constant time.
    pub fn check(&self, presented: &str) -> Option<&Token> {
        let presented = presented.as_bytes();
        let mut found = None;
        for t in &self.0 {
            if bool::from(t.secret.ct_eq(presented)) && found.is_none() {
                found = Some(t);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bare_and_scoped_tokens() {
        let t = Tokens::parse("s3cret, ci:submit:abc ,viewer:read:x:y").unwrap();
        assert_eq!(t.check("s3cret").unwrap().scope, Scope::Admin);
        assert_eq!(t.check("abc").unwrap().name, "ci");
        assert_eq!(t.check("x:y").unwrap().scope, Scope::Read);
        assert!(t.check("abd").is_none());
        assert!(t.check("").is_none());
        let err = Tokens::parse("a:owner:zzz").unwrap_err().to_string();
        assert!(err.contains("scope") && !err.contains("zzz"), "{err}");
        assert!(Scope::Admin > Scope::Submit && Scope::Submit > Scope::Read);
    }
}
