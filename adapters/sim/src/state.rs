//! The simulator's in-memory state shared by every worker: the patient store (sorted by
//! `meta.lastUpdated` then id, pre-serialized for fast pages), issued tokens and used `jti`s,
//! export jobs, applied claim updates, and the fault knobs with their counters. Holds only
//! synthetic data; never logs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use actix_web::web::Bytes;
use serde_json::Value;

use crate::synthetic::{self, instant, Generated};
use crate::{Personality, SimCredential};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
pub(crate) fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// One patient as served: the resource, its JSON bytes, and its coverages' JSON bytes.
#[derive(Debug, Clone)]
pub(crate) struct PatientRecord {
    pub id: String,
    pub lu: i64,
    pub resource: Value,
    pub json: Bytes,
    pub coverages: Vec<Value>,
    pub coverage_json: Vec<Bytes>,
}

impl PatientRecord {
    fn new(id: String, lu: i64, resource: Value, coverages: Vec<Value>) -> Self {
        let json = Bytes::from(resource.to_string());
        let coverage_json = coverages
            .iter()
            .map(|c| Bytes::from(c.to_string()))
            .collect();
        Self {
            id,
            lu,
            resource,
            json,
            coverages,
            coverage_json,
        }
    }

    pub fn key(&self) -> (i64, &str) {
        (self.lu, self.id.as_str())
    }
}

/// Patients sorted by (lastUpdated, id), with an id -> lastUpdated index to find one.
#[derive(Debug, Default)]
pub(crate) struct PatientStore {
    pub sorted: Vec<PatientRecord>,
    by_id: HashMap<String, i64>,
}

impl PatientStore {
    pub fn new(generated: Vec<Generated>) -> Self {
        let mut sorted: Vec<PatientRecord> = generated
            .into_iter()
            .map(|g| PatientRecord::new(g.id, g.last_updated_ms, g.patient, g.coverages))
            .collect();
        sorted.sort_by(|a, b| a.key().cmp(&b.key()));
        let by_id = sorted.iter().map(|r| (r.id.clone(), r.lu)).collect();
        Self { sorted, by_id }
    }

    fn position(&self, id: &str) -> Option<usize> {
        let lu = *self.by_id.get(id)?;
        self.sorted
            .binary_search_by(|r| r.key().cmp(&(lu, id)))
            .ok()
    }

    pub fn get(&self, id: &str) -> Option<&PatientRecord> {
        self.position(id).map(|i| &self.sorted[i])
    }

    /// Index of the first record strictly after `(lu, id)`.
    pub fn after(&self, lu: i64, id: &str) -> usize {
        self.sorted.partition_point(|r| r.key() <= (lu, id))
    }

    /// Index of the first record with lastUpdated > `lu` (or >= when `inclusive`).
    pub fn start_at_instant(&self, lu: i64, inclusive: bool) -> usize {
        if inclusive {
            self.sorted.partition_point(|r| r.lu < lu)
        } else {
            self.sorted.partition_point(|r| r.lu <= lu)
        }
    }

    /// Gives `k` patients (spread over the store) a new lastUpdated and phone, as an EHR edit.
    /// Applies `edit` to a patient as an EHR edit would (new `meta.versionId` and
    /// `meta.lastUpdated`, after every other); `false` when there is no such patient.
    pub fn edit(&mut self, id: &str, edit: impl FnOnce(&mut Value)) -> bool {
        let Some(pos) = self.position(id) else {
            return false;
        };
        let mut rec = self.sorted.remove(pos);
        let last = self.sorted.last().map(|r| r.lu).unwrap_or(0);
        let lu = now_ms().max(last + 1);
        let version = rec.resource["meta"]["versionId"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1)
            + 1;
        edit(&mut rec.resource);
        rec.resource["meta"]["versionId"] = Value::from(version.to_string());
        rec.resource["meta"]["lastUpdated"] = Value::from(instant(lu));
        let updated = PatientRecord::new(rec.id, lu, rec.resource, rec.coverages);
        self.by_id.insert(updated.id.clone(), lu);
        self.sorted.push(updated);
        true
    }

    pub fn touch(&mut self, k: usize, rng: &mut fastrand::Rng) -> Vec<String> {
        let n = self.sorted.len();
        if n == 0 || k == 0 {
            return Vec::new();
        }
        let k = k.min(n);
        let ids: Vec<String> = (0..k).map(|i| self.sorted[i * n / k].id.clone()).collect();
        for id in &ids {
            let Some(pos) = self.position(id) else {
                continue;
            };
            let mut rec = self.sorted.remove(pos);
            let last = self.sorted.last().map(|r| r.lu).unwrap_or(0);
            let lu = now_ms().max(last + 1);
            let version = rec.resource["meta"]["versionId"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                + 1;
            rec.resource["meta"]["versionId"] = Value::from(version.to_string());
            rec.resource["meta"]["lastUpdated"] = Value::from(instant(lu));
            if let Some(telecom) = rec.resource["telecom"].get_mut(0) {
                telecom["value"] = Value::from(format!("555-01{:02}", rng.u8(0..100)));
            }
            let updated = PatientRecord::new(rec.id, lu, rec.resource, rec.coverages);
            self.by_id.insert(updated.id.clone(), lu);
            self.sorted.push(updated);
        }
        ids
    }
}

/// How malformed a response is made by [`crate::Controls::malformed_next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// A Bundle whose `resourceType` is wrong (`"Bundel"`); a read answers an `Observation`.
    WrongResourceType,
    /// The JSON cut off halfway.
    Truncated,
    /// A well-formed searchset whose first entry is presented as a match but is an
    /// `Observation` (same id), not the type searched for; a read answers an `Observation`.
    WrongEntryType,
}

#[derive(Debug)]
pub(crate) struct Faults {
    pub fail_next: u32,
    pub fail_status: u16,
    pub fail_retry_after: Option<u64>,
    pub failure_rate: f64,
    pub rng: fastrand::Rng,
    pub throttle_next: u32,
    pub throttle_retry_after: u64,
    pub latency: Duration,
    pub malformed_next: u32,
    pub malformed_kind: Malformed,
}

/// A snapshot of the simulator's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub tokens_granted: u64,
    pub tokens_refused: u64,
    /// FHIR calls received (base, bulk status and bulk files), whatever their answer.
    pub fhir_requests: u64,
    pub unauthorized_sent: u64,
    pub claim_updates_applied: u64,
}

#[derive(Debug, Default)]
pub(crate) struct AtomicCounters {
    pub tokens_granted: AtomicU64,
    pub tokens_refused: AtomicU64,
    pub fhir_requests: AtomicU64,
    pub unauthorized_sent: AtomicU64,
    pub claim_updates_applied: AtomicU64,
}

impl AtomicCounters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> Counters {
        Counters {
            tokens_granted: self.tokens_granted.load(Ordering::Relaxed),
            tokens_refused: self.tokens_refused.load(Ordering::Relaxed),
            fhir_requests: self.fhir_requests.load(Ordering::Relaxed),
            unauthorized_sent: self.unauthorized_sent.load(Ordering::Relaxed),
            claim_updates_applied: self.claim_updates_applied.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub expires_ms: i64,
}

/// One claim-status update the simulator applied (a created ClaimResponse).
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimUpdate {
    /// The idempotency key from `If-None-Exist` (`None` for a plain create).
    pub update_id: Option<String>,
    pub outcome: String,
    pub disposition: Option<String>,
    /// The stored ClaimResponse (with its id and meta).
    pub resource: Value,
    /// When the simulator applied it (stored it), on the system clock: what a benchmark
    /// measures delivery latency to.
    pub applied_at: time::OffsetDateTime,
}

#[derive(Debug, Default)]
pub(crate) struct Claims {
    pub by_claim: HashMap<String, Vec<ClaimUpdate>>,
    /// update id -> ClaimResponse id.
    pub by_update: HashMap<String, String>,
    pub resources: HashMap<String, Value>,
}

#[derive(Debug)]
pub(crate) struct ExportJob {
    pub polls_left: u32,
    pub manifest: Value,
    pub files: Vec<Bytes>,
}

/// Settings fixed at start.
#[derive(Debug)]
pub(crate) struct Settings {
    pub personality: Personality,
    pub client_id: String,
    pub credential: SimCredential,
    pub token_ttl: Duration,
    pub page_size: usize,
    pub export_polls: u32,
    pub file_lines: usize,
    pub group_id: String,
    pub tenant: String,
    pub origin: String,
    /// Path of the FHIR base (`/api/FHIR/R4`, `/r4/{tenant}`, `/fhir`).
    pub base_path: String,
    pub token_path: String,
}

impl Settings {
    pub fn base_url(&self) -> String {
        format!("{}{}", self.origin, self.base_path)
    }
    pub fn token_url(&self) -> String {
        format!("{}{}", self.origin, self.token_path)
    }
}

pub(crate) struct Shared {
    pub settings: Settings,
    pub verifier: crate::token::ClientVerifier,
    pub patients: RwLock<PatientStore>,
    pub tokens: Mutex<HashMap<String, Grant>>,
    pub jtis: Mutex<HashMap<String, i64>>,
    pub jobs: Mutex<HashMap<String, ExportJob>>,
    pub claims: Mutex<Claims>,
    pub faults: Mutex<Faults>,
    pub counters: AtomicCounters,
    pub touch_rng: Mutex<fastrand::Rng>,
}

impl Shared {
    pub fn new(settings: Settings, patients: usize, seed: u64) -> Result<Arc<Self>, String> {
        let verifier = crate::token::ClientVerifier::new(&settings.credential)?;
        let generated = synthetic::generate(settings.personality, patients, seed, now_ms());
        Ok(Arc::new(Self {
            verifier,
            patients: RwLock::new(PatientStore::new(generated)),
            tokens: Mutex::default(),
            jtis: Mutex::default(),
            jobs: Mutex::default(),
            claims: Mutex::default(),
            faults: Mutex::new(Faults {
                fail_next: 0,
                fail_status: 500,
                fail_retry_after: None,
                failure_rate: 0.0,
                rng: fastrand::Rng::with_seed(seed ^ 0x5eed_fa17),
                throttle_next: 0,
                throttle_retry_after: 1,
                latency: Duration::ZERO,
                malformed_next: 0,
                malformed_kind: Malformed::Truncated,
            }),
            counters: AtomicCounters::default(),
            touch_rng: Mutex::new(fastrand::Rng::with_seed(seed ^ 0x70c4)),
            settings,
        }))
    }
}
