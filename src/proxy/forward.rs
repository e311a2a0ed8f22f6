//! What the proxy changes in a forwarded message: hop-by-hop headers out, `X-Forwarded-*` in.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1), the nonstandard ones proxies also drop, and `Upgrade`
/// (the proxy does not tunnel protocol upgrades). `Connection` comes first: a bit per name in
/// `strip_hop_by_hop`, its own is bit 0.
pub(super) const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these, or only `Transfer-Encoding`. One pass over the names
    // marks the ones present by comparing them; removing all nine by name would hash each,
    // twice per request.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & 1 << i != 0 {
            headers.remove(name);
        }
    }
}

/// Names checked at compile time (`from_static` at run time would check them per request).
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Appends the client's address to `X-Forwarded-For` and sets `X-Forwarded-Proto` when absent.
pub fn add_forwarded(headers: &mut HeaderMap, remote: SocketAddr) {
    let mut value = Vec::with_capacity(64);
    if let Some(prior) = headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        value.extend_from_slice(prior.as_bytes());
        value.extend_from_slice(b", ");
    }
    push_ip(remote.ip(), &mut value);
    if let Ok(value) = HeaderValue::from_bytes(&value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers
        .entry(X_FORWARDED_PROTO)
        .or_insert(HeaderValue::from_static("http"));
}

/// Appends `ip` as text. IPv4 is written digit by digit: through `Display` (`core::fmt`) it
/// was a visible share of a request's time in the proxy.
pub(super) fn push_ip(ip: IpAddr, out: &mut Vec<u8>) {
    let IpAddr::V4(v4) = ip else {
        out.extend_from_slice(ip.to_string().as_bytes());
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}
