//! A loopback port for a process Watt starts (`wattctl up`'s controller and agents, the tests'
//! etcd members), chosen so that it is still free when that process binds it.
//!
//! Binding port 0 and letting go of it hands back a port from the kernel's ephemeral range, and
//! two such picks may return the same port, or an outgoing connection may take it before the
//! child binds it: an etcd member then fails with "address already in use". So the port is
//! chosen below that range, where no outgoing connection lands, and never handed out twice by
//! one process.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

use rand::Rng;

/// Where the pick starts: below it lie well-known and registered services' ports.
const LOWEST: u16 = 20_000;
/// How many random ports are tried before falling back to the kernel's choice.
const TRIES: usize = 200;

/// Every port this process has handed out.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port free now, never handed out before by this process, below the ephemeral range
/// where it can be (else the kernel's choice, still never handed out twice).
pub fn free_loopback_port() -> std::io::Result<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    let below = ephemeral_low().unwrap_or(0);
    let mut rng = rand::rng();
    if below > LOWEST + 1000 {
        for _ in 0..TRIES {
            let port = rng.random_range(LOWEST..below);
            if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.insert(port);
                return Ok(port);
            }
        }
    }
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
}

/// The low end of the kernel's ephemeral port range, where Linux says.
fn ephemeral_low() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..500).map(|_| free_loopback_port().unwrap()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        if let Some(low) = ephemeral_low().filter(|low| *low > LOWEST + 1000) {
            assert!(ports.iter().all(|p| (LOWEST..low).contains(p)), "a port in the ephemeral range: {ports:?}");
        }
        let port = free_loopback_port().unwrap();
        TcpListener::bind(("127.0.0.1", port)).expect("the port handed out is free");
    }
}
