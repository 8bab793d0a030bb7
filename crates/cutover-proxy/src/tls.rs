//! TLS termination: a rustls server configuration (ring provider, TLS 1.2
//! and 1.3, rustls' safe suites only, ALPN `h2` and `http/1.1`) that can be
//! replaced while serving. Certificates are chosen by SNI; the first is the
//! default. A reload that fails (unreadable file, key not matching its
//! certificate) changes nothing: the old certificates stay in use.

use std::sync::Arc;

use arc_swap::ArcSwap;
use cutover_config::Certificate;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::{DnsName, ServerName};

/// The certificates a TLS listener serves; replaceable at any time.
#[derive(Debug)]
pub struct TlsStore {
    current: ArcSwap<ServerConfig>,
}

impl TlsStore {
    /// Loads `certs` (at least one).
    pub fn new(certs: &[Certificate]) -> Result<Self, String> {
        Ok(Self { current: ArcSwap::from_pointee(server_config(certs)?) })
    }

    /// Loads `certs` and, only if all of them load, serves them to new connections.
    pub fn reload(&self, certs: &[Certificate]) -> Result<(), String> {
        self.current.store(Arc::new(server_config(certs)?));
        Ok(())
    }

    /// The server configuration, with the certificates of this moment.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }
}

fn server_config(certs: &[Certificate]) -> Result<ServerConfig, String> {
    if certs.is_empty() {
        return Err("at least one certificate is required".into());
    }
    let keys = certs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cutover_config::tls::load_pair(&c.cert, &c.key).map_err(|e| format!("tls.certificates[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { keys }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // All suites offered are AEAD with ECDHE; the server's order (strongest first) decides.
    config.ignore_client_order = true;
    Ok(config)
}

/// Picks the first certificate valid for the client's SNI name, else the first one.
#[derive(Debug)]
struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_name = hello.server_name().and_then(|sni| {
            let name = ServerName::DnsName(DnsName::try_from(sni).ok()?.to_owned());
            self.keys.iter().find(|k| {
                k.end_entity_cert()
                    .ok()
                    .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                    .is_some_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
            })
        });
        by_name.or_else(|| self.keys.first()).cloned()
    }
}
