//! Resources prepared for [`crate::store::Store::write_resources`] outside HTTP, exactly as a
//! FHIR create prepares them (server id, `meta` stamped, sealed, indexed): for bulk loads that
//! write many resources per transaction (the benchmark's seeding; imports). Nothing is audited
//! here: a caller that loads PHI records its own audit event.

use serde_json::Value;

use super::{check_resource, parse_body, prepare, Kind};
use crate::crypto::PhiVault;
use crate::domain::{new_resource_id, ResourceId};
use crate::http::ApiError;
use crate::store::{Expect, ResourceWrite};

/// A new resource of `kind` with a server-assigned id, ready to write (checked as a create
/// checks its body).
pub fn new_resource(
    kind: &Kind,
    vault: &PhiVault,
    practice: &ResourceId,
    resource: &Value,
) -> Result<ResourceWrite, ApiError> {
    let body = serde_json::to_vec(resource).map_err(|_| ApiError::Internal)?;
    let map = parse_body(kind, &body)?;
    let id = new_resource_id();
    Ok(prepare(kind, vault, practice, map, id.as_str(), Expect::Absent)?.write)
}

/// A version of `resource` under the id `id`: a create when `expect` is [`Expect::Absent`], an
/// update of the head version otherwise (checked as a create or update checks its body; the
/// body's own `id` is replaced).
pub fn resource_at(
    kind: &Kind,
    vault: &PhiVault,
    practice: &ResourceId,
    resource: Value,
    id: &str,
    expect: Expect,
) -> Result<ResourceWrite, ApiError> {
    let mut map = check_resource(kind, resource).map_err(|issues| ApiError::Invalid {
        status: 400,
        issues,
    })?;
    map.insert("id".into(), Value::from(id));
    Ok(prepare(kind, vault, practice, map, id, expect)?.write)
}
