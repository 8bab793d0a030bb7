//! Header fields that belong to one connection, not to the message (RFC 9110
//! §7.6.1, SPEC §3): the fixed list, and the rules for fields that
//! `Connection` names. The data plane strips them from requests
//! (`cutover-proxy`'s `headers`), the upstream client from responses as it
//! reads them.

use http::header::{HeaderName, CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};

/// `Keep-Alive`
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection`
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// `Proxy-Authorization` (credentials for this hop only)
pub static PROXY_AUTHORIZATION: HeaderName = HeaderName::from_static("proxy-authorization");
/// `HTTP2-Settings` (h2c upgrade)
pub static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// The fixed hop-by-hop fields; `Connection` first, `Trailer` at [`TRAILER_INDEX`].
pub static FIELDS: [&HeaderName; 9] = [
    &CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &PROXY_AUTHORIZATION,
    &HTTP2_SETTINGS,
    &TE,
    &TRAILER,
    &TRANSFER_ENCODING,
    &UPGRADE,
];

/// Where `Trailer` is in [`FIELDS`]: a response keeps it, since hyper sends
/// HTTP/1.1 trailers only when the response declares them there.
pub const TRAILER_INDEX: usize = 6;
/// Where `Connection` is in [`FIELDS`].
pub const CONNECTION_INDEX: usize = 0;
/// Where `Keep-Alive` is in [`FIELDS`].
pub const KEEP_ALIVE_INDEX: usize = 1;
/// Where `Transfer-Encoding` is in [`FIELDS`].
pub const TRANSFER_ENCODING_INDEX: usize = 7;

/// `name`'s index in [`FIELDS`].
pub fn index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authorization" => 3,
        "http2-settings" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// The index in [`FIELDS`] of a field name as it came on the wire (any case).
pub fn index_of(name: &[u8]) -> Option<usize> {
    // By length first: most names match none, and are turned away by it.
    let (i, lower): (usize, &[u8]) = match name.len() {
        2 => (5, b"te"),
        7 if name[0].eq_ignore_ascii_case(&b't') => (6, b"trailer"),
        7 => (8, b"upgrade"),
        10 if name[0].eq_ignore_ascii_case(&b'c') => (0, b"connection"),
        10 => (1, b"keep-alive"),
        14 => (4, b"http2-settings"),
        16 => (2, b"proxy-connection"),
        17 => (7, b"transfer-encoding"),
        19 => (3, b"proxy-authorization"),
        _ => return None,
    };
    name.eq_ignore_ascii_case(lower).then_some(i)
}

/// The names in one `Connection` value that name a field to remove as well:
/// not `close`, not a fixed hop-by-hop field (those go anyway), and never a
/// field whose removal would change the message's framing or routing (`Host`,
/// `Content-Length`, `X-Request-Id`). Usually none: nothing is allocated.
pub fn named_by_connection(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|n| {
        !n.is_empty()
            && !n.eq_ignore_ascii_case(b"close")
            && !FIELDS.iter().any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(n))
            && !n.eq_ignore_ascii_case(b"host")
            && !n.eq_ignore_ascii_case(b"content-length")
            && !n.eq_ignore_ascii_case(b"x-request-id")
    })
}

/// The `timeout=N` of a `Keep-Alive` value (RFC 2068 §19.7.1.1): how many
/// seconds the server keeps an idle connection open; `None` without one.
pub fn keep_alive_timeout(value: &[u8]) -> Option<std::time::Duration> {
    value.split(|&b| b == b',').find_map(|param| {
        let (name, secs) = param.trim_ascii().split_at_checked(8)?;
        if !name.eq_ignore_ascii_case(b"timeout=") || secs.is_empty() || secs.len() > 9 {
            return None;
        }
        let secs = secs.iter().try_fold(0u64, |n, &b| b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0')))?;
        Some(std::time::Duration::from_secs(secs))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_the_list() {
        for (i, name) in FIELDS.iter().enumerate() {
            assert_eq!(index(name), Some(i));
            assert_eq!(index_of(name.as_str().to_ascii_uppercase().as_bytes()), Some(i));
        }
        assert_eq!(FIELDS[TRAILER_INDEX], &TRAILER);
        assert_eq!(FIELDS[CONNECTION_INDEX], &CONNECTION);
        assert_eq!(FIELDS[KEEP_ALIVE_INDEX], &KEEP_ALIVE);
        assert_eq!(FIELDS[TRANSFER_ENCODING_INDEX], &TRANSFER_ENCODING);
        assert_eq!(index(&HeaderName::from_static("x-kept")), None);
        for other in [&b"Content-Type"[..], b"x-upgrade", b"tE-", b"Tailers", b"keep-alivE2", b""] {
            assert_eq!(index_of(other), None, "{}", other.escape_ascii());
        }
    }

    #[test]
    fn keep_alive_timeout_is_read_from_its_parameter() {
        let secs = |v: &[u8]| keep_alive_timeout(v).map(|d| d.as_secs());
        assert_eq!(secs(b"timeout=5"), Some(5));
        assert_eq!(secs(b"max=100, Timeout=2"), Some(2));
        assert_eq!(secs(b" timeout=0 ,max=3"), Some(0));
        for bad in
            [&b"timeout="[..], b"timeout=-1", b"timeout=1s", b"timeout = 5", b"max=5", b"", b"timeout=9999999999"]
        {
            assert_eq!(secs(bad), None, "{}", bad.escape_ascii());
        }
    }

    #[test]
    fn connection_names_only_removable_fields() {
        let named: Vec<&[u8]> =
            named_by_connection(b"close, X-Secret , keep-alive,Host,content-length, ,x-request-id,upgrade").collect();
        assert_eq!(named, [&b"X-Secret"[..]]);
    }
}
