//! athenahealth (athenaOne) FHIR R4, as a 2-legged (client credentials) system client: the
//! fourth vendor, and the worked example of adapters/README.md "Adding an EHR".
//!
//! Quirks handled, with where they come from:
//! - Multi-tenant by practice: every search names the practice it is about with
//!   `ah-practice=Organization/a-1.Practice-{practice id}` (athenahealth represents each practice,
//!   its tenant, as an Organization `a-1.Practice-{PID}`; fhir.athena.io, "Extension:
//!   athenahealth Practice":
//!   <https://fhir.athena.io/athenacoreext/StructureDefinition-ah-practice.html>). The `tenant`
//!   setting (required, digits) is that practice id; this module turns it into the parameter
//!   every Patient and Coverage search carries ([`VendorSpec::search_params`]).
//! - Authorization is athenahealth's Okta server, `https://api.platform.athenahealth.com/oauth2/v1/token`
//!   (preview: `api.preview.platform...`); service-to-service apps use 2-legged OAuth, the
//!   client_credentials grant with the app's client id and secret (docs.athenahealth.com,
//!   "Authorization Overview": <https://docs.athenahealth.com/api/guides/authorization-overview>).
//!   Its SMART configuration sits under the FHIR base
//!   (`https://api.platform.athenahealth.com/fhir/r4/.well-known/smart-configuration`) and lists
//!   `client_secret_basic` and `private_key_jwt`, so both credentials are accepted and the
//!   token URL may be left to discovery.
//! - Scopes are SMART v1 `system/Patient.read`-style (docs.athenahealth.com, "FHIR Bulk Export
//!   Workflow": <https://docs.athenahealth.com/api/workflows/fhir-bulk-export-workflow>).
//! - Bulk export covers the patients of one athena context (a practice), asynchronously, and is
//!   not meant for daily synchronisation (same page): changed patients are listed with
//!   `Patient?_lastUpdated=gt{since}&_sort=_lastUpdated` searches, and export is Group-level
//!   only, on the `group_id` setting.
//! - Resources follow US Core (Athena Core IG, <https://fhir.athena.io/athenacoreext/>): FHIR's own
//!   codes, so `mappings/profiles/athena.toml` translates none.
//! - Not documented by athenahealth: a ClaimResponse write. Claim-status pushes follow the
//!   simulator's contract (adapters/sim/SPEC.md); a live athenaOne practice needs its
//!   proprietary claims API instead.
//!
//! Settings: `tenant` (required: the athenahealth practice id, digits), `group_id` (optional:
//! without it `start_export` answers `None`), `page_size` (default 100, max 1000), and the
//! shared client's (see [`crate::client::settings`]).

use std::sync::Arc;

use super::{ChangedSince, ExportLevel, SearchParams, SmartAdapter, VendorSpec};
use crate::client::settings::{setting_error, str_setting};
use crate::{AdapterContext, Connection, EhrAdapter, RegistryError};

pub const SPEC: VendorSpec = VendorSpec {
    vendor: "athena",
    changed_since: ChangedSince::Search {
        sort: true,
        floor: None,
    },
    export_level: ExportLevel::GroupOnly,
    default_scopes: "system/Patient.read system/Coverage.read system/ClaimResponse.write",
    accepts_private_key: true,
    accepts_client_secret: true,
    default_page_size: 100,
    max_page_size: 1000,
    group_required: false,
    check: no_extra_check,
    search_params: practice_param,
};

fn no_extra_check(_: &Connection) -> Result<(), RegistryError> {
    Ok(())
}

/// `ah-practice=Organization/a-1.Practice-{tenant}`, the tenant being the practice id.
fn practice_param(connection: &Connection) -> Result<SearchParams, RegistryError> {
    match str_setting(connection, "tenant")? {
        Some(id) if id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit()) => Ok(vec![(
            "ah-practice".to_owned(),
            format!("Organization/a-1.Practice-{id}"),
        )]),
        Some(_) => Err(setting_error(
            connection,
            "tenant",
            "must be the athenahealth practice id (digits)",
        )),
        None => Err(setting_error(
            connection,
            "tenant",
            "is required: the athenahealth practice id",
        )),
    }
}

pub fn factory(
    connection: &Connection,
    _profile: &fhirgate_mappings::Profile,
    context: &AdapterContext,
) -> Result<Arc<dyn EhrAdapter>, RegistryError> {
    Ok(Arc::new(SmartAdapter::new(&SPEC, connection, context)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Credential;

    fn connection(tenant: Option<&str>) -> Connection {
        let mut settings = serde_json::Map::new();
        if let Some(t) = tenant {
            settings.insert("tenant".into(), t.into());
        }
        Connection {
            id: "c-athena".into(),
            vendor: "athena".into(),
            fhir_base_url: "https://api.preview.platform.athenahealth.com/fhir/r4".into(),
            client_id: "app".into(),
            token_url: None,
            credential: Credential::ClientSecret("s".into()),
            scopes: None,
            settings,
        }
    }

    #[test]
    fn the_practice_id_becomes_ah_practice_and_is_required_and_numeric() {
        assert_eq!(
            practice_param(&connection(Some("195900"))).unwrap(),
            [(
                "ah-practice".to_owned(),
                "Organization/a-1.Practice-195900".to_owned()
            )]
        );
        for bad in [None, Some("1959&x=1"), Some("Practice-1")] {
            assert!(matches!(
                practice_param(&connection(bad)),
                Err(RegistryError::Setting { key, .. }) if key == "tenant"
            ));
        }
    }
}
