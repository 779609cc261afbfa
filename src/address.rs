//! Addresses as the configuration, the CLI and the client library write them:
//! `HOST:PORT` (a host name or an IP address, IPv6 in brackets) and the
//! initial member list `ID=HOST:PORT,...`. Host names are resolved only when
//! connecting.

/// Checks that `addr` is `HOST:PORT` with a non-empty host and a numeric port.
/// Host names are allowed (resolved when connecting).
pub fn check_host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT, e.g. 127.0.0.1:7380".to_string())?;
    if host.is_empty() || host.contains(char::is_whitespace) || host.contains(',') || host.contains('=') {
        return Err("expected HOST:PORT with a non-empty host name or IP address".into());
    }
    port.parse::<u16>()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    Ok(())
}

/// True for `0.0.0.0:PORT`, `[::]:PORT` and the like: a bind address, never
/// one to dial.
pub fn is_wildcard(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified())
}

/// Parses `ID=HOST:PORT,ID=HOST:PORT,...`.
pub fn parse_initial_cluster(spec: &str) -> Result<Vec<(u64, String)>, String> {
    let mut members: Vec<(u64, String)> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("entry {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| format!("entry {part:?}: the id must be a positive integer"))?;
        check_host_port(addr.trim()).map_err(|e| format!("entry {part:?}: {e}"))?;
        if members.iter().any(|(other, _)| *other == id) {
            return Err(format!("names node {id} twice"));
        }
        members.push((id, addr.trim().to_string()));
    }
    if members.is_empty() {
        return Err("is empty; give ID=HOST:PORT for every initial member".into());
    }
    members.sort();
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_needs_a_host_and_a_port_in_range() {
        for good in ["127.0.0.1:7380", "node1:0", "[::1]:65535", "kvraft1:7379"] {
            assert_eq!(check_host_port(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("localhost", "expected HOST:PORT"),
            (":7380", "non-empty host"),
            ("a b:1", "non-empty host"),
            ("h:70000", "port \"70000\""),
            ("h:x", "port \"x\""),
        ] {
            let err = check_host_port(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn wildcards_are_bind_addresses_only() {
        for wildcard in ["0.0.0.0:7379", "[::]:7380", "[0:0:0:0:0:0:0:0]:1"] {
            assert!(is_wildcard(wildcard), "{wildcard}");
        }
        for dialable in ["127.0.0.1:7379", "[::1]:7380", "node1:7380", "0.0.0.1:1"] {
            assert!(!is_wildcard(dialable), "{dialable}");
        }
    }

    #[test]
    fn the_initial_cluster_is_sorted_and_checked() {
        assert_eq!(
            parse_initial_cluster(" 2=b:2, 1=a:1 ,"),
            Ok(vec![(1, "a:1".to_string()), (2, "b:2".to_string())])
        );
        for (bad, says) in [
            ("", "is empty"),
            ("1=a:1,1=b:2", "twice"),
            ("0=a:1", "positive integer"),
            ("1", "not ID=HOST:PORT"),
            ("1=nohost", "expected HOST:PORT"),
        ] {
            let err = parse_initial_cluster(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
