//! iscsitd — the Ironstar daemon.
fn main() {}
