//! The connection and session state machines of RFC 7143 §8.1 and §8.3,
//! one enum each, with one function that changes them.
//!
//! ```text
//! Connection (§8.1.3, target column; the initiator's S2 XPT_WAIT replaces S3):
//!
//!   S1 FREE ──T3──► S3 XPT_UP ──T4──► S4 IN_LOGIN ──T5──► S5 LOGGED_IN
//!     ▲  ▲             │T6              │T7                │ │ │ │
//!     │  └─────────────┴────────────────┘                  │ │ │ T8 (session closed / reinstated)
//!     │                                                    │ │ └────────────► S1
//!     │  T13 (logout response sent)     T9/T10 (logout)    │ │
//!     ├──────────── S6 IN_LOGOUT ◄──────────────────────────┘ │ T11 (async logout request sent)
//!     │              ▲  │T16 (transport failure)              ▼
//!     │              └──┼──────T12 (logout received)─── S7 LOGOUT_REQUESTED
//!     │                 ▼                                    │T18
//!     └──T17──── S8 CLEANUP_WAIT ◄──────T15 (transport failure in S5)
//! ```
//!
//! ```text
//! Session (§8.3.2, target):
//!   Q1 FREE ──N1──► Q2 ACTIVE ──N2──► Q3 LOGGED_IN ──N3──► Q2 (last connection gone, ERL>0)
//!                    │N9 (login failed)  │N5 (session closed / reinstated) ──► Q1
//!                    ▼                   ▼N6 (failure at ERL0: cleanup) ──► Q1
//!                   Q1                  Q4 FAILED ─N7─► Q5 IN_CONTINUE ─N8─► Q3
//! ```
//! COMSTAR's IDM named its extended connection states S1–S12; the extra ones
//! (init error, error, complete, final) are internal bookkeeping that the
//! `Cleanup` path here covers.

use thiserror::Error;

/// Connection states (RFC 7143 §8.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnState {
    /// S1: no transport connection.
    Free,
    /// S2 (initiator): transport connect issued, waiting.
    XptWait,
    /// S3 (target): transport up, waiting for the first Login Request.
    XptUp,
    /// S4: login in progress.
    InLogin,
    /// S5: full feature phase.
    LoggedIn,
    /// S6: logout in progress.
    InLogout,
    /// S7 (target): an Async Message asked the initiator to log out.
    LogoutRequested,
    /// S8: transport failed; tasks are being cleaned up.
    CleanupWait,
}

impl ConnState {
    /// The RFC's short name (S1..S8).
    pub fn rfc_name(self) -> &'static str {
        match self {
            ConnState::Free => "S1 FREE",
            ConnState::XptWait => "S2 XPT_WAIT",
            ConnState::XptUp => "S3 XPT_UP",
            ConnState::InLogin => "S4 IN_LOGIN",
            ConnState::LoggedIn => "S5 LOGGED_IN",
            ConnState::InLogout => "S6 IN_LOGOUT",
            ConnState::LogoutRequested => "S7 LOGOUT_REQUESTED",
            ConnState::CleanupWait => "S8 CLEANUP_WAIT",
        }
    }
}

/// Events that move a connection (the RFC's T1..T18 triggers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnEvent {
    /// T1 (initiator): transport connect issued.
    ConnectIssued,
    /// T2 (initiator): connect failed or timed out.
    ConnectFailed,
    /// T3: transport connection established.
    TransportUp,
    /// T4 (target): first Login Request received.
    LoginReceived,
    /// T4 (initiator): first Login Request sent.
    LoginSent,
    /// T5: final Login Response with status 0 sent/received.
    LoginSucceeded,
    /// T6/T7: login failed, timed out, or the transport dropped during login.
    LoginFailed,
    /// T8: the session was closed or reinstated from another connection.
    SessionClosed,
    /// T9/T10: a Logout Request was received (target) or sent (initiator).
    LogoutStarted,
    /// T11: the target sent an Async Message requesting logout.
    LogoutRequestedByTarget,
    /// T13: Logout Response (success) sent/received.
    LogoutCompleted,
    /// T15/T16: transport failure or disconnect in full feature phase or logout.
    TransportFailed,
    /// T17/T18: cleanup finished (tasks released, Time2Retain expired).
    CleanupDone,
}

/// A transition the machine does not allow.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("event {event:?} is not valid in state {}", state.rfc_name())]
pub struct IllegalTransition {
    pub state: ConnState,
    pub event: ConnEvent,
}

impl ConnState {
    /// The one place that changes a connection's state.
    pub fn next(self, event: ConnEvent) -> Result<ConnState, IllegalTransition> {
        use ConnEvent as E;
        use ConnState as S;
        let to = match (self, event) {
            (S::Free, E::ConnectIssued) => S::XptWait,
            (S::XptWait, E::ConnectFailed) => S::Free,
            (S::Free, E::TransportUp) => S::XptUp,
            (S::XptWait, E::TransportUp) => S::XptUp,
            (S::XptUp, E::LoginReceived) | (S::XptUp, E::LoginSent) => S::InLogin,
            (S::XptUp, E::LoginFailed) | (S::XptUp, E::TransportFailed) => S::Free,
            (S::InLogin, E::LoginSucceeded) => S::LoggedIn,
            (S::InLogin, E::LoginFailed)
            | (S::InLogin, E::TransportFailed)
            | (S::InLogin, E::SessionClosed) => S::Free,
            (S::LoggedIn, E::SessionClosed) => S::Free,
            (S::LoggedIn, E::LogoutStarted) => S::InLogout,
            (S::LoggedIn, E::LogoutRequestedByTarget) => S::LogoutRequested,
            (S::LoggedIn, E::TransportFailed) => S::CleanupWait,
            (S::LogoutRequested, E::LogoutStarted) => S::InLogout,
            (S::LogoutRequested, E::TransportFailed) => S::CleanupWait,
            (S::LogoutRequested, E::SessionClosed) => S::Free,
            (S::InLogout, E::LogoutCompleted) => S::Free,
            (S::InLogout, E::TransportFailed) => S::CleanupWait,
            (S::InLogout, E::SessionClosed) => S::Free,
            (S::CleanupWait, E::CleanupDone) | (S::CleanupWait, E::SessionClosed) => S::Free,
            (state, event) => return Err(IllegalTransition { state, event }),
        };
        Ok(to)
    }
}

/// Session states (RFC 7143 §8.3.2, target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Q1: no session.
    Free,
    /// Q2: the leading login is in progress.
    Active,
    /// Q3: at least one connection in full feature phase.
    LoggedIn,
    /// Q4: the last connection failed; waiting for Time2Retain (ERL > 0).
    Failed,
    /// Q5: session continuation in progress.
    InContinue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionEvent {
    /// N1: leading login started.
    LeadingLogin,
    /// N2: leading login succeeded.
    LoginSucceeded,
    /// N9: leading login failed.
    LoginFailed,
    /// N3: last connection logged out (session closed).
    Closed,
    /// N5: reinstated by a new leading login with the same ISID.
    Reinstated,
    /// N6: last connection failed at ERL 0: session cleanup.
    ConnectionsFailed,
    /// N4 (ERL > 0): last connection failed, session kept for Time2Retain.
    ConnectionsLost,
    /// N7: continuation login started.
    ContinueLogin,
    /// N8: continuation succeeded.
    ContinueSucceeded,
    /// N10: Time2Retain expired or continuation failed.
    RetainExpired,
}

#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("session event {event:?} is not valid in state {state:?}")]
pub struct IllegalSessionTransition {
    pub state: SessionState,
    pub event: SessionEvent,
}

impl SessionState {
    pub fn next(self, event: SessionEvent) -> Result<SessionState, IllegalSessionTransition> {
        use SessionEvent as E;
        use SessionState as Q;
        let to = match (self, event) {
            (Q::Free, E::LeadingLogin) => Q::Active,
            (Q::Active, E::LoginSucceeded) => Q::LoggedIn,
            (Q::Active, E::LoginFailed) => Q::Free,
            (Q::LoggedIn, E::Closed)
            | (Q::LoggedIn, E::Reinstated)
            | (Q::LoggedIn, E::ConnectionsFailed) => Q::Free,
            (Q::LoggedIn, E::ConnectionsLost) => Q::Failed,
            (Q::Failed, E::ContinueLogin) => Q::InContinue,
            (Q::Failed, E::RetainExpired) | (Q::Failed, E::Reinstated) => Q::Free,
            (Q::InContinue, E::ContinueSucceeded) => Q::LoggedIn,
            (Q::InContinue, E::RetainExpired) => Q::Free,
            (state, event) => return Err(IllegalSessionTransition { state, event }),
        };
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_STATES: [ConnState; 8] = [
        ConnState::Free,
        ConnState::XptWait,
        ConnState::XptUp,
        ConnState::InLogin,
        ConnState::LoggedIn,
        ConnState::InLogout,
        ConnState::LogoutRequested,
        ConnState::CleanupWait,
    ];
    const ALL_EVENTS: [ConnEvent; 13] = [
        ConnEvent::ConnectIssued,
        ConnEvent::ConnectFailed,
        ConnEvent::TransportUp,
        ConnEvent::LoginReceived,
        ConnEvent::LoginSent,
        ConnEvent::LoginSucceeded,
        ConnEvent::LoginFailed,
        ConnEvent::SessionClosed,
        ConnEvent::LogoutStarted,
        ConnEvent::LogoutRequestedByTarget,
        ConnEvent::LogoutCompleted,
        ConnEvent::TransportFailed,
        ConnEvent::CleanupDone,
    ];

    /// The legal transitions, written out from RFC 7143 §8.1.3.
    const LEGAL: &[(ConnState, ConnEvent, ConnState)] = {
        use ConnEvent as E;
        use ConnState as S;
        &[
            (S::Free, E::ConnectIssued, S::XptWait),
            (S::XptWait, E::ConnectFailed, S::Free),
            (S::Free, E::TransportUp, S::XptUp),
            (S::XptWait, E::TransportUp, S::XptUp),
            (S::XptUp, E::LoginReceived, S::InLogin),
            (S::XptUp, E::LoginSent, S::InLogin),
            (S::XptUp, E::LoginFailed, S::Free),
            (S::XptUp, E::TransportFailed, S::Free),
            (S::InLogin, E::LoginSucceeded, S::LoggedIn),
            (S::InLogin, E::LoginFailed, S::Free),
            (S::InLogin, E::TransportFailed, S::Free),
            (S::InLogin, E::SessionClosed, S::Free),
            (S::LoggedIn, E::SessionClosed, S::Free),
            (S::LoggedIn, E::LogoutStarted, S::InLogout),
            (S::LoggedIn, E::LogoutRequestedByTarget, S::LogoutRequested),
            (S::LoggedIn, E::TransportFailed, S::CleanupWait),
            (S::LogoutRequested, E::LogoutStarted, S::InLogout),
            (S::LogoutRequested, E::TransportFailed, S::CleanupWait),
            (S::LogoutRequested, E::SessionClosed, S::Free),
            (S::InLogout, E::LogoutCompleted, S::Free),
            (S::InLogout, E::TransportFailed, S::CleanupWait),
            (S::InLogout, E::SessionClosed, S::Free),
            (S::CleanupWait, E::CleanupDone, S::Free),
            (S::CleanupWait, E::SessionClosed, S::Free),
        ]
    };

    #[test]
    fn every_legal_transition_is_taken_and_every_other_refused() {
        for s in ALL_STATES {
            for e in ALL_EVENTS {
                let want = LEGAL
                    .iter()
                    .find(|(from, ev, _)| *from == s && *ev == e)
                    .map(|(_, _, to)| *to);
                match (s.next(e), want) {
                    (Ok(got), Some(to)) => assert_eq!(got, to, "{s:?} + {e:?}"),
                    (Err(err), None) => assert_eq!((err.state, err.event), (s, e)),
                    (got, want) => panic!("{s:?} + {e:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn full_feature_phase_needs_a_successful_login() {
        let s = ConnState::Free.next(ConnEvent::TransportUp).unwrap();
        assert!(s.next(ConnEvent::LogoutStarted).is_err());
        let s = s.next(ConnEvent::LoginReceived).unwrap();
        let s = s.next(ConnEvent::LoginSucceeded).unwrap();
        assert_eq!(s, ConnState::LoggedIn);
        assert_eq!(s.rfc_name(), "S5 LOGGED_IN");
    }

    #[test]
    fn session_lifecycle_at_erl0() {
        let q = SessionState::Free.next(SessionEvent::LeadingLogin).unwrap();
        let q = q.next(SessionEvent::LoginSucceeded).unwrap();
        assert_eq!(q, SessionState::LoggedIn);
        assert_eq!(
            q.next(SessionEvent::Reinstated).unwrap(),
            SessionState::Free
        );
        assert!(SessionState::Free.next(SessionEvent::Closed).is_err());
        assert!(SessionState::Active
            .next(SessionEvent::ContinueLogin)
            .is_err());
        let failed = q.next(SessionEvent::ConnectionsLost).unwrap();
        let cont = failed.next(SessionEvent::ContinueLogin).unwrap();
        assert_eq!(
            cont.next(SessionEvent::ContinueSucceeded).unwrap(),
            SessionState::LoggedIn
        );
    }
}
