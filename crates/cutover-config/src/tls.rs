//! Loading TLS material: a certificate chain with its private key (checked
//! to match), and CA bundles. Used by `check` and by the TLS listener alike.

use std::path::Path;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Reads a PEM certificate chain and its PEM private key (PKCS#8, RSA or EC)
/// and checks that the key belongs to the first certificate.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain = load_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("no PEM private key (PKCS#8, RSA or EC) in {}: {e}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key_der, &provider)
        .map(Arc::new)
        .map_err(|e| format!("the key {} does not match the certificate {}: {e}", key.display(), cert.display()))
}

/// Reads every PEM certificate in `path` (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("no PEM certificate could be parsed from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no PEM certificate could be parsed from {}", path.display()));
    }
    Ok(certs)
}
