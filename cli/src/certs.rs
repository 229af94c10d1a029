//! `wattctl certs`: the credentials a Watt cluster runs on, made on the operator's machine.
//!
//! - `init DIR` makes a certificate authority (`ca.pem`, `ca-key.pem`), the controller's serving
//!   certificate (`controller.pem`) and an admin's client certificate (`admin.pem`).
//! - `issue DIR NAME --role ROLE` signs a certificate for a person or a node (CN = NAME,
//!   O = watt:ROLE) with that authority: `NAME.pem` and `NAME-key.pem`.
//! - `token NAME --role ROLE` prints a new bearer token and the line the controller's token
//!   file needs for it; the token itself is never written anywhere.
//!
//! Private keys are written readable by their owner only; an existing authority is never
//! overwritten.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use watt_common::auth::{new_token, token_digest, Role};
use watt_common::pki::{self, Authority, AUTHORITY_VALIDITY, LEAF_VALIDITY};

use crate::{emit, Failure, Output};

#[derive(Debug, Subcommand)]
pub enum Certs {
    /// Make a certificate authority, the controller's certificate and an admin certificate in DIR.
    Init {
        dir: PathBuf,
        /// A name or IP address clients reach the controller by (repeat for several).
        #[arg(long = "host", value_name = "HOST", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
    },
    /// Sign a certificate for a person or a node with the authority in DIR.
    Issue {
        dir: PathBuf,
        /// The principal: a person's name, or the node's name for --role node.
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
    /// Print a new bearer token for NAME and its token-file line.
    Token {
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
}

fn parse_role(text: &str) -> Result<Role, String> {
    text.parse().map_err(|e: watt_common::auth::UnknownRole| e.to_string())
}

/// What `init` and `issue` wrote.
#[derive(Debug, serde::Serialize)]
pub struct Written {
    pub files: Vec<String>,
}

#[derive(Debug, serde::Serialize)]
struct TokenView {
    name: String,
    role: String,
    token: String,
    token_file_line: String,
}

pub fn run(what: Certs, output: Output) -> Result<(), Failure> {
    match what {
        Certs::Init { dir, hosts } => {
            let written = init(&dir, &hosts)?;
            emit(output, &written, || {
                format!(
                    "wrote {}\nstart the controller with --tls-cert {d}/controller.pem --tls-key {d}/controller-key.pem --client-ca {d}/ca.pem\n",
                    written.files.join(", "),
                    d = dir.display()
                )
            })
        }
        Certs::Issue { dir, name, role } => {
            let written = issue(&dir, &name, role)?;
            emit(output, &written, || format!("wrote {}\n", written.files.join(", ")))
        }
        Certs::Token { name, role } => {
            check_name(&name)?;
            let token = new_token();
            let view = TokenView {
                token_file_line: format!("{},{name},{role}", token_digest(&token)),
                name,
                role: role.to_string(),
                token,
            };
            emit(output, &view, || {
                format!(
                    "token: {}\nadd this line to the controller's --token-file:\n{}\n",
                    view.token, view.token_file_line
                )
            })
        }
    }
}

pub fn init(dir: &Path, hosts: &[String]) -> Result<Written, Failure> {
    if dir.join("ca-key.pem").exists() {
        return Err(Failure::Usage(format!(
            "{} already holds an authority; refusing to replace it (certificates it signed would stop working)",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Failure::Usage(format!("cannot create {}: {e}", dir.display())))?;
    let ca = Authority::generate("watt-ca", AUTHORITY_VALIDITY).map_err(usage)?;
    let server = ca.issue_server(hosts, LEAF_VALIDITY).map_err(usage)?;
    let admin = ca.issue_client("admin", Role::Admin, LEAF_VALIDITY).map_err(usage)?;
    let mut files = Vec::new();
    pki::write_private(&dir.join("ca-key.pem"), ca.key_pem()).map_err(usage)?;
    pki::write_public(&dir.join("ca.pem"), ca.cert_pem()).map_err(usage)?;
    files.extend(["ca.pem".to_string(), "ca-key.pem".to_string()]);
    files.extend(write_pair(dir, "controller", &server)?);
    files.extend(write_pair(dir, "admin", &admin)?);
    Ok(Written { files: files.iter().map(|f| dir.join(f).display().to_string()).collect() })
}

pub fn issue(dir: &Path, name: &str, role: Role) -> Result<Written, Failure> {
    check_name(name)?;
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file)).map_err(|e| {
            Failure::Usage(format!(
                "cannot read {}: {e} (make one with `wattctl certs init`)",
                dir.join(file).display()
            ))
        })
    };
    let ca = Authority::load(&read("ca.pem")?, &read("ca-key.pem")?).map_err(usage)?;
    let issued = ca.issue_client(name, role, LEAF_VALIDITY).map_err(usage)?;
    let files = write_pair(dir, name, &issued)?;
    Ok(Written { files: files.iter().map(|f| dir.join(f).display().to_string()).collect() })
}

/// A principal's name becomes a certificate's CN and a file name: the node-name rule, and no
/// leading '.' (no hidden files, no `..`).
fn check_name(name: &str) -> Result<(), Failure> {
    watt_common::names::check_node(name).map_err(|rule| Failure::Usage(format!("NAME {rule}")))?;
    if name.starts_with('.') {
        return Err(Failure::Usage(format!("NAME must not start with '.' (got {name:?})")));
    }
    Ok(())
}

fn write_pair(dir: &Path, stem: &str, issued: &pki::Issued) -> Result<[String; 2], Failure> {
    let (cert, key) = (format!("{stem}.pem"), format!("{stem}-key.pem"));
    pki::write_private(&dir.join(&key), &issued.key_pem).map_err(usage)?;
    pki::write_public(&dir.join(&cert), &issued.cert_pem).map_err(usage)?;
    Ok([cert, key])
}

fn usage(e: pki::PkiError) -> Failure {
    Failure::Usage(e.to_string())
}
