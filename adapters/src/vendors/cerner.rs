//! Oracle Health (Cerner) Millennium, FHIR R4, as a system account.
//!
//! Quirks handled, with where they come from:
//! - Multi-tenant: the tenant id is a path segment of the FHIR base (`.../r4/{tenant}`) and of
//!   the authorization server (`.../tenants/{tenant}/protocols/oauth2/profiles/smart-v1/token`).
//!   The optional `tenant` setting must equal the base URL's last segment (a mismatch would
//!   send one tenant's token requests to another's server). (docs.oracle.com, "Millennium
//!   Authorization Framework":
//!   <https://docs.oracle.com/en/industries/health/millennium-platform-apis/millennium-authorization-framework>.)
//! - System accounts authenticate with client_credentials and the account's secret in HTTP
//!   Basic, asking SMART v1 `system/Patient.read`-style scopes; private_key_jwt is accepted too
//!   (the tenant's smart-configuration lists `client_secret_basic` and `private_key_jwt`).
//!   Configure `token_url`, or it is discovered from `{base}/.well-known/smart-configuration`.
//! - Patient search needs at least one parameter and pages with an opaque `-pageContext` in
//!   the `next` link; `_count` is at most 200. Changed patients come from
//!   `Patient?_lastUpdated=gt{since}&_count=N` (`ge1900-01-01T00:00:00Z` before any watermark),
//!   without `_sort`. (docs.oracle.com, "FHIR R4 APIs for Millennium", Patient "Get a list of
//!   patients": <https://docs.oracle.com/en/industries/health/millennium-platform-apis/mfrap/op-patient-get.html>;
//!   fhir.cerner.com R4 Patient: <https://fhir.cerner.com/millennium/r4/base/individuals/patient/>.)
//! - Bulk Data is Group-level only, `GET {base}/Group/{group_id}/$export` with `_type` and
//!   `_since`, one export in progress per client and tenant. (docs.oracle.com, "Kick off a bulk
//!   export request for a group of patients":
//!   <https://docs.oracle.com/en/industries/health/millennium-platform-apis/mfbda/op-group-group_id-export-get.html>.)
//!
//! Settings: `tenant` (optional, checked against the base URL), `group_id` (optional: without
//! it `start_export` answers `None` and callers page instead), `page_size` (default 200, max
//! 200), and the shared client's (see [`crate::client::settings`]).

use std::sync::Arc;

use super::{no_search_params, ChangedSince, ExportLevel, SmartAdapter, VendorSpec};
use crate::client::settings::{setting_error, str_setting};
use crate::{AdapterContext, Connection, EhrAdapter, RegistryError};

pub const SPEC: VendorSpec = VendorSpec {
    vendor: "cerner",
    changed_since: ChangedSince::Search {
        sort: false,
        floor: Some("1900-01-01T00:00:00Z"),
    },
    export_level: ExportLevel::GroupOnly,
    default_scopes: "system/Patient.read system/Coverage.read system/ClaimResponse.write",
    accepts_private_key: true,
    accepts_client_secret: true,
    default_page_size: 200,
    max_page_size: 200,
    group_required: false,
    check: check_tenant,
    search_params: no_search_params,
};

/// The base URL ends in a tenant id, equal to the `tenant` setting when given.
fn check_tenant(connection: &Connection) -> Result<(), RegistryError> {
    let last = connection
        .fhir_base_url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let looks_like_tenant =
        !last.is_empty() && last.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    match str_setting(connection, "tenant")? {
        Some(tenant) if tenant != last => Err(setting_error(
            connection,
            "tenant",
            "is not the last segment of the FHIR base URL (.../r4/{tenant})",
        )),
        _ if !looks_like_tenant => Err(setting_error(
            connection,
            "fhir_base_url",
            "must end with the tenant id (.../r4/{tenant})",
        )),
        _ => Ok(()),
    }
}

pub fn factory(
    connection: &Connection,
    _profile: &fhirgate_mappings::Profile,
    context: &AdapterContext,
) -> Result<Arc<dyn EhrAdapter>, RegistryError> {
    Ok(Arc::new(SmartAdapter::new(&SPEC, connection, context)?))
}
