//! Loading TLS material: a certificate chain with its private key (checked
//! to match), and CA bundles. Used by `check` and by the TLS listener alike.

use std::path::Path;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Which file of a certificate/key pair is at fault, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairError {
    /// The certificate file.
    Cert(String),
    /// The key file (unreadable, unsupported, or not the certificate's key).
    Key(String),
}

impl std::fmt::Display for PairError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PairError::Cert(m) | PairError::Key(m) => f.write_str(m),
        }
    }
}

/// Reads a PEM certificate chain and its PEM private key (PKCS#8, RSA or EC)
/// and checks that the key belongs to the first certificate.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, PairError> {
    let chain = load_certs(cert).map_err(PairError::Cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| PairError::Key(format!("no PEM private key (PKCS#8, RSA or EC) in {}: {e}", key.display())))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key_der, &provider).map(Arc::new).map_err(|e| match e {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            PairError::Cert(format!("the certificate in {} is not valid: {e}", cert.display()))
        }
        e => {
            PairError::Key(format!("the key {} does not match the certificate {}: {e}", key.display(), cert.display()))
        }
    })
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
