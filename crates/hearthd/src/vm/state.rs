//! The VM lifecycle state machine: the one place that decides which transitions are legal.
//!
//! ```text
//! creating ──created──▶ stopped ──start──▶ starting ──booted──▶ running ──stop──▶ stopping
//!    │                  ▲  ▲ │                 │                 │  ▲  │              │
//!                          └─delete─▶ deleting    boot_failed/exited ▶ error    exited ▶ stopped
//!                                                          pause │  │ resume
//!                                                                ▼  │
//!                                                               paused ──stop──▶ stopping
//! ```
//! `error` behaves like `stopped` (start or delete it). `paused` behaves like `running` for
//! stop (the VMM is resumed first, so the guest can power off cleanly), delete and restart
//! (which stop it first), an exit of its VMM and a failed recovery. Every transition is
//! recorded as an event by the caller, through `Store::transition`.

use hearth_api::VmState;

/// What happens to a VM: a user's request or something observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// The disk is ready.
    Created,
    /// A user asked to start it.
    Start,
    /// The guest agent answered.
    Booted,
    /// The VMM or the guest did not come up.
    BootFailed,
    /// A user asked to stop it.
    Stop,
    /// A requested stop finished.
    Halted,
    /// The VMM process ended without being asked (guest poweroff, crash, kill).
    Exited,
    /// A user asked to delete it.
    Delete,
    /// The VMM stopped the guest's vCPUs at a user's request.
    Pause,
    /// The VMM let a paused guest's vCPUs run again at a user's request.
    Resume,
    /// hearthd cannot manage the VM any more (its recovery at start failed).
    Failed,
}

impl Input {
    /// The verb users see in "cannot start VM x".
    pub fn verb(self) -> &'static str {
        match self {
            Input::Created => "create",
            Input::Start | Input::Booted | Input::BootFailed => "start",
            Input::Stop | Input::Halted | Input::Exited => "stop",
            Input::Delete => "delete",
            Input::Pause => "pause",
            Input::Resume => "resume",
            Input::Failed => "recover",
        }
    }

    /// The event kind recorded for this transition.
    pub fn event_kind(self) -> &'static str {
        match self {
            Input::Created => "created_disk",
            Input::Start => "start_requested",
            Input::Booted => "running",
            Input::BootFailed => "start_failed",
            Input::Stop => "stop_requested",
            Input::Halted => "stopped",
            Input::Exited => "exited",
            Input::Delete => "delete_requested",
            Input::Pause => "paused",
            Input::Resume => "resumed",
            Input::Failed => "failed",
        }
    }
}

/// A transition the state machine refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("it is {state}{hint}", hint = hint(*state, *input))]
pub struct NotAllowed {
    pub state: VmState,
    pub input: Input,
}

fn hint(state: VmState, input: Input) -> &'static str {
    match (state, input) {
        (VmState::Running, Input::Start | Input::Resume) => " already",
        (VmState::Paused, Input::Pause) => " already",
        (VmState::Stopped | VmState::Error, Input::Stop) => " already",
        (VmState::Running | VmState::Paused, Input::Delete) => "; stop it first",
        (VmState::Paused, Input::Start) => "; resume it",
        (VmState::Stopped | VmState::Error, Input::Pause) => "; only a running VM pauses",
        (VmState::Stopped | VmState::Error, Input::Resume) => "; only a paused VM resumes",
        (VmState::Starting | VmState::Stopping | VmState::Creating | VmState::Deleting, _) => {
            "; wait for that to finish"
        }
        _ => "",
    }
}

/// The state after `input` in `state`, or why not.
pub fn next(state: VmState, input: Input) -> Result<VmState, NotAllowed> {
    use Input as I;
    use VmState as S;
    let to = match (state, input) {
        (S::Creating, I::Created) => S::Stopped,
        (S::Stopped | S::Error, I::Start) => S::Starting,
        (S::Starting, I::Booted) => S::Running,
        (S::Starting, I::BootFailed | I::Exited) => S::Error,
        (S::Running | S::Paused, I::Stop) => S::Stopping,
        (S::Running | S::Paused | S::Stopping, I::Exited) => S::Stopped,
        (S::Stopping, I::Halted) => S::Stopped,
        (S::Running, I::Pause) => S::Paused,
        (S::Paused, I::Resume) => S::Running,
        (S::Stopped | S::Error, I::Delete) => S::Deleting,
        (S::Stopped | S::Starting | S::Running | S::Paused | S::Stopping | S::Error, I::Failed) => {
            S::Error
        }
        (
            S::Creating,
            I::Start
            | I::Booted
            | I::BootFailed
            | I::Stop
            | I::Halted
            | I::Exited
            | I::Delete
            | I::Pause
            | I::Resume
            | I::Failed,
        )
        | (
            S::Stopped,
            I::Created
            | I::Booted
            | I::BootFailed
            | I::Stop
            | I::Halted
            | I::Exited
            | I::Pause
            | I::Resume,
        )
        | (
            S::Starting,
            I::Created | I::Start | I::Stop | I::Halted | I::Delete | I::Pause | I::Resume,
        )
        | (
            S::Running,
            I::Created | I::Start | I::Booted | I::BootFailed | I::Halted | I::Delete | I::Resume,
        )
        | (
            S::Paused,
            I::Created | I::Start | I::Booted | I::BootFailed | I::Halted | I::Delete | I::Pause,
        )
        | (
            S::Stopping,
            I::Created
            | I::Start
            | I::Booted
            | I::BootFailed
            | I::Stop
            | I::Delete
            | I::Pause
            | I::Resume,
        )
        | (
            S::Error,
            I::Created
            | I::Booted
            | I::BootFailed
            | I::Stop
            | I::Halted
            | I::Exited
            | I::Pause
            | I::Resume,
        )
        | (
            S::Deleting,
            I::Created
            | I::Start
            | I::Booted
            | I::BootFailed
            | I::Stop
            | I::Halted
            | I::Exited
            | I::Delete
            | I::Pause
            | I::Resume
            | I::Failed,
        ) => return Err(NotAllowed { state, input }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState as S;

    const INPUTS: [Input; 11] = [
        Input::Created,
        Input::Start,
        Input::Booted,
        Input::BootFailed,
        Input::Stop,
        Input::Halted,
        Input::Exited,
        Input::Delete,
        Input::Pause,
        Input::Resume,
        Input::Failed,
    ];

    #[test]
    fn the_happy_path() {
        let mut s = S::Creating;
        for (input, want) in [
            (Input::Created, S::Stopped),
            (Input::Start, S::Starting),
            (Input::Booted, S::Running),
            (Input::Stop, S::Stopping),
            (Input::Halted, S::Stopped),
            (Input::Delete, S::Deleting),
        ] {
            s = next(s, input).unwrap();
            assert_eq!(s, want);
        }
    }

    #[test]
    fn user_requests_in_wrong_states_are_refused_with_reasons() {
        let e = next(S::Running, Input::Start).unwrap_err();
        assert_eq!(e.to_string(), "it is running already");
        let e = next(S::Stopped, Input::Stop).unwrap_err();
        assert_eq!(e.to_string(), "it is stopped already");
        let e = next(S::Starting, Input::Stop).unwrap_err();
        assert_eq!(e.to_string(), "it is starting; wait for that to finish");
    }

    #[test]
    fn failures_and_exits() {
        assert_eq!(next(S::Starting, Input::BootFailed), Ok(S::Error));
        assert_eq!(next(S::Running, Input::Exited), Ok(S::Stopped));
        assert_eq!(next(S::Error, Input::Start), Ok(S::Starting));
        assert_eq!(next(S::Error, Input::Delete), Ok(S::Deleting));
        assert_eq!(next(S::Running, Input::Failed), Ok(S::Error));
        assert_eq!(next(S::Stopping, Input::Failed), Ok(S::Error));
        assert!(next(S::Creating, Input::Failed).is_err());
    }

    #[test]
    fn pause_and_resume() {
        assert_eq!(next(S::Running, Input::Pause), Ok(S::Paused));
        assert_eq!(next(S::Paused, Input::Resume), Ok(S::Running));
        assert_eq!(Input::Pause.event_kind(), "paused");
        assert_eq!(Input::Resume.event_kind(), "resumed");
        // A paused VM stops (resumed first by the caller), exits, fails like a running one.
        assert_eq!(next(S::Paused, Input::Stop), Ok(S::Stopping));
        assert_eq!(next(S::Paused, Input::Exited), Ok(S::Stopped));
        assert_eq!(next(S::Paused, Input::Failed), Ok(S::Error));
        // Only a running VM pauses and only a paused one resumes.
        for s in VmState::ALL {
            assert_eq!(
                next(s, Input::Pause).is_ok(),
                s == S::Running,
                "pause from {s}"
            );
            assert_eq!(
                next(s, Input::Resume).is_ok(),
                s == S::Paused,
                "resume from {s}"
            );
        }
        let e = next(S::Stopped, Input::Pause).unwrap_err();
        assert_eq!(e.to_string(), "it is stopped; only a running VM pauses");
        let e = next(S::Paused, Input::Pause).unwrap_err();
        assert_eq!(e.to_string(), "it is paused already");
        let e = next(S::Running, Input::Resume).unwrap_err();
        assert_eq!(e.to_string(), "it is running already");
        let e = next(S::Stopped, Input::Resume).unwrap_err();
        assert_eq!(e.to_string(), "it is stopped; only a paused VM resumes");
        let e = next(S::Paused, Input::Start).unwrap_err();
        assert_eq!(e.to_string(), "it is paused; resume it");
        // Delete is refused as from running: the caller stops it first.
        let e = next(S::Paused, Input::Delete).unwrap_err();
        assert_eq!(e.to_string(), "it is paused; stop it first");
        assert_eq!(
            (Input::Pause.verb(), Input::Resume.verb()),
            ("pause", "resume")
        );
    }

    #[test]
    fn deleting_is_final_and_every_pair_is_decided() {
        for input in INPUTS {
            assert!(next(S::Deleting, input).is_err());
        }
        // Every state can reach stopped or deleting somehow: no dead ends besides deleting.
        for s in VmState::ALL {
            if s == S::Deleting {
                continue;
            }
            assert!(
                INPUTS.iter().any(|i| next(s, *i).is_ok()),
                "{s} has no way out"
            );
        }
    }
}
