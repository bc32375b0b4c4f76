//! Redis addresses and errors as an operator reads them: `host:port` without the
//! password, and an error's text said once.

/// The address part of a Redis URL: `redis://:secret@10.0.0.5:6379/2` → `10.0.0.5:6379`.
pub(crate) fn addr(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    if rest.starts_with('/') {
        // unix socket path
        return rest.split('?').next().unwrap_or(rest).to_owned();
    }
    rest[..end].to_owned()
}

/// Whether a URL carries a password (`scheme://[user]:password@host...`).
pub(crate) fn has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    authority.rsplit_once('@').is_some_and(|(userinfo, _)| {
        userinfo
            .split_once(':')
            .is_some_and(|(_, pw)| !pw.is_empty())
    })
}

/// A URL with its password (and user) replaced by `***`, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let after = rest.rsplit_once('@').map_or(rest, |(_, a)| a);
            format!("{scheme}://***@{after}")
        }
        (None, Some(at)) => format!("***@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Opens a client for `url`. With `ca_file` (PEM), a `rediss://` server's certificate is
/// checked against that CA instead of the system's trust store. Errors name the file.
pub(crate) fn open(url: &str, ca_file: Option<&std::path::Path>) -> Result<redis::Client, String> {
    let Some(ca) = ca_file else {
        return redis::Client::open(url).map_err(|e| describe(&e));
    };
    if !url.starts_with("rediss://") {
        return Err(format!(
            "a CA file ({}) is given but the URL is not rediss://",
            ca.display()
        ));
    }
    let pem = std::fs::read(ca).map_err(|e| format!("CA file {}: {e}", ca.display()))?;
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
    .map_err(|e| format!("CA file {}: {}", ca.display(), describe(&e)))
}

/// The error's text, without the repetition some I/O errors carry
/// (`Connection refused (os error 111): Connection refused (os error 111)`).
/// A server certificate that the system's trust store does not vouch for gets a hint at
/// the setting that names its CA.
pub(crate) fn describe(e: &redis::RedisError) -> String {
    let text = e.to_string();
    let text = match text.split_once(": ") {
        Some((a, b)) if a == b => a.to_owned(),
        _ => text,
    };
    if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        return format!("{text} (a server certificate from a private CA: name that CA's PEM file in registrar.local_redis_ca_file or manager.central_redis_ca_file)");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_never_carry_a_password() {
        assert_eq!(addr("redis://:secret@10.0.0.5:6379/2"), "10.0.0.5:6379");
        assert_eq!(
            addr("rediss://user:p%40ss@host.example:6380"),
            "host.example:6380"
        );
        assert_eq!(addr("redis://127.0.0.1:6379"), "127.0.0.1:6379");
        assert_eq!(addr("unix:///run/redis.sock"), "/run/redis.sock");
        assert_eq!(redact("redis://:secret@h:1/2"), "redis://***@h:1/2");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert_eq!(redact("secret@h"), "***@h");
    }

    #[test]
    fn an_unknown_issuer_points_at_the_ca_settings() {
        let e = redis::RedisError::from(std::io::Error::other(
            "invalid peer certificate: UnknownIssuer",
        ));
        let text = describe(&e);
        assert!(
            text.contains("UnknownIssuer") && text.contains("central_redis_ca_file"),
            "{text}"
        );
        let e =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!describe(&e).contains("ca_file"));
    }
}
