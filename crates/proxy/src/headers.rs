//! Header handling between client and upstream: hop-by-hop removal,
//! `X-Forwarded-*`, `X-Request-Id`.

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};

use turnpike_plugin::Conn;

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the headers that describe one connection rather than the message
/// (RFC 9110 §7.6.1), including any named in `Connection`. With `upgrade`,
/// `Connection: upgrade` and `Upgrade` stay, for WebSocket pass-through.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass over the (few) names is
    // cheaper than a dozen lookups.
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Every `Connection` line counts, and its tokens are read as bytes.
    let named: Vec<HeaderName> = headers
        .get_all(&CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !(upgrade && t.eq_ignore_ascii_case(b"upgrade")))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    // Connection and Upgrade are handled below.
    for name in &HOP_BY_HOP[2..] {
        headers.remove(*name);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
}

/// RFC 9110 §7.6.1's list, plus the non-standard ones still seen.
static HOP_BY_HOP: [&HeaderName; 9] = [
    &CONNECTION,
    &UPGRADE,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &PROXY_AUTHENTICATE,
    &PROXY_AUTHORIZATION,
    &TE,
    &TRAILER,
    &TRANSFER_ENCODING,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// True when the client asks to switch to WebSocket. Other protocols
/// (`h2c` above all) are never tunnelled: a raw connection to a node would
/// bypass routing for every request sent on it.
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or_default()
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// Sets `X-Forwarded-For` (appending the client to any list it sent),
/// `-Proto`, `-Host` and `-Port`.
pub(crate) fn set_forwarded(headers: &mut HeaderMap, conn: &Conn, host: Option<HeaderValue>) {
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.is_empty() => {
            let joined = format!("{prior}, {}", conn.remote_ip.to_str().unwrap_or_default());
            HeaderValue::from_str(&joined).unwrap_or_else(|_| conn.remote_ip.clone())
        }
        _ => conn.remote_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(conn.scheme),
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    headers.insert(X_FORWARDED_PORT.clone(), conn.local_port.clone());
}

/// A new request id: a random UUID (version 4).
pub(crate) fn new_request_id() -> HeaderValue {
    let bits = fastrand::u128(..);
    let bits = (bits & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    let id = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    HeaderValue::from_str(&id).expect("hex digits and dashes are a valid header value")
}

/// A client's request id is kept when it is short and plain.
pub(crate) fn usable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn every_connection_line_counts() {
        let mut h = HeaderMap::new();
        h.append(CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(CONNECTION, HeaderValue::from_static("x-internal-token"));
        h.insert("x-internal-token", HeaderValue::from_static("secret"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn only_websocket_upgrades() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!wants_upgrade(&h));
        h.insert(UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(wants_upgrade(&h));
    }

    #[test]
    fn upgrade_headers_stay_for_websocket() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
    }

    #[test]
    fn request_ids() {
        let id = new_request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(usable_request_id(&id));
        assert!(!usable_request_id(&HeaderValue::from_static("has space")));
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn forwarded_for_appends() {
        let conn = Conn::new(
            "10.0.0.9:5555".parse().unwrap(),
            "127.0.0.1:9080".parse().unwrap(),
            "http",
        );
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        set_forwarded(&mut h, &conn, Some(HeaderValue::from_static("example.com")));
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 10.0.0.9");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com");
        assert_eq!(h[&X_FORWARDED_PORT], "9080");
    }
}
