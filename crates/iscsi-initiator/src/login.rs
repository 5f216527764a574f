//! The initiator's login: the sans-IO machine lives in
//! [`idm::initiator_login`] beside the target's; this module re-exports it
//! and adds a properly random ISID.

pub use idm::initiator_login::*;

/// A random ISID of type 0x80 ("random" qualifier, RFC 7143 §11.12.5).
pub fn random_isid() -> [u8; 6] {
    let mut r = [0u8; 5];
    if getrandom::fill(&mut r).is_err() {
        // Uniqueness only matters between our own sessions; the clock will do.
        return clock_isid();
    }
    [0x80, r[0], r[1], r[2], r[3], r[4]]
}

/// [`LoginConfig::new`] with a random ISID.
pub fn login_config(initiator_name: impl Into<String>, target_name: Option<String>) -> LoginConfig {
    let mut cfg = LoginConfig::new(initiator_name, target_name);
    cfg.isid = random_isid();
    cfg
}
