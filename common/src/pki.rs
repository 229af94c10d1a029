//! Watt's certificates: a certificate authority and what it signs — the controller's serving
//! certificate, one certificate per node and one per person — following the subject convention
//! in [`crate::auth`]. `wattctl certs` and `wattctl up` use it; so do the tests, which make their
//! own authority as an operator would.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::auth::Role;

/// How long certificates last unless asked otherwise: an authority ten years, what it signs one.
pub const AUTHORITY_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what} is not a PEM {expected}: {source}")]
    Read { what: String, expected: &'static str, source: rcgen::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that signs Watt's certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl Authority {
    /// A new self-signed authority named `common_name`.
    pub fn generate(common_name: &str, valid_for: Duration) -> Result<Authority, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, valid_for);
        let cert_pem = params.self_signed(&key)?.pem();
        let key_pem = key.serialize_pem();
        Ok(Authority { issuer: Issuer::new(params, key), cert_pem, key_pem })
    }

    /// An authority from its certificate and key: PKCS#8 as `generate` writes it, or PKCS#1
    /// RSA as Helm's `genCA` and OpenSSL's older tools write it.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Authority, PkiError> {
        let key = load_key(key_pem).map_err(|source| PkiError::Read {
            what: "the authority's key".into(),
            expected: "private key",
            source,
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|source| PkiError::Read {
            what: "the authority's certificate".into(),
            expected: "CA certificate",
            source,
        })?;
        Ok(Authority { issuer, cert_pem: cert_pem.to_string(), key_pem: key_pem.to_string() })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The controller's serving certificate, valid for `hosts` (DNS names or IP addresses).
    /// It can also authenticate as a client: the controller presents it to etcd.
    pub fn issue_server(&self, hosts: &[String], valid_for: Duration) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(hosts.to_vec())?;
        params.distinguished_name = subject("watt-controller", None);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, valid_for)
    }

    /// A principal's client certificate: CN = `name`, O = `watt:<role>`. A node's is also valid
    /// as a server certificate for its own name, for the agent's HTTPS port.
    pub fn issue_client(&self, name: &str, role: Role, valid_for: Duration) -> Result<Issued, PkiError> {
        let hosts = if role == Role::Node { vec![name.to_string()] } else { Vec::new() };
        let mut params = CertificateParams::new(hosts)?;
        params.distinguished_name = subject(name, Some(role));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if role == Role::Node {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        self.sign(params, valid_for)
    }

    /// Sign a node's certificate request (as [`node_request`] makes it) for `node`: the
    /// request proves possession of its key; everything else in it is ignored and the
    /// certificate says what [`Authority::issue_client`] would for that node.
    pub fn sign_node_request(&self, node: &str, request_pem: &str, valid_for: Duration) -> Result<String, PkiError> {
        let mut request = CertificateSigningRequestParams::from_pem(request_pem).map_err(|source| PkiError::Read {
            what: "the certificate request".into(),
            expected: "certificate request with a valid signature",
            source,
        })?;
        let mut params = CertificateParams::new(vec![node.to_string()])?;
        params.distinguished_name = subject(node, Some(Role::Node));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, valid_for);
        request.params = params;
        Ok(request.signed_by(&self.issuer)?.pem())
    }

    fn sign(&self, mut params: CertificateParams, valid_for: Duration) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, valid_for);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A private key from PEM: PKCS#8 (`PRIVATE KEY`), or PKCS#1 RSA (`RSA PRIVATE KEY`) wrapped into
/// PKCS#8 first, as ring reads only PKCS#8.
fn load_key(key_pem: &str) -> Result<KeyPair, rcgen::Error> {
    let pkcs1 = x509_parser::pem::parse_x509_pem(key_pem.as_bytes())
        .ok()
        .map(|(_, pem)| pem)
        .filter(|pem| pem.label == "RSA PRIVATE KEY");
    match pkcs1 {
        Some(pem) => KeyPair::try_from(rsa_pkcs1_to_pkcs8(&pem.contents).as_slice()),
        None => KeyPair::from_pem(key_pem),
    }
}

/// PrivateKeyInfo { version 0, rsaEncryption with NULL parameters, the PKCS#1 key } in DER.
fn rsa_pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    const VERSION_AND_ALGORITHM: [u8; 18] = [
        0x02, 0x01, 0x00, // INTEGER 0
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
        0x00, // rsaEncryption, NULL
    ];
    let mut body = VERSION_AND_ALGORITHM.to_vec();
    body.push(0x04); // OCTET STRING
    body.extend(der_length(pkcs1.len()));
    body.extend_from_slice(pkcs1);
    let mut der = vec![0x30]; // SEQUENCE
    der.extend(der_length(body.len()));
    der.extend(body);
    der
}

fn der_length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![len as u8];
    }
    let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
    let mut out = vec![0x80 | bytes.len() as u8];
    out.extend(bytes);
    out
}

/// A new key for `node` and a certificate request for it, both PEM: what an agent sends the
/// controller to get its node certificate, keeping the key to itself.
pub fn node_request(node: &str) -> Result<(String, String), PkiError> {
    node_request_with(node, KeyPair::generate()?)
}

/// A certificate request for `node` with the key it already has (PEM): a renewal changes only
/// the certificate, so no moment leaves a certificate beside a key that is not its own.
pub fn node_renewal_request(node: &str, key_pem: &str) -> Result<String, PkiError> {
    let key = load_key(key_pem).map_err(|source| PkiError::Read {
        what: "the node's key".into(),
        expected: "private key",
        source,
    })?;
    Ok(node_request_with(node, key)?.1)
}

fn node_request_with(node: &str, key: KeyPair) -> Result<(String, String), PkiError> {
    let mut params = CertificateParams::new(vec![node.to_string()])?;
    params.distinguished_name = subject(node, Some(Role::Node));
    let request = params.serialize_request(&key)?.pem()?;
    Ok((key.serialize_pem(), request))
}

/// When a PEM certificate stops being valid, in seconds since the Unix epoch.
pub fn not_after_unix(cert_pem: &str) -> Option<i64> {
    let der = cert_der(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn cert_der(cert_pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    Some(pem.contents)
}

fn subject(common_name: &str, role: Option<Role>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    if let Some(role) = role {
        name.push(DnType::OrganizationName, role.organization());
    }
    name.push(DnType::CommonName, common_name);
    name
}

/// From an hour ago (clocks drift between machines) for `valid_for`.
fn set_validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::try_from(valid_for).unwrap_or(time::Duration::days(365));
}

/// Write a file only its owner can read (a private key, a token), replacing any before.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |source| PkiError::Write { path: path.display().to_string(), source };
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(failed)?;
    file.write_all(contents.as_bytes()).map_err(failed)
}

/// Write a file anyone may read (a certificate).
pub fn write_public(path: &Path, contents: &str) -> Result<(), PkiError> {
    std::fs::write(path, contents).map_err(|source| PkiError::Write { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn subject_of(pem: &str) -> (String, Vec<String>) {
        let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap().as_str().unwrap().to_string();
        let orgs = cert.subject().iter_organization().map(|o| o.as_str().unwrap().to_string()).collect();
        (cn, orgs)
    }

    #[test]
    fn a_client_certificate_carries_its_name_and_role() {
        let ca = Authority::generate("test authority", AUTHORITY_VALIDITY).unwrap();
        let alice = ca.issue_client("alice", Role::PowerOperator, LEAF_VALIDITY).unwrap();
        assert_eq!(subject_of(&alice.cert_pem), ("alice".into(), vec!["watt:power-operator".into()]));
        let node = ca.issue_client("gpu-7", Role::Node, LEAF_VALIDITY).unwrap();
        assert_eq!(subject_of(&node.cert_pem), ("gpu-7".into(), vec!["watt:node".into()]));
    }

    #[test]
    fn an_authority_loaded_back_signs_as_the_one_generated() {
        let ca = Authority::generate("test authority", AUTHORITY_VALIDITY).unwrap();
        let again = Authority::load(ca.cert_pem(), ca.key_pem()).unwrap();
        let issued = again.issue_server(&["localhost".into(), "127.0.0.1".into()], LEAF_VALIDITY).unwrap();
        let (_, pem) = parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let (_, ca_pem) = parse_x509_pem(ca.cert_pem().as_bytes()).unwrap();
        let ca_cert = ca_pem.parse_x509().unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let err = Authority::load(ca.cert_pem(), "not a key").unwrap_err();
        assert!(err.to_string().contains("the authority's key"), "{err}");
    }

    #[test]
    fn a_node_request_becomes_a_node_certificate_for_the_name_signed_for() {
        let ca = Authority::generate("test authority", AUTHORITY_VALIDITY).unwrap();
        let (_key, request) = node_request("gpu-3").unwrap();
        let cert = ca.sign_node_request("gpu-3", &request, LEAF_VALIDITY).unwrap();
        assert_eq!(subject_of(&cert), ("gpu-3".into(), vec!["watt:node".into()]));
        // Whatever the request says, the certificate names the node it was signed for.
        let cert = ca.sign_node_request("gpu-4", &request, LEAF_VALIDITY).unwrap();
        assert_eq!(subject_of(&cert).0, "gpu-4");
        let left = not_after_unix(&cert).unwrap() - ::time::OffsetDateTime::now_utc().unix_timestamp();
        assert!((364 * 86400..=366 * 86400).contains(&left), "{left}");
        // A request whose signature does not hold is refused.
        let tampered = request.replacen("MI", "MJ", 1);
        assert!(ca.sign_node_request("gpu-3", &tampered, LEAF_VALIDITY).is_err());
    }

    #[test]
    fn private_files_are_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_private(&path, "one").unwrap();
        write_private(&path, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
