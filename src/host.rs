//! Who a daemon is: its host name and boot id, and the lease-owner prefix they make.
//!
//! The supervisor draws the boot id at start-up and publishes it in the shared slot table, so the
//! probe (which records the daemon in the database) and the children (whose lease owners start
//! with the prefix) name the same boot without talking to each other.

/// This machine's host name ("localhost" when it cannot be read).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The boot id as it appears in lease owners and in the hosts table: 16 hex digits.
pub fn boot_id(boot: u64) -> String {
    format!("{boot:016x}")
}

/// The prefix of every lease owner of one boot of one host: `host/boot/`. Host names hold no
/// '/', so the prefix of one boot never matches another's.
pub fn lease_prefix(host: &str, boot: u64) -> String {
    format!("{host}/{}/", boot_id(boot))
}

/// The boot id inside a lease owner (`host/boot/slot/generation/`), if it is one.
pub fn boot_of_owner(owner: &str) -> Option<&str> {
    let mut parts = owner.split('/');
    let (_host, boot) = (parts.next()?, parts.next()?);
    (boot.len() == 16 && boot.bytes().all(|b| b.is_ascii_hexdigit())).then_some(boot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_name_their_boot() {
        let prefix = lease_prefix("web-1", 0xabc);
        assert_eq!(prefix, "web-1/0000000000000abc/");
        assert_eq!(
            boot_of_owner(&format!("{prefix}3/7/")),
            Some("0000000000000abc")
        );
        assert_eq!(boot_of_owner("forkq shutdown"), None);
        assert_eq!(boot_of_owner("w"), None);
    }
}
