//! The token file: bearer tokens as the controller keeps them, like Kubernetes' static token
//! file but hashed. One line per token — `sha256:<hex digest>,<name>,<role>` — with blank lines
//! and `#` comments ignored; `wattctl certs token` prints a new token and its line. The file is
//! read again when it changes, so tokens are added and revoked without a restart; a file that
//! no longer parses keeps the tokens read before and says why in the log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use watt_common::auth::{token_digest, Role};

use super::{Credential, Principal};

/// How often the file is checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("token file {path}, line {line}: {message}")]
    Line { path: String, line: usize, message: String },
}

/// Principals by token digest.
type Entries = HashMap<String, (String, Role)>;

#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    entries: RwLock<Arc<Entries>>,
    /// What the file looked like when last read: its modification time and length.
    stamp: RwLock<Option<(SystemTime, u64)>>,
}

impl TokenFile {
    /// Read the file; an error names the line and what is wrong with it.
    pub fn open(path: &Path) -> Result<Arc<TokenFile>, TokenFileError> {
        let stamp = stamp(path);
        let entries = read(path)?;
        Ok(Arc::new(TokenFile {
            path: path.to_path_buf(),
            entries: RwLock::new(Arc::new(entries)),
            stamp: RwLock::new(stamp),
        }))
    }

    /// The principal a bearer token names, if the file holds it.
    pub fn principal(&self, token: &str) -> Option<Principal> {
        let digest = token_digest(token);
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner()).clone();
        entries.get(&digest).map(|(name, role)| Principal {
            name: name.clone(),
            role: *role,
            credential: Credential::Token,
        })
    }

    /// How many tokens are in force.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Read the file again if it changed since last read. `Ok(true)` when new tokens are in
    /// force; an error leaves the tokens as they were.
    pub fn reload_if_changed(&self) -> Result<bool, TokenFileError> {
        let now = stamp(&self.path);
        if now == *self.stamp.read().unwrap_or_else(|p| p.into_inner()) {
            return Ok(false);
        }
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = now;
        let entries = read(&self.path)?;
        *self.entries.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(entries);
        Ok(true)
    }

    /// Reload on change until `stop` resolves.
    pub async fn watch(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return,
            }
            match self.reload_if_changed() {
                Ok(true) => tracing::info!(path = %self.path.display(), tokens = self.len(), "Token file reloaded."),
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "Token file not reloaded; the tokens read before stay in force."),
            }
        }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read(path: &Path) -> Result<Entries, TokenFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| TokenFileError::Read { path: path.display().to_string(), source })?;
    parse(&text).map_err(|(line, message)| TokenFileError::Line { path: path.display().to_string(), line, message })
}

/// The entries of a token file's text, or the first bad line (1-based) and what is wrong.
fn parse(text: &str) -> Result<Entries, (usize, String)> {
    let mut entries = Entries::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |message: String| (i + 1, message);
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [digest, name, role] = fields[..] else {
            return Err(bad(format!("has {} fields; expected sha256:<digest>,<name>,<role>", fields.len())));
        };
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| bad("the digest must start with sha256: (the file holds digests, never tokens)".into()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(bad("the digest must be 64 lowercase hex digits".into()));
        }
        if name.is_empty() {
            return Err(bad("the name is empty".into()));
        }
        let role: Role = role.parse().map_err(|e: watt_common::auth::UnknownRole| bad(e.to_string()))?;
        if entries.insert(digest.to_string(), (name.to_string(), role)).is_some() {
            return Err(bad("this digest appears twice".into()));
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use watt_common::auth::new_token;

    #[test]
    fn tokens_name_principals_and_bad_lines_are_named() {
        let token = new_token();
        let text = format!("# people\n\n{},alice,power-operator\n", token_digest(&token));
        let entries = parse(&text).unwrap();
        assert_eq!(entries.get(&token_digest(&token)), Some(&("alice".to_string(), Role::PowerOperator)));

        let digest = token_digest("x");
        for (bad, says) in [
            (format!("{digest},alice"), "has 2 fields"),
            ("watt_abc,alice,admin".to_string(), "must start with sha256:"),
            ("sha256:abc,alice,admin".to_string(), "64 lowercase hex"),
            (format!("{digest},,admin"), "name is empty"),
            (format!("{digest},alice,root"), "unknown role \"root\""),
            (format!("{digest},a,admin\n{digest},b,viewer"), "appears twice"),
        ] {
            let (line, message) = parse(&format!("# header\n{bad}")).unwrap_err();
            assert!(line >= 2 && message.contains(says), "{bad}: line {line}: {message}");
        }
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_old_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let (first, second) = (new_token(), new_token());
        std::fs::write(&path, format!("{},alice,viewer\n", token_digest(&first))).unwrap();
        let file = TokenFile::open(&path).unwrap();
        assert_eq!(file.principal(&first).map(|p| p.name), Some("alice".into()));
        assert_eq!(file.principal(&second), None);
        assert!(!file.reload_if_changed().unwrap());

        // Revoke alice, admit bob (a longer line: the length changes even within the same mtime tick).
        std::fs::write(&path, format!("{},bob,submitter\n\n", token_digest(&second))).unwrap();
        assert!(file.reload_if_changed().unwrap());
        assert_eq!(file.principal(&first), None);
        assert_eq!(file.principal(&second).map(|p| (p.name, p.role)), Some(("bob".into(), Role::Submitter)));

        std::fs::write(&path, "garbage\n").unwrap();
        let err = file.reload_if_changed().unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert_eq!(file.principal(&second).map(|p| p.name), Some("bob".into()));
    }
}
