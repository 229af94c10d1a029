//! `wattctl`'s configuration file, as kubectl users expect: named contexts, each a controller and
//! the credentials to call it with, and the one in use. `--context NAME` picks another for one
//! command; `WATT_CONFIG` names another file (default `~/.config/watt/config.yaml`). A flag or
//! its variable (`--controller`, `--ca`, `--cert`, `--key`, `--token`) overrides the context's
//! value.
//!
//! ```yaml
//! current_context: prod
//! contexts:
//!   - name: prod
//!     controller: https://watt.example.com:7070
//!     ca: /home/me/watt/ca.pem
//!     cert: /home/me/watt/me.pem
//!     key: /home/me/watt/me-key.pem
//!   - name: lab
//!     controller: https://10.0.0.5:7070
//!     ca: /home/me/lab-ca.pem
//!     token_file: /home/me/lab-token
//! ```

use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde::{Deserialize, Serialize};

use crate::{emit, Failure, Output};

/// The file, as read and written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

/// A controller and how to call it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    pub name: String,
    pub controller: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// A file holding a bearer token (the token itself stays out of this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the configuration file.
    View,
    /// List the contexts; the one in use is marked.
    GetContexts,
    /// Use context NAME from now on.
    UseContext { name: String },
    /// Create or replace context NAME.
    SetContext {
        name: String,
        #[arg(long)]
        controller: String,
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Remove context NAME.
    DeleteContext { name: String },
}

/// Where the configuration lives: `WATT_CONFIG`, else `~/.config/watt/config.yaml`.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WATT_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/watt/config.yaml"))
}

impl ConfigFile {
    /// The file at `path`; an absent file is an empty configuration.
    pub fn load(path: &Path) -> Result<ConfigFile, Failure> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_yaml::from_str(&text).map_err(|e| Failure::Usage(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
            Err(e) => Err(Failure::Usage(format!("cannot read {}: {e}", path.display()))),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), Failure> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Failure::Usage(format!("cannot create {}: {e}", dir.display())))?;
        }
        let text = serde_yaml::to_string(self).map_err(|e| Failure::Usage(e.to_string()))?;
        // It names key files, not keys; still, only its owner needs to read it.
        watt_common::pki::write_private(path, &text).map_err(|e| Failure::Usage(e.to_string()))
    }

    /// The context `name` (or the current one when `None`); `Ok(None)` when none is chosen.
    pub fn context(&self, name: Option<&str>) -> Result<Option<&Context>, Failure> {
        let Some(name) = name.or(self.current_context.as_deref()) else { return Ok(None) };
        self.contexts.iter().find(|c| c.name == name).map(Some).ok_or_else(|| {
            let known: Vec<&str> = self.contexts.iter().map(|c| c.name.as_str()).collect();
            Failure::Usage(format!("--context: no context named {name:?} (known: {})", known.join(", ")))
        })
    }

    /// Add `context`, replacing one of the same name.
    pub fn set(&mut self, context: Context) {
        self.contexts.retain(|c| c.name != context.name);
        self.contexts.push(context);
    }
}

#[derive(Debug, Serialize)]
struct ContextRow {
    name: String,
    controller: String,
    current: bool,
}

pub fn run(command: ConfigCommand, output: Output) -> Result<(), Failure> {
    let path =
        path().ok_or_else(|| Failure::Usage("set WATT_CONFIG or HOME: no place for wattctl's configuration".into()))?;
    let mut file = ConfigFile::load(&path)?;
    match command {
        ConfigCommand::View => emit(output, &file, || serde_yaml::to_string(&file).unwrap_or_default()),
        ConfigCommand::GetContexts => {
            let rows: Vec<ContextRow> = file
                .contexts
                .iter()
                .map(|c| ContextRow {
                    name: c.name.clone(),
                    controller: c.controller.clone(),
                    current: file.current_context.as_deref() == Some(c.name.as_str()),
                })
                .collect();
            emit(output, &rows, || {
                let mut text = format!("{:<8}{:<20}{}\n", "CURRENT", "NAME", "CONTROLLER");
                for r in &rows {
                    text.push_str(&format!("{:<8}{:<20}{}\n", if r.current { "*" } else { "" }, r.name, r.controller));
                }
                text
            })
        }
        ConfigCommand::UseContext { name } => {
            file.context(Some(&name))?;
            file.current_context = Some(name.clone());
            file.save(&path)?;
            emit(output, &file, || format!("now using context {name}\n"))
        }
        ConfigCommand::SetContext { name, controller, ca, cert, key, token_file } => {
            let context = Context { name: name.clone(), controller, ca, cert, key, token_file };
            let credentials = credentials_of(&context, None)?;
            credentials.check(&context.controller).map_err(|e| Failure::Usage(format!("context {name}: {e}")))?;
            file.set(context);
            if file.current_context.is_none() {
                file.current_context = Some(name.clone());
            }
            file.save(&path)?;
            emit(output, &file, || format!("context {name} set in {}\n", path.display()))
        }
        ConfigCommand::DeleteContext { name } => {
            file.context(Some(&name))?;
            file.contexts.retain(|c| c.name != name);
            if file.current_context.as_deref() == Some(name.as_str()) {
                file.current_context = None;
            }
            file.save(&path)?;
            emit(output, &file, || format!("context {name} deleted\n"))
        }
    }
}

/// A context's credentials, the token read from its file, unless `token` overrides it.
pub fn credentials_of(context: &Context, token: Option<String>) -> Result<watt_common::client::Credentials, Failure> {
    let token = match (token, &context.token_file) {
        (Some(t), _) => Some(t),
        (None, Some(file)) => Some(
            watt_common::client::read_token(file)
                .map_err(|e| Failure::Usage(format!("context {}: {e}", context.name)))?,
        ),
        (None, None) => None,
    };
    Ok(watt_common::client::Credentials {
        ca: context.ca.clone(),
        cert: context.cert.clone(),
        key: context.key.clone(),
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_are_found_by_name_or_the_current_one_and_unknown_ones_are_named() {
        let mut file = ConfigFile::default();
        assert_eq!(file.context(None).unwrap(), None);
        file.set(Context { name: "a".into(), controller: "https://a:7070".into(), ..Default::default() });
        file.set(Context { name: "b".into(), controller: "https://b:7070".into(), ..Default::default() });
        file.set(Context { name: "a".into(), controller: "https://a2:7070".into(), ..Default::default() });
        assert_eq!(file.contexts.len(), 2);
        file.current_context = Some("a".into());
        assert_eq!(file.context(None).unwrap().unwrap().controller, "https://a2:7070");
        assert_eq!(file.context(Some("b")).unwrap().unwrap().controller, "https://b:7070");
        let Err(Failure::Usage(message)) = file.context(Some("c")) else { panic!("c is unknown") };
        assert!(message.contains("\"c\"") && message.contains("a, b") || message.contains("b, a"), "{message}");
        let text = serde_yaml::to_string(&file).unwrap();
        assert_eq!(serde_yaml::from_str::<ConfigFile>(&text).unwrap(), file);
        assert!(serde_yaml::from_str::<ConfigFile>("contexts: []\nservers: []\n").is_err(), "unknown keys are errors");
    }
}
