//! A claim's lifecycle status, as the practice's billing sees it, and the one table of the
//! transitions it may take. This is not FHIR's `Claim.status` (active | cancelled | draft |
//! entered-in-error, the resource's own state): it is where the claim stands with the payer.
//!
//! ```text
//! draft -> prepared -> submitted -> accepted -> paid
//!                               \            \-> denied -> appealed
//!                                \-> rejected ------------> appealed -> accepted | paid | denied
//! ```
//!
//! [`ClaimStatus::can_become`] is the only place that says which transition is legal; issue 7
//! (claim preparation) builds on it. A status also says what the EHR is told when the claim
//! reaches it ([`ClaimStatus::push_outcome`]).

use std::fmt;

use super::InvalidValue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimStatus {
    Draft,
    Prepared,
    Submitted,
    Accepted,
    Rejected,
    Paid,
    Denied,
    Appealed,
}

/// Every legal transition, `(from, to)`. Anything else is refused (409 at the API).
///
/// Choices where the lifecycle's sketch is silent: a rejected claim (refused by the payer's
/// front-end edits, never adjudicated) and a denied one may both be appealed; an appeal ends
/// accepted (back in adjudication), paid or denied. A status never "changes" to itself.
const TRANSITIONS: &[(ClaimStatus, ClaimStatus)] = {
    use ClaimStatus::*;
    &[
        (Draft, Prepared),
        (Prepared, Submitted),
        (Submitted, Accepted),
        (Submitted, Rejected),
        (Accepted, Paid),
        (Accepted, Denied),
        (Rejected, Appealed),
        (Denied, Appealed),
        (Appealed, Accepted),
        (Appealed, Paid),
        (Appealed, Denied),
    ]
};

impl ClaimStatus {
    pub const ALL: [ClaimStatus; 8] = [
        ClaimStatus::Draft,
        ClaimStatus::Prepared,
        ClaimStatus::Submitted,
        ClaimStatus::Accepted,
        ClaimStatus::Rejected,
        ClaimStatus::Paid,
        ClaimStatus::Denied,
        ClaimStatus::Appealed,
    ];

    /// The status a claim has before anyone set one.
    pub const INITIAL: ClaimStatus = ClaimStatus::Draft;

    pub fn parse(value: &str) -> Result<Self, InvalidValue> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == value)
            .ok_or(InvalidValue::new(
                "status",
                "must be draft, prepared, submitted, accepted, rejected, paid, denied or appealed",
            ))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ClaimStatus::Draft => "draft",
            ClaimStatus::Prepared => "prepared",
            ClaimStatus::Submitted => "submitted",
            ClaimStatus::Accepted => "accepted",
            ClaimStatus::Rejected => "rejected",
            ClaimStatus::Paid => "paid",
            ClaimStatus::Denied => "denied",
            ClaimStatus::Appealed => "appealed",
        }
    }

    /// Whether a claim in this status may move to `next`.
    pub fn can_become(self, next: ClaimStatus) -> bool {
        TRANSITIONS.contains(&(self, next))
    }

    /// The statuses this one may move to, in the table's order.
    pub fn next_statuses(self) -> impl Iterator<Item = ClaimStatus> {
        TRANSITIONS
            .iter()
            .filter(move |(from, _)| *from == self)
            .map(|(_, to)| *to)
    }

    /// The FHIR ClaimResponse `outcome` (queued | complete | error | partial) the EHR is sent
    /// when a claim reaches this status, or `None` when the EHR is told nothing.
    ///
    /// - draft, prepared: nothing. The payer has not seen the claim; a ClaimResponse, which is
    ///   the payer's answer, would say something false.
    /// - submitted: `queued`, "received but processing has not begun" (R4 ClaimProcessingCodes).
    /// - accepted, paid: `complete`, processing finished without errors (payment follows, or
    ///   happened).
    /// - rejected, denied: `error`. A denial is an adjudication, which FHIR could also send as
    ///   `complete` with no benefit; `error` makes the EHR's billing worklist flag both as
    ///   needing work, and the disposition text says which it is.
    /// - appealed: `queued`. The payer has the appeal and has not decided: processing is again
    ///   "received, not begun" (`partial` would claim adjudication is under way).
    pub fn push_outcome(self) -> Option<&'static str> {
        match self {
            ClaimStatus::Draft | ClaimStatus::Prepared => None,
            ClaimStatus::Submitted | ClaimStatus::Appealed => Some("queued"),
            ClaimStatus::Accepted | ClaimStatus::Paid => Some("complete"),
            ClaimStatus::Rejected | ClaimStatus::Denied => Some("error"),
        }
    }

    /// The lifecycle steps a payer's answer moves a claim in this status through: a
    /// ClaimResponse's `outcome` (R4 ClaimProcessingCodes) and whether it reports a payment
    /// (`payment.amount` above zero). Only legal steps, in order; none when the answer says
    /// nothing new or does not fit where the claim stands (the answer is still stored).
    ///
    /// - `queued`: nothing (the payer has it, as `submitted` says).
    /// - `error`: a submitted claim is rejected (refused before adjudication); an accepted or
    ///   appealed one is denied.
    /// - `complete` / `partial`: a submitted claim is accepted, then paid when the answer
    ///   reports a payment; an appealed one is paid (payment) or accepted; an accepted one is
    ///   paid once a payment is reported.
    pub fn steps_for_answer(self, outcome: &str, paid: bool) -> Vec<ClaimStatus> {
        use ClaimStatus::*;
        match (outcome, self) {
            ("error", Submitted) => vec![Rejected],
            ("error", Accepted | Appealed) => vec![Denied],
            ("complete" | "partial", Submitted) if paid => vec![Accepted, Paid],
            ("complete" | "partial", Submitted) => vec![Accepted],
            ("complete" | "partial", Appealed) if paid => vec![Paid],
            ("complete" | "partial", Appealed) => vec![Accepted],
            ("complete" | "partial", Accepted) if paid => vec![Paid],
            _ => vec![],
        }
    }

    /// The disposition sent when the caller gives none: a fixed phrase naming the status.
    pub fn default_disposition(self) -> &'static str {
        match self {
            ClaimStatus::Draft => "Claim drafted",
            ClaimStatus::Prepared => "Claim prepared",
            ClaimStatus::Submitted => "Claim submitted to the payer",
            ClaimStatus::Accepted => "Claim accepted by the payer",
            ClaimStatus::Rejected => "Claim rejected by the payer",
            ClaimStatus::Paid => "Claim paid",
            ClaimStatus::Denied => "Claim denied",
            ClaimStatus::Appealed => "Claim under appeal",
        }
    }
}

impl fmt::Display for ClaimStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ClaimStatus::*;
    use super::*;

    #[test]
    fn every_status_parses_from_its_name_and_nothing_else_does() {
        for s in ClaimStatus::ALL {
            assert_eq!(ClaimStatus::parse(s.as_str()), Ok(s));
        }
        for bad in ["", "Submitted", "void", "paid "] {
            assert!(ClaimStatus::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_lifecycle_runs_forward_from_draft_to_paid() {
        let path = [Draft, Prepared, Submitted, Accepted, Paid];
        for pair in path.windows(2) {
            assert!(pair[0].can_become(pair[1]), "{} -> {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn a_claim_cannot_skip_submission_or_go_back_to_draft() {
        assert!(!Draft.can_become(Submitted));
        assert!(!Prepared.can_become(Paid));
        assert!(!Submitted.can_become(Draft));
        assert!(!Paid.can_become(Submitted));
    }

    #[test]
    fn a_status_never_transitions_to_itself() {
        for s in ClaimStatus::ALL {
            assert!(!s.can_become(s), "{s}");
        }
    }

    #[test]
    fn rejections_and_denials_may_be_appealed_and_an_appeal_is_decided() {
        assert!(Rejected.can_become(Appealed));
        assert!(Denied.can_become(Appealed));
        assert_eq!(
            Appealed.next_statuses().collect::<Vec<_>>(),
            [Accepted, Paid, Denied]
        );
        assert_eq!(Paid.next_statuses().count(), 0, "paid is final");
    }

    #[test]
    fn a_payers_answer_moves_the_claim_only_along_legal_steps() {
        assert_eq!(Submitted.steps_for_answer("error", false), [Rejected]);
        assert_eq!(Accepted.steps_for_answer("error", false), [Denied]);
        assert_eq!(Appealed.steps_for_answer("error", false), [Denied]);
        assert_eq!(Submitted.steps_for_answer("complete", false), [Accepted]);
        assert_eq!(
            Submitted.steps_for_answer("partial", true),
            [Accepted, Paid]
        );
        assert_eq!(Appealed.steps_for_answer("complete", true), [Paid]);
        assert_eq!(Accepted.steps_for_answer("complete", true), [Paid]);
        assert!(Accepted.steps_for_answer("complete", false).is_empty());
        assert!(Submitted.steps_for_answer("queued", true).is_empty());
        for s in [Draft, Prepared, Paid, Rejected, Denied] {
            for outcome in ["queued", "complete", "partial", "error"] {
                assert!(
                    s.steps_for_answer(outcome, true).is_empty(),
                    "{s} {outcome}"
                );
            }
        }
        // Every step the table gives is a legal transition from the one before.
        for s in ClaimStatus::ALL {
            for outcome in ["queued", "complete", "partial", "error"] {
                for paid in [false, true] {
                    let mut at = s;
                    for step in s.steps_for_answer(outcome, paid) {
                        assert!(at.can_become(step), "{at} -> {step}");
                        at = step;
                    }
                }
            }
        }
    }

    #[test]
    fn the_ehr_hears_of_a_claim_only_once_it_is_submitted() {
        assert_eq!(Draft.push_outcome(), None);
        assert_eq!(Prepared.push_outcome(), None);
        assert_eq!(Submitted.push_outcome(), Some("queued"));
        assert_eq!(Accepted.push_outcome(), Some("complete"));
        assert_eq!(Paid.push_outcome(), Some("complete"));
        assert_eq!(Rejected.push_outcome(), Some("error"));
        assert_eq!(Denied.push_outcome(), Some("error"));
        assert_eq!(Appealed.push_outcome(), Some("queued"));
    }
}
