//! The OpenADR 3 reference VTN (`openleadr-vtn` from crates.io, with its own OAuth provider)
//! on Debian's PostgreSQL, notifying through Debian's Mosquitto MQTT broker, all real, on
//! loopback, for the grid-event tests. `scripts/test` installs the VTN and its schema under
//! `target/tools` (see `scripts/openleadr-vtn-schema.py`), and PostgreSQL and Mosquitto.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{free_port, wait_for, which, Proc};

/// The business logic's (the utility's) OAuth client, which writes programs and events: the
/// VTN's own test fixture, secret `bl-client`.
pub const BL_CLIENT: (&str, &str) = ("bl-client", "bl-client");
/// The VEN's OAuth client (Watt's controller): the fixture's, secret `ven-client`.
pub const VEN_CLIENT: (&str, &str) = ("ven-client-client-id", "ven-client");

const USERS: &str = r#"
INSERT INTO "user" (id, reference, description, scopes, created, modified)
VALUES ('bl-client', 'bl-client-ref', null, '{"read_all", "write_vens_bl", "write_programs", "write_events", "write_users", "write_subscriptions_bl"}', now(), now());
INSERT INTO user_credentials (user_id, client_id, client_secret)
VALUES ('bl-client', 'bl-client', '$argon2id$v=19$m=16,t=2,p=1$MWt1QVNFdHdlZVJhNEZzUA$Rmkguwgaz+A2GWIaDRtv8w');
INSERT INTO "user" (id, reference, description, scopes, created, modified)
VALUES ('ven-client', 'ven-client-ref', 'desc', '{"read_targets", "read_ven_objects", "write_reports_ven", "write_subscriptions_ven", "write_vens_ven"}', now(), now());
INSERT INTO user_credentials (user_id, client_id, client_secret)
VALUES ('ven-client', 'ven-client-client-id', '$argon2id$v=19$m=16,t=2,p=1$YWlOSE8xRGFVdVVIa212Ug$tjmQC+zNC3QXc9K8mEXRrA');
"#;

/// The VTN's login at the broker, to publish.
const VTN_MQTT: (&str, &str) = ("vtn", "vtn-mqtt-password");
/// The VEN's login at the broker, to subscribe (`--openadr-mqtt-username`).
pub const VEN_MQTT: (&str, &str) = ("watt-ven", "watt-ven-mqtt-password");

/// A PostgreSQL server of its own, a Mosquitto broker of its own, and the VTN on them; all
/// stopped when dropped.
pub struct Vtn {
    pub url: String,
    pub port: u16,
    /// The broker the VTN publishes its notifications at (`mqtt://127.0.0.1:PORT`).
    pub mqtt_url: String,
    /// A file holding [`VEN_MQTT`]'s password, for `--openadr-mqtt-password-file`.
    pub ven_mqtt_password_file: PathBuf,
    vtn: Option<Proc>,
    postgres: Option<Proc>,
    mosquitto: Option<Proc>,
    mqtt_port: u16,
    database_url: String,
    secret: String,
    dir: tempfile::TempDir,
}

fn postgres_bin(name: &str) -> PathBuf {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|version| version.path().join("bin").join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("PostgreSQL is not installed: run `apt-get install -y postgresql` (scripts/test does)")
    })
}

/// PostgreSQL refuses to run as root: as root, run it as the `postgres` user Debian's package made.
fn as_postgres(program: PathBuf) -> Command {
    if nix::unistd::Uid::effective().is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

impl Vtn {
    pub fn start() -> Vtn {
        let vtn_bin = which("openleadr-vtn").unwrap_or_else(|| {
            panic!("`openleadr-vtn` is not installed: run scripts/test, which installs it under target/tools")
        });
        let schema = vtn_bin.parent().unwrap().join("../share/openleadr-vtn/schema.sql");
        assert!(schema.is_file(), "{} is missing: run scripts/test, which writes it", schema.display());
        let psql = which("psql").unwrap_or_else(|| panic!("`psql` is missing: apt-get install -y postgresql-client"));
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if nix::unistd::Uid::effective().is_root() {
            let status = Command::new("chown").args(["postgres"]).arg(dir.path()).status().unwrap();
            assert!(status.success(), "chown postgres {}", dir.path().display());
        }
        let init = as_postgres(postgres_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "openadr", "--auth=trust", "--no-sync"])
            .output()
            .unwrap();
        assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
        let pg_port = free_port();
        let mut server = as_postgres(postgres_bin("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &pg_port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .arg("-k")
            .arg(dir.path());
        let postgres = Proc::spawn("postgres", server);
        let admin_url = format!("postgres://openadr@127.0.0.1:{pg_port}/postgres");
        wait_for(Duration::from_secs(30), "PostgreSQL up", || {
            let ok = Command::new(&psql).args([&admin_url, "-qc", "select 1"]).output().ok()?.status.success();
            ok.then_some(())
        });
        let database_url = format!("postgres://openadr@127.0.0.1:{pg_port}/openadr");
        let run_sql = |url: &str, args: &[&str], input: Option<&str>| {
            let mut cmd = Command::new(&psql);
            cmd.args(["-v", "ON_ERROR_STOP=1", "-q", url]).args(args);
            let out = match input {
                Some(sql) => {
                    use std::io::Write;
                    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
                    cmd.stderr(std::process::Stdio::piped());
                    let mut child = cmd.spawn().unwrap();
                    child.stdin.take().unwrap().write_all(sql.as_bytes()).unwrap();
                    child.wait_with_output().unwrap()
                }
                None => cmd.output().unwrap(),
            };
            assert!(out.status.success(), "psql {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run_sql(&admin_url, &["-c", "CREATE DATABASE openadr"], None);
        run_sql(&database_url, &["-f", schema.to_str().unwrap()], None);
        run_sql(&database_url, &[], Some(USERS));
        // 32 random bytes, base64: the VTN's token signing key.
        let secret = {
            use base64::Engine;
            use std::io::Read;
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut bytes).unwrap();
            base64::engine::general_purpose::STANDARD.encode(bytes)
        };
        let port = free_port();
        let mqtt_port = free_port();
        let ven_mqtt_password_file = dir.path().join("ven-mqtt-password");
        std::fs::write(&ven_mqtt_password_file, format!("{}\n", VEN_MQTT.1)).unwrap();
        let mut vtn = Vtn {
            url: format!("http://127.0.0.1:{port}/"),
            port,
            mqtt_url: format!("mqtt://127.0.0.1:{mqtt_port}"),
            ven_mqtt_password_file,
            vtn: None,
            postgres: Some(postgres),
            mosquitto: None,
            mqtt_port,
            database_url,
            secret,
            dir,
        };
        vtn.start_broker();
        vtn.start_vtn();
        vtn
    }

    /// Mosquitto on loopback, anonymous refused: the VTN and the VEN each log in.
    fn start_broker(&mut self) {
        let mosquitto = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .or_else(|| which("mosquitto"))
            .unwrap_or_else(|| {
                panic!("Mosquitto is not installed: run `apt-get install -y mosquitto` (scripts/test does)")
            });
        let passwd = which("mosquitto_passwd")
            .unwrap_or_else(|| panic!("`mosquitto_passwd` is missing: apt-get install -y mosquitto"));
        let passwords = self.dir.path().join("mqtt-passwords");
        for (i, (user, password)) in [VTN_MQTT, VEN_MQTT].into_iter().enumerate() {
            let mut cmd = Command::new(&passwd);
            cmd.arg("-b");
            if i == 0 {
                cmd.arg("-c");
            }
            let out = cmd.arg(&passwords).args([user, password]).output().unwrap();
            assert!(out.status.success(), "mosquitto_passwd: {}", String::from_utf8_lossy(&out.stderr));
        }
        let conf = self.dir.path().join("mosquitto.conf");
        // As root it would switch to the `mosquitto` user, who cannot read this test's files.
        let user = if nix::unistd::Uid::effective().is_root() { "user root\n" } else { "" };
        std::fs::write(
            &conf,
            format!(
                "{user}listener {} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n",
                self.mqtt_port,
                passwords.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(mosquitto);
        cmd.arg("-c").arg(&conf);
        self.mosquitto = Some(Proc::spawn("mosquitto", cmd));
        let port = self.mqtt_port;
        wait_for(Duration::from_secs(10), "Mosquitto listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
    }

    /// The broker stops: notifications stop, the VTN's reads go on.
    pub fn stop_broker(&mut self) {
        if let Some(mut p) = self.mosquitto.take() {
            p.kill9();
        }
    }

    fn start_vtn(&mut self) {
        let mut cmd = Command::new(which("openleadr-vtn").unwrap());
        cmd.env("DATABASE_URL", &self.database_url)
            .env("PORT", self.port.to_string())
            .env("OAUTH_TYPE", "INTERNAL")
            .env("OAUTH_BASE64_SECRET", &self.secret)
            .env("OAUTH_TOKEN_URL", format!("{}auth/token", self.url))
            .env("MQTT_URL", format!("tcp://127.0.0.1:{}", self.mqtt_port))
            .env("MQTT_ADVERTISE_URL", &self.mqtt_url)
            .env("MQTT_USERNAME", VTN_MQTT.0)
            .env("MQTT_PASSWORD", VTN_MQTT.1)
            .env("RUST_LOG", "warn")
            .current_dir(self.dir.path());
        self.vtn = Some(Proc::spawn("vtn", cmd));
        let port = self.port;
        wait_for(Duration::from_secs(30), "the VTN answering", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
    }

    /// The VTN stops (its data stays): a VTN the VEN cannot reach.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.vtn.take() {
            p.kill9();
        }
    }

    /// And starts again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.start_vtn();
    }
}

impl Drop for Vtn {
    fn drop(&mut self) {
        self.stop();
        self.stop_broker();
        if let Some(postgres) = self.postgres.take() {
            // A fast shutdown: its server processes end with it.
            let _ = Command::new("kill").args(["-INT", &postgres.pid().to_string()]).status();
            let mut postgres = postgres;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline && postgres.child.try_wait().ok().flatten().is_none() {
                crate::idle(Duration::from_millis(50));
            }
        }
    }
}
