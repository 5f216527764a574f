//! Sequence numbers: RFC 1982 serial arithmetic (RFC 7143 §4.2.2.1) and the
//! session's command window (ExpCmdSN / MaxCmdSN, §4.2.2.1 and §3.2.2.1).

/// `a < b` in 32-bit serial number arithmetic.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

/// `a <= b` in serial arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// Where a received CmdSN falls relative to the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdSnCheck {
    /// CmdSN == ExpCmdSN: deliver now.
    InOrder,
    /// Inside the window but ahead of ExpCmdSN: hold until the gap fills.
    Ahead,
    /// Outside [ExpCmdSN, MaxCmdSN]: silently ignored (RFC 7143 §3.2.2.1).
    OutOfWindow,
}

/// The target's view of the command window of one session, shared by all
/// its connections (MC/S: ordering holds across connections).
#[derive(Debug, Clone)]
pub struct CmdWindow {
    exp_cmd_sn: u32,
    /// How many non-immediate commands the initiator may have queued.
    depth: u32,
}

impl CmdWindow {
    pub fn new(first_cmd_sn: u32, depth: u32) -> Self {
        CmdWindow {
            exp_cmd_sn: first_cmd_sn,
            depth: depth.max(1),
        }
    }

    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    pub fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(self.depth - 1)
    }

    /// Classifies a non-immediate command's CmdSN.
    pub fn check(&self, cmd_sn: u32) -> CmdSnCheck {
        if cmd_sn == self.exp_cmd_sn {
            CmdSnCheck::InOrder
        } else if sn_lt(self.exp_cmd_sn, cmd_sn) && sn_le(cmd_sn, self.max_cmd_sn()) {
            CmdSnCheck::Ahead
        } else {
            CmdSnCheck::OutOfWindow
        }
    }

    /// Consumes ExpCmdSN after an in-order command was delivered.
    pub fn advance(&mut self) {
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_comparison_wraps() {
        assert!(sn_lt(1, 2));
        assert!(!sn_lt(2, 1));
        assert!(sn_lt(0xffff_fff0, 5));
        assert!(!sn_lt(5, 0xffff_fff0));
        assert!(sn_le(7, 7));
        assert!(!sn_lt(7, 7));
    }

    #[test]
    fn window_classifies_and_advances() {
        let mut w = CmdWindow::new(0xffff_fffe, 4);
        assert_eq!(w.max_cmd_sn(), 1);
        assert_eq!(w.check(0xffff_fffe), CmdSnCheck::InOrder);
        assert_eq!(w.check(0), CmdSnCheck::Ahead);
        assert_eq!(w.check(1), CmdSnCheck::Ahead);
        assert_eq!(w.check(2), CmdSnCheck::OutOfWindow);
        assert_eq!(w.check(0xffff_fffd), CmdSnCheck::OutOfWindow);
        w.advance();
        assert_eq!(w.exp_cmd_sn(), 0xffff_ffff);
        assert_eq!(w.check(2), CmdSnCheck::Ahead);
    }
}
