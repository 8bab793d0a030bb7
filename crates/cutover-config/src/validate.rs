//! From YAML text to a validated [`Config`], collecting every error.
//!
//! Each top-level section and each site is deserialized on its own, so one bad
//! section does not hide the errors of the others. Relative file paths (state,
//! TLS, maintenance page, token file, CA) are resolved against the directory
//! of the configuration file.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use crate::error::{ConfigError, ConfigErrors};
use crate::file::*;
use crate::model::*;

const TOP_LEVEL_KEYS: &[&str] =
    &["listen", "tls", "admin", "state", "limits", "shutdown_timeout", "trusted_proxies", "sites"];

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = Some(path.display().to_string());
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: file.clone(),
        errors: vec![ConfigError::new("", "", format!("cannot read the configuration file: {e}"))],
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(&text, &base).map_err(|mut e| {
        e.file = file;
        e
    })
}

/// Validates configuration `text`; relative paths are taken from `base_dir`.
pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
    let mut v =
        Validator { errors: Vec::new(), base: base_dir.to_path_buf(), https_listener: true, https_given: false };
    let config = v.config(text);
    match config {
        Some(config) if v.errors.is_empty() => Ok(config),
        _ => Err(ConfigErrors { file: None, errors: v.errors }),
    }
}

/// Checks a `host:port` endpoint address; returns the message on error.
pub fn validate_endpoint(addr: &str) -> Result<(), String> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return if sa.port() == 0 { Err("port \"0\" is not a number from 1 to 65535".into()) } else { Ok(()) };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("expected host:port".into());
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
    // All digits and dots: meant as an IPv4 address, which it must then be.
    if !host.is_empty() && host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match host.parse::<std::net::Ipv4Addr>() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("host {host:?} is not a valid IPv4 address")),
        };
    }
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid_host {
        Ok(())
    } else {
        Err(format!("host {host:?} is not an IP address or DNS name"))
    }
}

/// Checks a site or target name against `[a-z0-9-]+`.
pub fn validate_site_name(name: &str) -> Result<(), String> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        Ok(())
    } else {
        Err("must match [a-z0-9-]+".into())
    }
}

struct Validator {
    errors: Vec<ConfigError>,
    base: PathBuf,
    /// Whether `listen.https` is set (or `listen` could not be read).
    https_listener: bool,
    /// Whether `listen` was read and sets `listen.https` (valid or not).
    https_given: bool,
}

impl Validator {
    fn err(&mut self, path: impl Into<String>, value: impl std::fmt::Display, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, value, message));
    }

    /// Deserializes `value` as `T`, reporting an error at `path` for each bad
    /// key: the key at fault is taken out and the rest read again, so that
    /// every bad key of a section is listed (SPEC §2), and the checks of what
    /// is left still run (the configuration is refused all the same).
    fn section<T: DeserializeOwned>(&mut self, path: &str, mut value: Value) -> Option<T> {
        let mut removed: Option<String> = None;
        for _ in 0..MAX_ERRORS_PER_SECTION {
            let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(t) => return Some(t),
                Err(e) => e,
            };
            let message = e.inner().to_string();
            // A key taken out for being bad is not missing as well.
            if let (Some(key), Some(missing)) = (&removed, missing_field(&message)) {
                if key == missing {
                    return None;
                }
            }
            let inner = e.path().to_string();
            let mut full = join_path(path, if inner == "." { "" } else { &inner });
            // An unknown key is reported at the key itself (serde_path_to_error
            // usually has it in the path already: do not add it twice).
            let mut segments: Vec<String> = map_keys(e.path());
            if let Some(key) = message.strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
                if full != key && !full.ends_with(&format!(".{key}")) {
                    full = join_path(&full, key);
                    segments.push(key.to_string());
                }
                self.err(full, key, "unknown key");
            } else if message.ends_with("expected a duration") {
                self.err(full, "", format!("{message} such as 500ms, 10s or 1m"));
            } else {
                self.err(full, "", message);
            }
            match remove_key(&mut value, &segments) {
                Some(key) => removed = Some(key),
                None => return None,
            }
        }
        None
    }

    fn config(&mut self, text: &str) -> Option<Config> {
        let root: Value = match serde_yaml::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.err("", "", format!("not valid YAML: {e}"));
                return None;
            }
        };
        let mut map = match root {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            other => {
                self.err("", type_name(&other), "the configuration must be a mapping of keys");
                return None;
            }
        };
        for key in map.keys() {
            let name = key.as_str().map_or_else(|| yaml_text(key), str::to_string);
            if !TOP_LEVEL_KEYS.contains(&name.as_str()) {
                self.err(&name, &name, "unknown key");
            }
        }
        let mut take = |k: &str| map.remove(k).unwrap_or(Value::Null);
        let listen = take("listen");
        let tls = take("tls");
        let admin = take("admin");
        let state = take("state");
        let limits = take("limits");
        let shutdown = take("shutdown_timeout");
        let trusted = take("trusted_proxies");
        let sites = take("sites");

        let listen = self.listen(listen);
        // Whether `listen.https` is given, even when `listen` has another
        // error: the missing certificates are reported alongside it.
        let https_given = self.https_given;
        let tls = self.tls(tls, https_given);
        let admin = self.admin(admin);
        let state_path = match self.section::<Option<FileState>>("state", state) {
            Some(s) => self.file_path(s.and_then(|s| s.path).as_deref().unwrap_or("cutover-state.json")),
            None => PathBuf::new(),
        };
        let limits = self.limits(limits);
        let shutdown_timeout = self.duration("shutdown_timeout", shutdown, Duration::from_secs(30));
        let trusted_proxies = self.trusted_proxies(trusted);
        let sites = self.sites(sites);
        // Port 0 (an ephemeral port each) never clashes.
        if let (Some(l), Some(a)) = (&listen, &admin) {
            let clash = |x: SocketAddr, y: Option<SocketAddr>| x.port() != 0 && y == Some(x);
            if clash(l.http, l.https) {
                self.err("listen.https", l.http, "the same address as listen.http");
            }
            if clash(a.listen, Some(l.http)) || clash(a.listen, l.https) {
                self.err("admin.listen", a.listen, "the same address as a proxy listener");
            }
        }
        Some(Config {
            listen: listen?,
            tls,
            admin: admin?,
            state_path,
            limits,
            shutdown_timeout,
            trusted_proxies,
            sites,
        })
    }

    fn file_path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn socket_addr(&mut self, path: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(path, value, "expected an IP address and port, e.g. 127.0.0.1:8080");
                None
            }
        }
    }

    fn listen(&mut self, value: Value) -> Option<Listen> {
        let raw: FileListen = match value {
            Value::Null => {
                self.err("listen.http", "", "missing: the plain HTTP listener address is required");
                return None;
            }
            v => self.section("listen", v)?,
        };
        // A bad `listen.https` is its own error, not also every site's redirect's.
        self.https_listener = raw.https.is_some();
        self.https_given = raw.https.is_some();
        let https = raw.https.as_deref().map(|a| self.socket_addr("listen.https", a));
        let http = match raw.http.as_deref() {
            Some(a) => self.socket_addr("listen.http", a),
            None => {
                self.err("listen.http", "", "missing: the plain HTTP listener address is required");
                None
            }
        };
        Some(Listen { http: http?, https: https.flatten() })
    }

    fn tls(&mut self, value: Value, https: bool) -> Vec<Certificate> {
        let raw: Option<FileTls> = self.section("tls", value).flatten();
        let Some(raw) = raw else {
            if https {
                self.err("tls.certificates", "", "required when listen.https is set");
            }
            return Vec::new();
        };
        if https && raw.certificates.is_empty() {
            self.err("tls.certificates", "[]", "at least one certificate is required when listen.https is set");
        }
        let mut out = Vec::new();
        for (i, c) in raw.certificates.iter().enumerate() {
            let cert = self.file_path(&c.cert);
            let key = self.file_path(&c.key);
            let cert_field = format!("tls.certificates[{i}].cert");
            let key_field = format!("tls.certificates[{i}].key");
            let cert_ok = self.check_pem(&cert_field, &c.cert, &cert, PemKind::Certificate);
            let key_ok = self.check_pem(&key_field, &c.key, &key, PemKind::Key);
            if cert_ok && key_ok {
                match crate::tls::load_pair(&cert, &key) {
                    Ok(_) => {}
                    Err(crate::tls::PairError::Cert(m)) => self.err(cert_field, &c.cert, m),
                    Err(crate::tls::PairError::Key(m)) => self.err(key_field, &c.key, m),
                }
            }
            out.push(Certificate { cert, key });
        }
        out
    }

    /// Checks that `path` holds PEM material of `kind`; `false` (and an error) when not.
    fn check_pem(&mut self, field: &str, shown: &str, path: &Path, kind: PemKind) -> bool {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                self.err(field, shown, format!("cannot read {}: {e}", path.display()));
                return false;
            }
        };
        let ok = match kind {
            PemKind::Certificate => {
                let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
                matches!(certs, Ok(c) if !c.is_empty())
            }
            PemKind::Key => PrivateKeyDer::from_pem_slice(&bytes).is_ok(),
        };
        if !ok {
            let what = match kind {
                PemKind::Certificate => "no PEM certificate could be parsed from",
                PemKind::Key => "no PEM private key (PKCS#8, RSA or EC) could be parsed from",
            };
            self.err(field, shown, format!("{what} {}", path.display()));
        }
        ok
    }

    fn secret(&mut self, field: &str, env: Option<&str>, file: Option<&str>) -> Option<String> {
        match (env, file) {
            (Some(_), Some(_)) => {
                self.err(field, "", "set token_env or token_file, not both");
                None
            }
            (Some(var), None) => match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                _ => {
                    self.err(format!("{field}.token_env"), var, "the environment variable is not set or empty");
                    None
                }
            },
            (None, Some(f)) => match std::fs::read_to_string(self.file_path(f)) {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                Ok(_) => {
                    self.err(format!("{field}.token_file"), f, "the token file is empty");
                    None
                }
                Err(e) => {
                    self.err(format!("{field}.token_file"), f, format!("cannot read the token file: {e}"));
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn admin(&mut self, value: Value) -> Option<Admin> {
        let raw: FileAdmin = self.section::<Option<FileAdmin>>("admin", value)?.unwrap_or_default();
        let listen = self.socket_addr("admin.listen", raw.listen.as_deref().unwrap_or("127.0.0.1:9901"));
        let token = self.secret("admin", raw.token_env.as_deref(), raw.token_file.as_deref());
        let listen = listen?;
        if token.is_none() && !listen.ip().is_loopback() {
            self.err("admin.listen", listen, "an admin listener off loopback needs a token (token_env or token_file)");
        }
        Some(Admin { listen, token })
    }

    fn limits(&mut self, value: Value) -> Limits {
        let d = Limits::default();
        let Some(raw) = self.section::<Option<FileLimits>>("limits", value).flatten() else {
            return d;
        };
        let limits = Limits {
            header_read_timeout: raw.header_read_timeout.unwrap_or(d.header_read_timeout),
            idle_timeout: raw.idle_timeout.unwrap_or(d.idle_timeout),
            max_header_bytes: raw.max_header_bytes.unwrap_or(d.max_header_bytes),
            max_connections: raw.max_connections.unwrap_or(d.max_connections),
            upstream_connect_timeout: raw.upstream_connect_timeout.unwrap_or(d.upstream_connect_timeout),
            upstream_response_timeout: raw.upstream_response_timeout.unwrap_or(d.upstream_response_timeout),
        };
        for (name, dur) in [
            ("header_read_timeout", limits.header_read_timeout),
            ("idle_timeout", limits.idle_timeout),
            ("upstream_connect_timeout", limits.upstream_connect_timeout),
            ("upstream_response_timeout", limits.upstream_response_timeout),
        ] {
            if dur.is_zero() {
                self.err(format!("limits.{name}"), "0s", "must be greater than zero");
            }
        }
        if !(1024..=MAX_HEADER_BYTES).contains(&limits.max_header_bytes) {
            let message = format!("must be from 1024 to {MAX_HEADER_BYTES}");
            self.err("limits.max_header_bytes", limits.max_header_bytes, message);
        }
        if !(1..=MAX_CONNECTIONS).contains(&limits.max_connections) {
            self.err("limits.max_connections", limits.max_connections, format!("must be from 1 to {MAX_CONNECTIONS}"));
        }
        limits
    }

    fn duration(&mut self, path: &str, value: Value, default: Duration) -> Duration {
        match value {
            Value::Null => default,
            Value::String(s) => match humantime::parse_duration(&s) {
                Ok(d) => d,
                Err(e) => {
                    self.err(path, &s, format!("not a duration such as 250ms, 30s or 5m: {e}"));
                    default
                }
            },
            other => {
                self.err(path, yaml_text(&other), "expected a duration string such as 250ms, 30s or 5m");
                default
            }
        }
    }

    fn trusted_proxies(&mut self, value: Value) -> Vec<IpNet> {
        let raw: Vec<String> =
            self.section::<Option<Vec<String>>>("trusted_proxies", value).flatten().unwrap_or_default();
        let mut out = Vec::new();
        for (i, s) in raw.iter().enumerate() {
            let parsed = s.parse::<IpNet>().or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => out.push(net),
                Err(_) => {
                    self.err(format!("trusted_proxies[{i}]"), s, "expected a CIDR such as 10.0.0.0/8 or an IP address")
                }
            }
        }
        out
    }

    fn sites(&mut self, value: Value) -> Vec<Site> {
        let items = match value {
            Value::Sequence(items) if !items.is_empty() => items,
            Value::Null | Value::Sequence(_) => {
                self.err("sites", "", "at least one site is required");
                return Vec::new();
            }
            other => {
                self.err("sites", yaml_text(&other), format!("expected a list of sites, not {}", type_name(&other)));
                return Vec::new();
            }
        };
        let mut sites = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut hosts: HashMap<String, usize> = HashMap::new();
        for (i, item) in items.into_iter().enumerate() {
            let path = format!("sites[{i}]");
            let Some(raw) = self.section::<FileSite>(&path, item) else {
                continue;
            };
            if let Some(first) = names.insert(raw.name.clone(), i) {
                self.err(format!("{path}.name"), &raw.name, format!("duplicate site name (also sites[{first}])"));
            }
            // `site.hosts` drops malformed entries: report at the index as written.
            let raw_hosts = raw.hosts.clone();
            let Some(site) = self.site(&path, raw) else {
                continue;
            };
            let preview_hosts = site.preview.hosts.keys();
            for (j, host) in site.hosts.iter().chain(preview_hosts).enumerate() {
                if let Some(first) = hosts.insert(host.clone(), i) {
                    let field = if j < site.hosts.len() {
                        let k = raw_hosts.iter().position(|h| normalize_host(h).as_ref() == Ok(host)).unwrap_or(j);
                        format!("{path}.hosts[{k}]")
                    } else {
                        format!("{path}.preview.hosts.{host}")
                    };
                    let by = if first == i { "by this site's hosts".to_string() } else { format!("by sites[{first}]") };
                    self.err(field, host, format!("duplicate host (already used {by})"));
                }
            }
            sites.push(site);
        }
        sites
    }

    fn site(&mut self, path: &str, raw: FileSite) -> Option<Site> {
        if let Err(m) = validate_site_name(&raw.name) {
            self.err(format!("{path}.name"), &raw.name, m);
        }
        if raw.hosts.is_empty() {
            self.err(format!("{path}.hosts"), "[]", "at least one host is required");
        }
        let mut hosts = Vec::new();
        for (j, h) in raw.hosts.iter().enumerate() {
            match normalize_host(h) {
                Ok(h) if hosts.contains(&h) => self.err(format!("{path}.hosts[{j}]"), &h, "duplicate host"),
                Ok(h) => hosts.push(h),
                Err(m) => self.err(format!("{path}.hosts[{j}]"), h, m),
            }
        }
        if raw.targets.is_empty() {
            self.err(format!("{path}.targets"), "{}", "at least one target is required");
        }
        let mut targets = BTreeMap::new();
        for (name, t) in raw.targets {
            let tpath = format!("{path}.targets.{name}");
            if let Err(m) = validate_site_name(&name) {
                self.err(&tpath, &name, format!("target name {m}"));
            }
            targets.insert(name, self.target(&tpath, t));
        }
        if !targets.contains_key(&raw.live) {
            let known: Vec<_> = targets.keys().map(String::as_str).collect();
            self.err(format!("{path}.live"), &raw.live, format!("no such target (defined: {})", known.join(", ")));
        }
        let health = self.health(&format!("{path}.health"), raw.health);
        let switch = self.switch(&format!("{path}.switch"), raw.switch);
        let read_only = self.read_only(&format!("{path}.read_only"), raw.read_only);
        let maintenance_page = raw.maintenance.and_then(|m| m.page).map(|p| {
            let full = self.file_path(&p);
            if let Err(e) = std::fs::metadata(&full) {
                self.err(format!("{path}.maintenance.page"), &p, format!("cannot read {}: {e}", full.display()));
            }
            full
        });
        let pause = self.pause(&format!("{path}.pause"), raw.pause);
        let preview = self.preview(&format!("{path}.preview"), raw.preview, &targets);
        let canary_cookie = raw.canary.and_then(|c| c.cookie).unwrap_or_else(|| "cutover-bucket".into());
        if !is_token(&canary_cookie) {
            self.err(format!("{path}.canary.cookie"), &canary_cookie, "not a valid cookie name");
        }
        let redirect_https = raw.redirect_https.unwrap_or(false);
        if redirect_https && !self.https_listener {
            self.err(format!("{path}.redirect_https"), true, "there is no listen.https to redirect to");
        }
        Some(Site {
            name: raw.name,
            hosts,
            live: raw.live,
            targets,
            health,
            switch,
            read_only,
            maintenance_page,
            pause,
            redirect_https,
            preview,
            canary_cookie,
        })
    }

    fn target(&mut self, path: &str, raw: FileTarget) -> Target {
        if raw.endpoints.is_empty() {
            self.err(format!("{path}.endpoints"), "[]", "at least one endpoint is required");
        }
        for (k, e) in raw.endpoints.iter().enumerate() {
            if let Err(m) = validate_endpoint(e) {
                self.err(format!("{path}.endpoints[{k}]"), e, m);
            } else if let Some(first) = raw.endpoints[..k].iter().position(|other| other == e) {
                self.err(format!("{path}.endpoints[{k}]"), e, format!("listed twice (also endpoints[{first}])"));
            }
        }
        let protocol = match raw.protocol.as_deref() {
            None | Some("http1") | Some("http/1.1") => Protocol::Http1,
            Some("h2") | Some("http2") => Protocol::H2,
            Some(other) => {
                self.err(format!("{path}.protocol"), other, "expected http1 or h2");
                Protocol::Http1
            }
        };
        let ca = raw.ca.as_deref().map(|c| {
            let full = self.file_path(c);
            self.check_pem(&format!("{path}.ca"), c, &full, PemKind::Certificate);
            full
        });
        if (ca.is_some() || raw.server_name.is_some()) && raw.tls != Some(true) {
            self.err(format!("{path}.tls"), raw.tls.unwrap_or(false), "ca and server_name need tls: true");
        }
        if let Some(name) = &raw.server_name {
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                self.err(format!("{path}.server_name"), name, "expected a DNS name or an IP address");
            }
        }
        if raw.version.as_deref().is_some_and(|v| v.trim().is_empty()) {
            self.err(format!("{path}.version"), "", "must not be empty (leave it out for none)");
        }
        Target {
            endpoints: raw.endpoints,
            version: raw.version,
            read_only: raw.read_only.unwrap_or(false),
            protocol,
            tls: raw.tls.unwrap_or(false),
            ca,
            server_name: raw.server_name,
        }
    }

    fn status_ranges(&mut self, path: &str, value: Option<Value>) -> StatusRanges {
        match value {
            None => StatusRanges::default(),
            Some(v) => match parse_status_ranges(&v) {
                Some(r) => r,
                None => {
                    self.err(
                        path,
                        yaml_text(&v),
                        "expected a status code or range such as 200, 200-399 or \"200,204\"",
                    );
                    StatusRanges::default()
                }
            },
        }
    }

    fn health(&mut self, path: &str, raw: Option<FileHealth>) -> Health {
        let d = Health::default();
        let Some(raw) = raw else { return d };
        let h = Health {
            path: raw.path,
            interval: raw.interval.unwrap_or(d.interval),
            timeout: raw.timeout.unwrap_or(d.timeout),
            healthy_threshold: raw.healthy_threshold.unwrap_or(d.healthy_threshold),
            unhealthy_threshold: raw.unhealthy_threshold.unwrap_or(d.unhealthy_threshold),
            expect_status: self.status_ranges(&format!("{path}.expect_status"), raw.expect_status),
            version_header: raw.version_header.map(|s| s.to_ascii_lowercase()),
            host: raw.host,
        };
        if let Some(p) = &h.path {
            self.request_path(&format!("{path}.path"), p);
        }
        if let Some(host) = &h.host {
            if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
                self.err(format!("{path}.host"), host, "not a valid Host header value");
            }
        }
        for (name, v) in [("healthy_threshold", h.healthy_threshold), ("unhealthy_threshold", h.unhealthy_threshold)] {
            if v == 0 {
                self.err(format!("{path}.{name}"), v, "must be at least 1");
            }
        }
        for (name, v) in [("interval", h.interval), ("timeout", h.timeout)] {
            if v.is_zero() {
                self.err(format!("{path}.{name}"), "0s", "must be greater than zero");
            }
        }
        if let Some(vh) = &h.version_header {
            if !is_token(vh) {
                self.err(format!("{path}.version_header"), vh, "not a valid header name");
            }
        }
        h
    }

    /// A path (and query) cutover sends itself: starts with `/`, no spaces or control bytes.
    fn request_path(&mut self, path: &str, value: &str) {
        if !value.starts_with('/') {
            self.err(path, value, "must start with /");
        } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
            self.err(path, value, "must not hold spaces, control or non-ASCII characters (percent-encode them)");
        }
    }

    fn switch(&mut self, path: &str, raw: Option<FileSwitch>) -> Switch {
        let d = Switch::default();
        let Some(raw) = raw else { return d };
        let require = match raw.require.as_deref() {
            None | Some("all_healthy") => Require::AllHealthy,
            Some("any_healthy") => Require::AnyHealthy,
            Some(other) => {
                self.err(format!("{path}.require"), other, "expected all_healthy or any_healthy");
                Require::AllHealthy
            }
        };
        let mut smoke = Vec::new();
        for (i, s) in raw.smoke.into_iter().enumerate() {
            self.request_path(&format!("{path}.smoke[{i}].path"), &s.path);
            let expect_status = self.status_ranges(&format!("{path}.smoke[{i}].expect_status"), s.expect_status);
            smoke.push(Smoke { path: s.path, expect_status, expect_body_contains: s.expect_body_contains });
        }
        let watch = raw.watch.map(|w| {
            let watch = Watch {
                duration: w.duration,
                max_error_rate: w.max_error_rate.unwrap_or(0.05),
                min_requests: w.min_requests.unwrap_or(20),
            };
            if watch.duration.is_zero() {
                self.err(format!("{path}.watch.duration"), "0s", "must be greater than zero");
            }
            if !(watch.max_error_rate > 0.0 && watch.max_error_rate <= 1.0) {
                self.err(format!("{path}.watch.max_error_rate"), watch.max_error_rate, "must be above 0 and at most 1");
            }
            if watch.min_requests == 0 {
                self.err(format!("{path}.watch.min_requests"), 0, "must be at least 1");
            }
            watch
        });
        Switch {
            drain_timeout: raw.drain_timeout.unwrap_or(d.drain_timeout),
            close_spread: raw.close_spread.unwrap_or(d.close_spread),
            require,
            smoke,
            watch,
        }
    }

    fn read_only(&mut self, path: &str, raw: Option<FileReadOnly>) -> ReadOnly {
        let d = ReadOnly::default();
        let Some(raw) = raw else { return d };
        for (i, p) in raw.allow_paths.iter().enumerate() {
            if !p.starts_with('/') {
                self.err(format!("{path}.allow_paths[{i}]"), p, "must start with /");
            }
        }
        ReadOnly { retry_after: raw.retry_after.unwrap_or(d.retry_after), allow_paths: raw.allow_paths }
    }

    fn pause(&mut self, path: &str, raw: Option<FilePause>) -> Pause {
        let d = Pause::default();
        let Some(raw) = raw else { return d };
        let p = Pause {
            max_held: raw.max_held.unwrap_or(d.max_held),
            resume_spread: raw.resume_spread.unwrap_or(d.resume_spread),
        };
        if p.max_held == 0 {
            self.err(format!("{path}.max_held"), 0, "must be at least 1");
        }
        p
    }

    fn preview(&mut self, path: &str, raw: Option<FilePreview>, targets: &BTreeMap<String, Target>) -> Preview {
        let d = Preview::default();
        let Some(raw) = raw else { return d };
        let header = raw.header.map(|h| h.to_ascii_lowercase()).unwrap_or(d.header);
        if !is_token(&header) {
            self.err(format!("{path}.header"), &header, "not a valid header name");
        }
        let token = match raw.token_env.as_deref() {
            Some(var) => self.secret(path, Some(var), None),
            None => None,
        };
        let mut hosts = BTreeMap::new();
        for (host, target) in raw.hosts {
            let field = format!("{path}.hosts.{host}");
            if !targets.contains_key(&target) {
                self.err(&field, &target, "no such target in this site");
            }
            match normalize_host(&host) {
                Ok(h) if h != "*" => {
                    hosts.insert(h, target);
                }
                Ok(_) => self.err(&field, &host, "a preview host cannot be *"),
                Err(m) => self.err(&field, &host, m),
            }
        }
        Preview { enabled: true, header, token, hosts }
    }
}

enum PemKind {
    Certificate,
    Key,
}

/// The largest `limits.max_header_bytes` accepted (1 MiB).
const MAX_HEADER_BYTES: usize = 1 << 20;

/// The largest `limits.max_connections` accepted.
const MAX_CONNECTIONS: usize = 10_000_000;

/// Bad keys reported per section before giving up on it.
const MAX_ERRORS_PER_SECTION: usize = 64;

/// The mapping keys of an error's path, or nothing when it goes through a
/// list (a list element is not taken out: later indices would shift).
fn map_keys(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    let mut keys = Vec::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key } => keys.push(key.clone()),
            _ => return Vec::new(),
        }
    }
    keys
}

/// Takes the key at `keys` out of `value`; returns its name, or `None` when
/// there is no such key.
fn remove_key(value: &mut Value, keys: &[String]) -> Option<String> {
    let (last, parents) = keys.split_last()?;
    let mut node = value;
    for k in parents {
        node = node.as_mapping_mut()?.get_mut(k.as_str())?;
    }
    node.as_mapping_mut()?.remove(last.as_str())?;
    Some(last.clone())
}

/// The field a serde "missing field" message names.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

fn join_path(prefix: &str, rest: &str) -> String {
    match (prefix.is_empty(), rest.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => rest.to_string(),
        (false, false) if rest.starts_with('[') => format!("{prefix}{rest}"),
        (false, false) => format!("{prefix}.{rest}"),
    }
}

/// A configured host as requests are matched against it: lower case, without
/// the trailing dot of a fully qualified name; a DNS name, an IPv4 address or
/// a bracketed IPv6 one, or `*` alone.
fn normalize_host(h: &str) -> Result<String, String> {
    let h = h.trim().to_ascii_lowercase();
    if h == "*" {
        return Ok(h);
    }
    if h.is_empty() {
        return Err("a host name must not be empty".into());
    }
    if h.contains('*') {
        return Err("a wildcard is \"*\" alone (the default site); \"*\" within a name matches nothing".into());
    }
    if !h.is_ascii() {
        return Err("expected an ASCII host name (write an international name in its xn-- form)".into());
    }
    if let Some(inner) = h.strip_prefix('[') {
        return match inner.strip_suffix(']').map(str::parse::<std::net::Ipv6Addr>) {
            Some(Ok(_)) => Ok(h),
            _ => Err("expected an IPv6 address in brackets, such as [::1]".into()),
        };
    }
    let name = h.strip_suffix('.').unwrap_or(&h);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(
            "expected a host name without port or scheme (letters, digits, - and _ in dot-separated labels), or *"
                .into(),
        );
    }
    Ok(name.to_string())
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_status_ranges(v: &Value) -> Option<StatusRanges> {
    let mut ranges = Vec::new();
    let mut push = |s: &str| -> Option<()> {
        for part in s.split(',').map(str::trim) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let (lo, hi) = (lo.trim().parse::<u16>().ok()?, hi.trim().parse::<u16>().ok()?);
            if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
                return None;
            }
            ranges.push(lo..=hi);
        }
        Some(())
    };
    match v {
        Value::Number(n) => push(&n.to_string())?,
        Value::String(s) => push(s)?,
        Value::Sequence(items) => {
            for item in items {
                match item {
                    Value::Number(n) => push(&n.to_string())?,
                    Value::String(s) => push(s)?,
                    _ => return None,
                }
            }
        }
        _ => return None,
    }
    (!ranges.is_empty()).then_some(StatusRanges(ranges))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn yaml_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).map(|s| s.trim().to_string()).unwrap_or_default(),
    }
}
