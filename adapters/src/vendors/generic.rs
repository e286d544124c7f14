//! The generic SMART R4 adapter: any EHR that follows SMART Backend Services (HL7 SMART App
//! Launch 2.x, "Backend Services") and FHIR R4 search and paging.
//!
//! Quirks handled (none vendor-specific; the standard's own choices):
//! - Token endpoint from `{base}/.well-known/smart-configuration` when not configured
//!   (SMART App Launch, "Conformance" / smart-configuration, `token_endpoint`).
//! - Client authentication by private_key_jwt (RS384/ES384) or a client secret in HTTP Basic
//!   (RFC 6749 §2.3.1).
//! - Changed patients by `Patient?_lastUpdated=gt{since}&_sort=_lastUpdated&_count=N`, paged by
//!   `Bundle.link[next]` (FHIR R4 http.html#paging, search.html#lastUpdated).
//! - Bulk Data system-level `$export` and Group `$export` (HL7 Bulk Data Access 2.0,
//!   export.html), with `_type` and `_since`.
//!
//! Settings: `page_size` (default 100, max 1000), `group_id` (optional), and the shared
//! client's (see [`crate::client::settings`]).

use std::sync::Arc;

use super::{no_check, no_search_params, ChangedSince, ExportLevel, SmartAdapter, VendorSpec};
use crate::{AdapterContext, Connection, EhrAdapter, RegistryError};

pub const SPEC: VendorSpec = VendorSpec {
    vendor: "generic",
    changed_since: ChangedSince::Search {
        sort: true,
        floor: None,
    },
    export_level: ExportLevel::SystemAndGroup,
    default_scopes:
        "system/Patient.read system/Coverage.read system/Group.read system/ClaimResponse.write",
    accepts_private_key: true,
    accepts_client_secret: true,
    default_page_size: 100,
    max_page_size: 1000,
    group_required: false,
    check: no_check,
    search_params: no_search_params,
};

pub fn factory(
    connection: &Connection,
    _profile: &fhirgate_mappings::Profile,
    context: &AdapterContext,
) -> Result<Arc<dyn EhrAdapter>, RegistryError> {
    Ok(Arc::new(SmartAdapter::new(&SPEC, connection, context)?))
}
