//! `watt-common`: the little every Watt binary needs the same way — durations written as
//! `250ms`/`10s` on the command line and in config files, TOML config files, logging set up
//! once, one shutdown signal, and the roles and certificates every part reads the same way.

pub mod auth;
pub mod client;
pub mod curve;
pub mod fetch;
pub mod grant;

pub mod hex {
    //! Lowercase hex, for digests, nonces and secrets carried as text.

    pub fn encode(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The bytes of `text`, or `None` when it is not an even number of hex digits.
    pub fn decode(text: &str) -> Option<Vec<u8>> {
        if text.len() % 2 != 0 {
            return None;
        }
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_and_refuses_what_is_not_hex() {
            assert_eq!(super::encode(&[0, 171, 255]), "00abff");
            assert_eq!(super::decode("00abff"), Some(vec![0, 171, 255]));
            for bad in ["abc", "zz", "0g"] {
                assert_eq!(super::decode(bad), None, "{bad}");
            }
        }
    }
}
pub mod pki;
pub mod ports;
pub mod tls;

pub mod names {
    //! The one rule for the names people give jobs and power sources: a DNS label, as
    //! Kubernetes names objects. They become store keys, metric labels and log directories.

    /// `Ok` for 1 to 63 lowercase letters, digits or '-', not starting or ending with '-';
    /// otherwise what the rule is, naming what was given.
    pub fn check(name: &str) -> Result<(), String> {
        let ok = (1..=63).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if ok {
            Ok(())
        } else {
            Err(format!(
                "must be 1 to 63 lowercase letters, digits or '-', not starting or ending with '-' (got {name:?})"
            ))
        }
    }

    /// The rule for runtime names (`pytorch-24.10`, `host`): like an image tag, 1 to 63 of
    /// `[a-z0-9-._]`, starting with a letter or digit; otherwise what the rule is, naming what
    /// was given. Job specs and agents' `--runtimes` both hold to it, so they match exactly.
    pub fn check_runtime(name: &str) -> Result<(), String> {
        let ok = (1..=63).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_'))
            && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
        if ok {
            Ok(())
        } else {
            Err(format!(
                "must be 1 to 63 lowercase letters, digits, '-', '.' or '_', starting with a letter or digit (got {name:?})"
            ))
        }
    }

    /// The rule for node names (they come from hostnames and certificates): 1 to 253 of
    /// `[A-Za-z0-9-._]`; otherwise what the rule is, naming what was given.
    pub fn check_node(name: &str) -> Result<(), String> {
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if ok {
            Ok(())
        } else {
            Err(format!("must be 1 to 253 of [A-Za-z0-9-._] (got {name:?})"))
        }
    }

    /// The rule for node labels (`rack=r12`), as Kubernetes has it: a key of 1 to 63 of
    /// `[A-Za-z0-9-._]`, starting and ending with a letter or digit, with an optional DNS prefix
    /// and '/' (`topology.kubernetes.io/zone`); a value of up to 63 of the same. Otherwise what
    /// the rule is, naming what was given.
    pub fn check_label(key: &str, value: &str) -> Result<(), String> {
        let part = |s: &str, empty_ok: bool| {
            (s.is_empty() && empty_ok)
                || (s.len() <= 63
                    && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
                    && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && s.ends_with(|c: char| c.is_ascii_alphanumeric()))
        };
        let (prefix, name) = key.rsplit_once('/').unwrap_or(("", key));
        let prefix_ok = prefix.len() <= 253 && (key.find('/').is_none() || (!prefix.is_empty() && part(prefix, false)));
        if !(prefix_ok && part(name, false)) {
            return Err(format!(
                "a label key must be 1 to 63 of [A-Za-z0-9-._], starting and ending with a letter or digit, with an optional prefix and '/' (got {key:?})"
            ));
        }
        if !part(value, true) {
            return Err(format!(
                "the value of label {key} must be up to 63 of [A-Za-z0-9-._], starting and ending with a letter or digit (got {value:?})"
            ));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn labels_follow_kubernetes() {
            for (k, v) in [("rack", "r12"), ("topology.kubernetes.io/zone", "us-east-1a"), ("row", ""), ("a_b", "x.y")]
            {
                assert_eq!(super::check_label(k, v), Ok(()), "{k}={v}");
            }
            for (k, v) in
                [("", "x"), ("-rack", "x"), ("rack", "-x"), ("/rack", "x"), ("rack", "a b"), ("r", &"v".repeat(64))]
            {
                assert!(super::check_label(k, v).is_err(), "{k}={v}");
            }
        }

        #[test]
        fn node_names_are_hostnames_and_everything_else_is_named() {
            for good in ["gpu-1", "node_7.rack-3", &"n".repeat(253)] {
                assert_eq!(super::check_node(good), Ok(()), "{good}");
            }
            for bad in ["", "a b", "a/b", "bad name!", &"n".repeat(254)] {
                assert!(super::check_node(bad).unwrap_err().contains(&format!("{bad:?}")), "{bad}");
            }
        }

        #[test]
        fn dns_labels_pass_and_everything_else_is_named() {
            for good in ["a", "llama-70b", "gt-1", &"x".repeat(63)] {
                assert_eq!(super::check(good), Ok(()), "{good}");
            }
            for bad in ["", "-a", "a-", "Grid", "a b", "a/..", "a_b", &"x".repeat(64)] {
                let err = super::check(bad).unwrap_err();
                assert!(err.contains(&format!("{bad:?}")), "{err}");
            }
        }
    }
}

pub mod shard_end {
    //! How a shard's process ended, in the words `wattctl describe job` and the controller's
    //! events use: "exited 3 after 1 restart", "was killed by signal 9".

    /// `None` when neither an exit code nor a signal is known.
    pub fn describe(exit_code: Option<i32>, signal: Option<i32>, restarts: u32) -> Option<String> {
        let restarts = match restarts {
            0 => String::new(),
            1 => " after 1 restart".into(),
            n => format!(" after {n} restarts"),
        };
        match (exit_code, signal) {
            (Some(code), _) => Some(format!("exited {code}{restarts}")),
            (None, Some(signal)) => Some(format!("was killed by signal {signal}{restarts}")),
            (None, None) => None,
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn exit_codes_signals_and_restarts_read_as_a_sentence() {
            assert_eq!(super::describe(Some(3), None, 1).as_deref(), Some("exited 3 after 1 restart"));
            assert_eq!(super::describe(None, Some(9), 2).as_deref(), Some("was killed by signal 9 after 2 restarts"));
            assert_eq!(super::describe(Some(0), None, 0).as_deref(), Some("exited 0"));
            assert_eq!(super::describe(None, None, 4), None);
        }
    }
}

pub mod duration {
    //! Durations as people write them: `100ms`, `1s`, `2m`.
    use std::time::Duration;

    /// Parse a duration for clap or a config file.
    pub fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s).map_err(|e| format!("{e} (write a duration such as 1s, 250ms or 2m)"))
    }

    /// Show a duration the way `parse` reads it.
    pub fn show(d: Duration) -> String {
        humantime::format_duration(d).to_string()
    }

    /// `#[serde(default, with = "watt_common::duration::option")]` for `Option<Duration>` fields.
    pub mod option {
        use serde::{Deserialize, Deserializer};
        use std::time::Duration;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let text: Option<String> = Option::deserialize(d)?;
            text.map(|t| super::parse(&t).map_err(serde::de::Error::custom)).transpose()
        }
    }
}

pub mod config_file {
    //! TOML config files: read, parse, and say what is wrong on one line with the file's path.
    use std::path::{Path, PathBuf};

    #[derive(Debug, thiserror::Error)]
    pub enum FileError {
        #[error("cannot read config file {path}: {source}")]
        Read { path: PathBuf, source: std::io::Error },
        #[error("config file {path}: {message}")]
        Parse { path: PathBuf, message: String },
    }

    /// Read and parse `path`; unknown keys are errors when `T` denies them.
    pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, FileError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| FileError::Parse {
            path: path.into(),
            // toml's message spans several lines with a source excerpt; keep it on one.
            message: e.to_string().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" "),
        })
    }
}

pub mod logging {
    //! Logs go to stderr, as text (colour on a terminal) or JSON; the level comes from `WATT_LOG`.
    use std::io::IsTerminal;

    use tracing_subscriber::EnvFilter;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum LogFormat {
        Text,
        Json,
    }

    pub fn init(format: LogFormat) {
        let filter = EnvFilter::try_from_env("WATT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
        match format {
            LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
            LogFormat::Json => builder.json().init(),
        }
    }
}

pub mod signal {
    //! The one shutdown signal of a daemon.

    /// Resolves on SIGTERM or SIGINT (Ctrl-C).
    pub async fn shutdown() {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
