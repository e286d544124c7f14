//! The vendor adapters. One implementation, [`SmartAdapter`], speaks SMART Backend Services and
//! FHIR R4 REST + Bulk Data through the shared [`crate::client`]; what differs between EHRs is
//! data, a [`VendorSpec`] per vendor (how changed patients are listed, which export levels
//! exist, default scopes, accepted client authentication, page sizes, required settings), plus
//! an optional settings check. A vendor module is its spec, its factory and its quirks' sources.
//!
//! Never logs; errors never quote ids, bodies or URLs.

pub mod athena;
pub mod cerner;
pub mod epic;
pub mod generic;
mod smart;

pub use smart::SmartAdapter;

use crate::{Connection, RegistryError};

/// How [`crate::EhrAdapter::patients_changed_since`] lists patients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangedSince {
    /// `GET {base}/Patient?_lastUpdated=gt{since}&_count=N` (with `_sort=_lastUpdated` when
    /// `sort`), paged by `next` links; `floor` is the `_lastUpdated=ge...` sent when there is no
    /// watermark yet (for EHRs that refuse a Patient search without parameters).
    Search {
        sort: bool,
        floor: Option<&'static str>,
    },
    /// A Group-level `$export?_type=Patient&_since=...` of the connection's group, then the
    /// Patient NDJSON file(s).
    GroupExport,
}

/// Which Bulk Data kick-offs the EHR serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportLevel {
    /// `{base}/$export` and `{base}/Group/{id}/$export`.
    SystemAndGroup,
    /// `{base}/Group/{id}/$export` only.
    GroupOnly,
}

/// What a vendor is, as data.
#[derive(Debug, Clone, Copy)]
pub struct VendorSpec {
    pub vendor: &'static str,
    pub changed_since: ChangedSince,
    pub export_level: ExportLevel,
    /// Scopes asked for when the connection names none.
    pub default_scopes: &'static str,
    /// Client authentication the vendor accepts: private_key_jwt, client secret.
    pub accepts_private_key: bool,
    pub accepts_client_secret: bool,
    /// `_count` of searches, unless the connection's `page_size` says otherwise (up to
    /// `max_page_size`).
    pub default_page_size: u32,
    pub max_page_size: u32,
    /// Whether the `group_id` setting is required (a Group export is how patients are listed).
    pub group_required: bool,
    /// A vendor's own settings check, run by the factory.
    pub check: fn(&Connection) -> Result<(), RegistryError>,
    /// Query parameters every Patient and Coverage search carries, from the connection's
    /// settings (athenahealth's `ah-practice` tenant); run once by the factory.
    pub search_params: fn(&Connection) -> Result<SearchParams, RegistryError>,
}

/// Query parameters (name, value) added to every search.
pub type SearchParams = Vec<(String, String)>;

/// A spec's `check` when the vendor has nothing more to check.
pub fn no_check(_: &Connection) -> Result<(), RegistryError> {
    Ok(())
}

/// A spec's `search_params` when searches need no extra parameter.
pub fn no_search_params(_: &Connection) -> Result<SearchParams, RegistryError> {
    Ok(Vec::new())
}
