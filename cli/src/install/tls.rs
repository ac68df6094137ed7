//! The TLS material `neutrino install` renders: the injector's serving certificate and
//! its CA, and the mesh CA (generated, or kept in `--mesh-ca-dir` across runs so that
//! re-applying never silently replaces the CA of a running mesh). The only part of
//! install that generates keys or touches files; it must not render manifests.

use std::path::{Path, PathBuf};

use neutrino_control_plane::identity::{self, ca};

use super::{
    INJECTOR_DNS_NAMES, InstallError, MESH_CA_FILES, MESH_CA_SECRET, NAMESPACE, TLS_VALIDITY_DAYS, TRUST_DOMAIN, Tls,
};

/// [`tls_with_mesh_ca`] with a new mesh CA, for tests (`neutrino install` goes through
/// [`mesh_ca`], which says where the CA came from).
#[cfg(test)]
pub fn generate_tls(now_unix: i64) -> Result<Tls, InstallError> {
    tls_with_mesh_ca(now_unix, generate_mesh_ca(now_unix)?)
}

/// A new mesh CA: the control plane's own generator (anchor 10 years, issuer 1 year;
/// `neutrino check` warns 30 days before the issuer ends).
pub(super) fn generate_mesh_ca(now_unix: i64) -> Result<ca::Material, InstallError> {
    ca::generate(TRUST_DOMAIN, now_unix, ca::GENERATED_ANCHOR_DAYS, ca::GENERATED_ISSUER_DAYS)
        .map_err(|e| InstallError::Generate(format!("the mesh CA: {e}")))
}

/// Where the mesh CA of a run came from ([`mesh_ca`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshCaOrigin {
    /// Generated for this run and kept nowhere (no `--mesh-ca-dir`).
    Generated,
    /// Generated and written into `--mesh-ca-dir` (it was empty or missing).
    Written(PathBuf),
    /// Read from `--mesh-ca-dir`.
    Reused(PathBuf),
}

impl MeshCaOrigin {
    /// What to tell the user on stderr, if anything.
    pub fn notice(&self) -> Option<String> {
        match self {
            MeshCaOrigin::Generated => Some(format!(
                "warning: generated a NEW mesh CA (trust anchor and issuer in Secret {NAMESPACE}/{MESH_CA_SECRET}) \
                 and kept it nowhere: applying this to a cluster where the mesh runs REPLACES its CA, and proxies \
                 holding certificates of the old one fail mTLS until they are restarted. Pass --mesh-ca-dir <DIR> \
                 to write the CA there on the first run and reuse it on every later run."
            )),
            MeshCaOrigin::Written(dir) => Some(format!(
                "neutrino install: generated a new mesh CA into {} ({} is its private key: keep it safe); later \
                 runs with --mesh-ca-dir {} reuse it",
                dir.display(),
                identity::ISSUER_KEY_FILE,
                dir.display()
            )),
            MeshCaOrigin::Reused(_) => None,
        }
    }
}

/// The mesh CA: without `dir` a new one; with it, the three files there
/// ([`MESH_CA_FILES`]) when they all exist, validated as the control plane loads them,
/// or a new one written there (the directory created, the key mode 0600) when none
/// does. Some but not all is refused: the missing ones are not regenerated.
pub fn mesh_ca(dir: Option<&Path>, now_unix: i64) -> Result<(ca::Material, MeshCaOrigin), InstallError> {
    let Some(dir) = dir else { return Ok((generate_mesh_ca(now_unix)?, MeshCaOrigin::Generated)) };
    let dir_err = |reason: String| InstallError::MeshCaDir { dir: dir.to_path_buf(), reason };
    let (present, missing): (Vec<&str>, Vec<&str>) = MESH_CA_FILES.iter().partition(|f| dir.join(f).exists());
    if !present.is_empty() && !missing.is_empty() {
        return Err(InstallError::PartialMeshCaDir {
            dir: dir.to_path_buf(),
            present: present.join(", "),
            missing: missing.join(", "),
        });
    }
    let origin = if missing.is_empty() {
        MeshCaOrigin::Reused(dir.to_path_buf())
    } else {
        identity::ensure_dir(dir, TRUST_DOMAIN, now_unix).map_err(|e| dir_err(e.to_string()))?;
        MeshCaOrigin::Written(dir.to_path_buf())
    };
    let material =
        identity::read_material(&identity::CaSource::Dir(dir.to_path_buf())).map_err(|e| dir_err(e.to_string()))?;
    ca::Ca::load(&material, ca::DEFAULT_TTL, now_unix).map_err(|e| dir_err(format!("not a usable mesh CA: {e}")))?;
    Ok((material, origin))
}

/// A CA and a serving certificate for [`INJECTOR_DNS_NAMES`], valid from an hour before
/// `now_unix` (clock skew) for [`TLS_VALIDITY_DAYS`], with the mesh CA `mesh` (from
/// [`mesh_ca`]). The CA's key is dropped: it signs this one certificate and nothing else.
pub fn tls_with_mesh_ca(now_unix: i64, mesh: ca::Material) -> Result<Tls, InstallError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    use x509_parser::time::ASN1Time;
    let err = |e: rcgen::Error| InstallError::Generate(e.to_string());
    let at = |secs: i64| {
        ASN1Time::from_timestamp(secs).map(|t| t.to_datetime()).map_err(|e| InstallError::Generate(e.to_string()))
    };
    let (not_before, not_after) = (at(now_unix - 3600)?, at(now_unix + TLS_VALIDITY_DAYS * 86_400)?);
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name.push(DnType::CommonName, "neutrino-injector CA");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    (ca.not_before, ca.not_after) = (not_before, not_after);
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().map_err(err)?;
    let names: Vec<String> = INJECTOR_DNS_NAMES.iter().map(|s| s.to_string()).collect();
    let mut leaf = CertificateParams::new(names).map_err(err)?;
    leaf.distinguished_name.push(DnType::CommonName, INJECTOR_DNS_NAMES[0]);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    (leaf.not_before, leaf.not_after) = (not_before, not_after);
    let cert = leaf.signed_by(&key, &issuer).map_err(err)?;
    Ok(Tls {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        mesh_anchors_pem: mesh.anchors_pem,
        mesh_issuer_pem: mesh.issuer_pem,
        mesh_issuer_key_pem: mesh.issuer_key_pem,
    })
}
