//! Header rules of SPEC §3: hop-by-hop removal, forwarded headers, request id.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, BytesMut};
use cutover_core::hop_by_hop;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRAILER, TRANSFER_ENCODING};
use http::Version;

/// `X-Forwarded-For`
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Request-Id`
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Other fields that name the client or how it came, which upstreams read as
/// such (`Forwarded`, RFC 7239; nginx's `X-Real-IP`; `X-Forwarded-Port`):
/// cutover does not set them, and drops them from peers it does not trust.
pub static CLIENT_IDENTITY: [HeaderName; 3] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-port"),
];

/// Removes hop-by-hop headers, including every field named in `Connection`.
///
/// One pass over the names finds which are present (usually none, or just
/// `Connection`), which is cheaper than a hash probe per hop-by-hop name.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let mut scan = Scan::default();
    headers.keys().for_each(|k| scan.note(k));
    scan.remove_hop_by_hop(headers);
}

/// What one pass over a request's field names found: the hop-by-hop fields,
/// whether a name has an `_`, and which of the fields cutover sets came with
/// the request. The rules then touch the map only for what is there.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scan {
    /// Bit `i`: [`hop_by_hop::FIELDS`]`[i]` is present.
    hop_by_hop: u16,
    /// Some name has an `_` ([`drop_underscore_names`]).
    pub underscore: bool,
    /// The fields cutover sets that came with the request.
    pub present: Present,
}

impl Scan {
    /// Takes note of one field name.
    pub fn note(&mut self, name: &HeaderName) {
        if let Some(i) = hop_by_hop::index(name) {
            self.hop_by_hop |= 1 << i;
        }
        self.underscore |= name.as_str().contains('_');
        self.present.note(name);
    }

    /// Whether a `Trailer` field came.
    pub fn declares_trailers(&self) -> bool {
        self.hop_by_hop & 1 << hop_by_hop::TRAILER_INDEX != 0
    }

    /// Removes the hop-by-hop fields found, and every field `Connection`
    /// names; `true` when it named any (what was noted may be gone then).
    pub fn remove_hop_by_hop(&self, headers: &mut HeaderMap) -> bool {
        let present = self.hop_by_hop;
        if present == 0 {
            return false;
        }
        let mut named = Vec::new();
        if present & 1 << hop_by_hop::CONNECTION_INDEX != 0 {
            named.extend(
                headers
                    .get_all(CONNECTION)
                    .iter()
                    .flat_map(|v| hop_by_hop::named_by_connection(v.as_bytes()))
                    .filter_map(|n| HeaderName::from_bytes(n).ok()),
            );
            for name in &named {
                headers.remove(name);
            }
        }
        for (i, name) in hop_by_hop::FIELDS.iter().enumerate() {
            if present & 1 << i != 0 {
                headers.remove(*name);
            }
        }
        !named.is_empty()
    }
}

/// The same for a response, but `Trailer` is kept on a body that can end
/// with trailers (chunked, or HTTP/2 without a length): hyper sends HTTP/1.1
/// trailers only when the response declares them there.
pub fn remove_hop_by_hop_response(headers: &mut HeaderMap, version: Version) {
    let declared: Vec<HeaderValue> = match trailers_fit(headers, version) {
        true => headers.get_all(TRAILER).iter().cloned().collect(),
        false => Vec::new(),
    };
    remove_hop_by_hop(headers);
    for v in declared {
        headers.append(TRAILER, v);
    }
}

/// Whether a message with this head can end with trailers, so that its
/// `Trailer` field (hop-by-hop, but declaring them) stays: a chunked body,
/// or an HTTP/2 one without a length.
pub fn trailers_fit(headers: &HeaderMap, version: Version) -> bool {
    headers.contains_key(TRANSFER_ENCODING) || (version == Version::HTTP_2 && !headers.contains_key(CONTENT_LENGTH))
}

/// Drops header fields whose names contain `_`: upstreams that treat `_` as
/// `-` could otherwise be fed a value that bypasses a dash-named check.
pub fn drop_underscore_names(headers: &mut HeaderMap) {
    if headers.keys().any(|k| k.as_str().contains('_')) {
        let names: Vec<HeaderName> = headers.keys().filter(|k| k.as_str().contains('_')).cloned().collect();
        for name in names {
            tracing::debug!(header = %name.as_str().escape_debug(), "dropped a header name with an underscore");
            headers.remove(name);
        }
    }
}

/// Which of the fields cutover sets came with the request, from one pass
/// over its names ([`Present::note`]): an absent one costs no lookup.
#[derive(Debug, Default, Clone, Copy)]
pub struct Present {
    xff: bool,
    proto: bool,
    host: bool,
    request_id: bool,
    /// One of [`CLIENT_IDENTITY`].
    identity: bool,
}

impl Present {
    /// What `headers` has.
    pub fn of(headers: &HeaderMap) -> Self {
        let mut present = Present::default();
        headers.keys().for_each(|k| present.note(k));
        present
    }

    /// Takes note of one field name.
    pub fn note(&mut self, name: &HeaderName) {
        self.xff |= *name == X_FORWARDED_FOR;
        self.proto |= *name == X_FORWARDED_PROTO;
        self.host |= *name == X_FORWARDED_HOST;
        self.request_id |= *name == X_REQUEST_ID;
        self.identity |= CLIENT_IDENTITY.iter().any(|n| n == name);
    }
}

/// The fields cutover adds to a request for its upstream (`X-Forwarded-*`,
/// `X-Request-Id`). hyper's client gets them in the map ([`Added::insert_into`]);
/// cutover's own writes them after the map's fields ([`Added::iter`]), so the
/// map is neither probed nor grown for them.
#[derive(Debug, Default)]
pub struct Added {
    fields: [Option<(&'static HeaderName, HeaderValue)>; 3],
    /// A new `X-Request-Id`.
    id: Option<RequestId>,
}

impl Added {
    fn push(&mut self, name: &'static HeaderName, value: HeaderValue) {
        if let Some(slot) = self.fields.iter_mut().find(|f| f.is_none()) {
            *slot = Some((name, value));
        }
    }

    /// The added fields, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &[u8])> + Clone {
        let fields = self.fields.iter().flatten().map(|(n, v)| (*n, v.as_bytes()));
        fields.chain(self.id.as_ref().map(|id| (&X_REQUEST_ID, id.as_bytes())))
    }

    /// Puts the added fields into `headers`, replacing any of the same name.
    pub fn insert_into(self, headers: &mut HeaderMap) {
        for (name, value) in self.fields.into_iter().flatten() {
            headers.insert(name.clone(), value);
        }
        if let Some(id) = self.id {
            headers.insert(X_REQUEST_ID.clone(), id.to_value());
        }
    }
}

/// A request's id: the client's, kept when it is sane, or a new one (made
/// without an allocation: it is made for nearly every request).
#[derive(Debug, Clone)]
pub enum RequestId {
    /// The client's `X-Request-Id`.
    Kept(HeaderValue),
    /// 32 hex digits made by cutover.
    New([u8; 32]),
}

impl RequestId {
    /// The id's bytes (visible ASCII either way).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Kept(v) => v.as_bytes(),
            RequestId::New(b) => b,
        }
    }

    /// The id as text (for the access log).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("-")
    }

    /// The id as a header value.
    pub fn to_value(&self) -> HeaderValue {
        match self {
            RequestId::Kept(v) => v.clone(),
            RequestId::New(b) => HeaderValue::from_bytes(b).unwrap_or_else(|_| HeaderValue::from_static("-")),
        }
    }
}

/// `X-Forwarded-For/-Proto/-Host` for the upstream. Incoming values are kept
/// (and the peer appended to `X-Forwarded-For`) only when the peer is
/// trusted; otherwise they leave `headers` and cutover's go into `added`, and
/// the [`CLIENT_IDENTITY`] fields leave too. `peer` is the address formatted
/// by [`peer_value`].
pub fn add_forwarded(
    headers: &mut HeaderMap,
    incoming: Present,
    peer: &HeaderValue,
    trusted: bool,
    proto: &'static str,
    host: Option<&HeaderValue>,
    added: &mut Added,
) {
    let xff = match (trusted, incoming.xff) {
        (true, true) => {
            let mut buf = BytesMut::new();
            for v in headers.get_all(&X_FORWARDED_FOR) {
                buf.put_slice(v.as_bytes());
                buf.put_slice(b", ");
            }
            buf.put_slice(peer.as_bytes());
            HeaderValue::from_maybe_shared(buf.freeze()).ok()
        }
        _ => Some(peer.clone()),
    };
    if incoming.xff {
        headers.remove(&X_FORWARDED_FOR);
    }
    if incoming.identity && !trusted {
        for name in &CLIENT_IDENTITY {
            headers.remove(name);
        }
    }
    if let Some(xff) = xff {
        added.push(&X_FORWARDED_FOR, xff);
    }
    if !(trusted && incoming.proto) {
        if incoming.proto {
            headers.remove(&X_FORWARDED_PROTO);
        }
        added.push(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(trusted && incoming.host) {
        if incoming.host {
            headers.remove(&X_FORWARDED_HOST);
        }
        if let Some(h) = host {
            added.push(&X_FORWARDED_HOST, h.clone());
        }
    }
}

/// [`add_forwarded`] straight into the map.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted: bool,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    let mut added = Added::default();
    add_forwarded(headers, Present::of(headers), &peer_value(peer), trusted, proto, host, &mut added);
    added.insert_into(headers);
}

/// The peer address as a header value (made once per client connection).
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    let mut buf = [0u8; 45];
    HeaderValue::from_str(format_ip(peer, &mut buf)).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

fn format_ip(ip: IpAddr, buf: &mut [u8; 45]) -> &str {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{ip}");
    let len = cursor.position() as usize;
    std::str::from_utf8(&buf[..len]).unwrap_or("0.0.0.0")
}

/// Keeps a well-formed incoming `X-Request-Id`, or removes it and adds a new
/// one to `added`; returns the request's id.
pub fn add_request_id(headers: &mut HeaderMap, incoming: Present, added: &mut Added) -> RequestId {
    if incoming.request_id {
        let mut ids = headers.get_all(&X_REQUEST_ID).iter();
        // One sane id is kept; none, or more than one, is replaced.
        if let (Some(v), None) = (ids.next(), ids.next()) {
            let b = v.as_bytes();
            if !b.is_empty() && b.len() <= 200 && b.iter().all(|c| c.is_ascii_graphic()) {
                return RequestId::Kept(v.clone());
            }
        }
        headers.remove(&X_REQUEST_ID);
    }
    let id = new_request_id();
    added.id = Some(id.clone());
    id
}

/// [`add_request_id`] straight into the map.
pub fn ensure_request_id(headers: &mut HeaderMap) -> RequestId {
    let mut added = Added::default();
    let id = add_request_id(headers, Present::of(headers), &mut added);
    added.insert_into(headers);
    id
}

/// A new 32-hex-digit request id, unique within the process and unlikely across processes.
pub fn new_request_id() -> RequestId {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        splitmix(t ^ u64::from(std::process::id()).rotate_left(32))
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let hi = splitmix(seed ^ n);
    let lo = splitmix(hi ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut out = [0u8; 32];
    let bytes = (u128::from(hi) << 64 | u128::from(lo)).to_be_bytes();
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    RequestId::New(out)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut h = map(&[
            ("connection", "close, x-secret, Content-Length"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("content-length", "3"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length", "x-kept"]);
    }

    #[test]
    fn each_hop_by_hop_field_alone_is_removed() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "http2-settings",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            let mut h = map(&[(name, "x"), ("x-kept", "yes")]);
            remove_hop_by_hop(&mut h);
            let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["x-kept"], "{name} was not removed");
        }
    }

    #[test]
    fn untrusted_forwarded_headers_are_replaced() {
        let mut h =
            map(&[("x-forwarded-for", "6.6.6.6"), ("x-forwarded-proto", "https"), ("x-forwarded-host", "evil")]);
        let host = HeaderValue::from_static("shop.example.com");
        set_forwarded(&mut h, "127.0.0.1".parse().unwrap(), false, "http", Some(&host));
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example.com");
    }

    #[test]
    fn trusted_forwarded_for_is_appended_to() {
        let mut h =
            map(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "5.6.7.8"), ("x-forwarded-proto", "https")]);
        set_forwarded(&mut h, "::1".parse().unwrap(), true, "http", None);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_generated_otherwise() {
        let mut h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(ensure_request_id(&mut h).as_str(), "abc-123");
        let mut h = map(&[("x-request-id", "has space")]);
        let id = ensure_request_id(&mut h);
        assert_eq!(id.as_str().len(), 32);
        assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{}", id.as_str());
        assert_eq!(h["x-request-id"], id.as_str());
        assert_ne!(new_request_id().as_str(), new_request_id().as_str());
    }
}
