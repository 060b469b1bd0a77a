//! The VM lifecycle state machine: the one place that decides which transitions are legal.
//!
//! ```text
//! creating ──created──▶ stopped ──start──▶ starting ──booted──▶ running ──stop──▶ stopping
//!    │                  ▲  ▲ │                 │                   │                 │
//!                          └─delete─▶ deleting    boot_failed/exited ▶ error    exited ▶ stopped
//! ```
//! `error` behaves like `stopped` (start or delete it). Every transition is recorded as an event
//! by the caller, through `Store::transition`.

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
        (VmState::Running, Input::Start) => " already",
        (VmState::Stopped | VmState::Error, Input::Stop) => " already",
        (VmState::Running, Input::Delete) => "; stop it first",
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
        (S::Running, I::Stop) => S::Stopping,
        (S::Running | S::Stopping, I::Exited) => S::Stopped,
        (S::Stopping, I::Halted) => S::Stopped,
        (S::Stopped | S::Error, I::Delete) => S::Deleting,
        (S::Stopped | S::Starting | S::Running | S::Stopping | S::Error, I::Failed) => S::Error,
        (
            S::Creating,
            I::Start
            | I::Booted
            | I::BootFailed
            | I::Stop
            | I::Halted
            | I::Exited
            | I::Delete
            | I::Failed,
        )
        | (S::Stopped, I::Created | I::Booted | I::BootFailed | I::Stop | I::Halted | I::Exited)
        | (S::Starting, I::Created | I::Start | I::Stop | I::Halted | I::Delete)
        | (S::Running, I::Created | I::Start | I::Booted | I::BootFailed | I::Halted | I::Delete)
        | (S::Stopping, I::Created | I::Start | I::Booted | I::BootFailed | I::Stop | I::Delete)
        | (S::Error, I::Created | I::Booted | I::BootFailed | I::Stop | I::Halted | I::Exited)
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
            | I::Failed,
        ) => return Err(NotAllowed { state, input }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState as S;

    const INPUTS: [Input; 9] = [
        Input::Created,
        Input::Start,
        Input::Booted,
        Input::BootFailed,
        Input::Stop,
        Input::Halted,
        Input::Exited,
        Input::Delete,
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
