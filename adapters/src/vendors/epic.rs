//! Epic on FHIR (R4), as a backend system.
//!
//! Quirks handled, with where they come from:
//! - Authentication is SMART Backend Services only: a JWT client assertion signed RS384 or
//!   ES384, `iss` = `sub` = the client id, `aud` = the token endpoint URL, `exp` at most five
//!   minutes ahead, a `jti` never reused; no client secrets. (fhir.epic.com, "OAuth 2.0
//!   Tutorial", section "Using JSON Web Tokens (JWTs)" for backend apps:
//!   <https://fhir.epic.com/Documentation?docId=oauth2>.)
//! - The FHIR base is per organisation (`.../api/FHIR/R4`), the token endpoint its sibling
//!   `.../oauth2/token`; configure `token_url`, or it is discovered from
//!   `{base}/.well-known/smart-configuration`.
//! - Patient search takes `identifier`, `_id`, or name plus birth date; it does not take
//!   `_lastUpdated`, so patients changed since a watermark come from a Group-level Bulk export
//!   `GET {base}/Group/{group_id}/$export?_type=Patient&_since=...` (Epic supports Group
//!   export only, and bulk data is not incremental: nothing is readable until the whole export
//!   is done). (fhir.epic.com, "FHIR Bulk Data Access Tutorial":
//!   <https://fhir.epic.com/Documentation?docId=fhir_bulk_data>.) The listing polls the status
//!   URL honouring `Retry-After`, then streams the Patient NDJSON file(s). Since an export's
//!   files are not in `_lastUpdated` order, every page but the last carries the watermark it
//!   started from, and the last page the largest `meta.lastUpdated` of the export: a run cut
//!   short starts the export again rather than skip patients.
//! - Errors come as OperationOutcome; only their issue code is kept.
//!
//! Settings: `group_id` (required: the Group the organisation set up for this client),
//! `page_size` (Coverage search, default 100, max 1000), `alg` (`RS384`/`ES384`, else taken from
//! the key), `export_poll_ms` (default 2000), `export_timeout_s` (default 3600), and the
//! shared client's (see [`crate::client::settings`]).

use std::sync::Arc;

use super::{no_check, no_search_params, ChangedSince, ExportLevel, SmartAdapter, VendorSpec};
use crate::{AdapterContext, Connection, EhrAdapter, RegistryError};

pub const SPEC: VendorSpec = VendorSpec {
    vendor: "epic",
    changed_since: ChangedSince::GroupExport,
    export_level: ExportLevel::GroupOnly,
    default_scopes:
        "system/Patient.read system/Coverage.read system/Group.read system/ClaimResponse.write",
    accepts_private_key: true,
    accepts_client_secret: false,
    default_page_size: 100,
    max_page_size: 1000,
    group_required: true,
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
