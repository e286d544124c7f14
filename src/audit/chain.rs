//! The hash chain: `hash = SHA-256(canonical encoding of every field, including prev_hash)`.
//! The encoding is length-prefixed, so no two different records encode alike, and uses the
//! RFC 3339 text of the UTC time, so both backends hash the same bytes.

use serde::Serialize;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;

use super::AuditRecord;

/// The `prev_hash` of the first event of a chain.
pub const GENESIS: [u8; 32] = [0u8; 32];

fn field(h: &mut Sha256, value: Option<&str>) {
    match value {
        Some(v) => {
            h.update((v.len() as u32).to_be_bytes());
            h.update(v.as_bytes());
        }
        None => h.update(u32::MAX.to_be_bytes()),
    }
}

pub fn hash_of(r: &AuditRecord) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fhirgate-audit-v1");
    field(&mut h, Some(&r.id));
    field(&mut h, Some(&r.chain));
    h.update(r.chain_seq.to_be_bytes());
    let at = r
        .recorded_at
        .to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default();
    field(&mut h, Some(&at));
    field(&mut h, r.practice_id.as_deref());
    field(&mut h, Some(&r.action));
    field(&mut h, Some(&r.outcome));
    h.update(r.status_code.to_be_bytes());
    for f in [
        &r.actor_client_id,
        &r.actor_role,
        &r.resource_type,
        &r.resource_id,
        &r.patient_id,
        &r.source_ip,
        &r.user_agent,
        &r.request_id,
        &r.purpose_of_use,
    ] {
        field(&mut h, f.as_deref());
    }
    // Fields added after the first records were chained (outbound calls): hashed only when
    // present, so every earlier record keeps its hash. A record cannot lose them unnoticed:
    // its stored hash covers them.
    if r.connection_id.is_some() || r.duration_ms.is_some() {
        h.update(b"outbound");
        field(&mut h, r.connection_id.as_deref());
        h.update(r.duration_ms.unwrap_or(-1).to_be_bytes());
    }
    h.update((r.prev_hash.len() as u32).to_be_bytes());
    h.update(&r.prev_hash);
    h.finalize().into()
}

/// The result of walking one chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub chain: String,
    pub events: u64,
    pub ok: bool,
    /// The first broken link: its sequence number, event id and what is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_broken: Option<BrokenLink>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenLink {
    pub chain_seq: i64,
    pub id: String,
    pub reason: &'static str,
}

/// Incremental verifier: feed records in chain order.
pub struct ChainVerifier {
    report: ChainReport,
    expected_seq: i64,
    prev_hash: Vec<u8>,
}

impl ChainVerifier {
    pub fn new(chain: &str) -> Self {
        Self {
            report: ChainReport {
                chain: chain.to_owned(),
                events: 0,
                ok: true,
                first_broken: None,
            },
            expected_seq: 1,
            prev_hash: GENESIS.to_vec(),
        }
    }

    /// Continues a chain whose events through `through_seq` were purged; the first remaining
    /// event must link to the purged one's hash.
    pub fn resume(chain: &str, through_seq: i64, through_hash: Vec<u8>) -> Self {
        let mut v = Self::new(chain);
        v.expected_seq = through_seq + 1;
        v.prev_hash = through_hash;
        v
    }

    /// Checks one record; returns false once the chain is broken (later records are not checked).
    pub fn feed(&mut self, r: &AuditRecord) -> bool {
        if !self.report.ok {
            return false;
        }
        self.report.events += 1;
        let reason = if r.chain_seq != self.expected_seq {
            Some("sequence gap: an event is missing or was inserted")
        } else if r.prev_hash != self.prev_hash {
            Some("prev_hash does not match the previous event")
        } else if hash_of(r).as_slice() != r.hash.as_slice() {
            Some("hash does not match the event's content")
        } else {
            None
        };
        if let Some(reason) = reason {
            self.report.ok = false;
            self.report.first_broken = Some(BrokenLink {
                chain_seq: r.chain_seq,
                id: r.id.clone(),
                reason,
            });
            return false;
        }
        self.expected_seq += 1;
        self.prev_hash.clone_from(&r.hash);
        true
    }

    pub fn finish(self) -> ChainReport {
        self.report
    }
}

/// Verifies a whole chain held in memory (tests, small exports).
pub fn verify_chain(chain: &str, records: &[AuditRecord]) -> ChainReport {
    let mut v = ChainVerifier::new(chain);
    for r in records {
        if !v.feed(r) {
            break;
        }
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Action, NewAuditEvent};
    use crate::domain::ResourceId;

    fn chain_of(n: usize) -> Vec<AuditRecord> {
        let event = NewAuditEvent {
            practice_id: Some(ResourceId::parse("p", "p1").unwrap()),
            action: Some(Action::Read),
            status_code: 200,
            resource_type: Some("Patient".into()),
            resource_id: Some("123".into()),
            ..Default::default()
        };
        let mut out: Vec<AuditRecord> = Vec::new();
        for _ in 0..n {
            let (seq, prev) = out
                .last()
                .map_or((0, GENESIS.to_vec()), |r| (r.chain_seq, r.hash.clone()));
            out.push(AuditRecord::next(&event, seq, &prev, crate::store::now()));
        }
        out
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let records = chain_of(5);
        let report = verify_chain("p1", &records);
        assert!(report.ok);
        assert_eq!(report.events, 5);
    }

    #[test]
    fn an_outbound_call_s_connection_and_duration_are_chained() {
        let mut records = chain_of(3);
        let event = NewAuditEvent {
            practice_id: Some(ResourceId::parse("p", "p1").unwrap()),
            action: Some(Action::Outbound(fhirgate_adapters::OutboundAction::Search)),
            status_code: 200,
            connection_id: Some("conn-1".into()),
            duration_ms: Some(42),
            ..Default::default()
        };
        let last = &records[2];
        let outbound = AuditRecord::next(&event, last.chain_seq, &last.hash, crate::store::now());
        assert_eq!(outbound.action, "ehr-search");
        records.push(outbound);
        assert!(verify_chain("p1", &records).ok);
        for tamper in [
            |r: &mut AuditRecord| r.duration_ms = Some(1),
            |r: &mut AuditRecord| r.connection_id = None,
            |r: &mut AuditRecord| r.duration_ms = None,
        ] {
            let mut copy = records.clone();
            tamper(&mut copy[3]);
            let report = verify_chain("p1", &copy);
            assert_eq!(report.first_broken.unwrap().chain_seq, 4);
        }
    }

    #[test]
    fn an_edited_field_breaks_the_chain_at_that_event() {
        let mut records = chain_of(5);
        records[2].resource_id = Some("456".into());
        let report = verify_chain("p1", &records);
        assert!(!report.ok);
        assert_eq!(report.first_broken.unwrap().chain_seq, 3);
    }

    #[test]
    fn a_deleted_event_breaks_the_chain_after_the_gap() {
        let mut records = chain_of(5);
        records.remove(1);
        let report = verify_chain("p1", &records);
        assert_eq!(report.first_broken.unwrap().chain_seq, 3);
    }

    #[test]
    fn a_recomputed_hash_still_breaks_the_next_link() {
        let mut records = chain_of(3);
        records[1].status_code = 403;
        records[1].hash = hash_of(&records[1]).to_vec();
        let report = verify_chain("p1", &records);
        assert_eq!(report.first_broken.unwrap().chain_seq, 3);
    }
}
