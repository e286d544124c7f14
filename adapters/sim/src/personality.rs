//! What makes one EHR personality differ from another, as data: one [`Traits`] per
//! [`Personality`]. The server code asks the traits, never matches on the personality, so a new
//! personality is an enum variant and one `Traits` value here. Holds no patient data.

use crate::Personality;

/// How a searchset's `next` link looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextLink {
    /// `{base}/Patient?-pageContext={opaque}&-pageDirection=NEXT` (Epic, Cerner).
    PageContext,
    /// `{base}?_getpages={opaque}&_bundletype=searchset` (HAPI-style servers).
    GetPages,
}

/// How generated patient ids look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdStyle {
    /// A long opaque string (Epic).
    Opaque,
    /// A number (Millennium).
    Numeric,
    /// `{prefix}{index:06}`.
    Prefixed(&'static str),
}

/// One personality, as data (SPEC.md's table).
#[derive(Debug, Clone, Copy)]
pub struct Traits {
    /// The adapter registry's name for this vendor.
    pub vendor: &'static str,
    /// Clients are expected to discover the token endpoint from the SMART configuration (which
    /// every personality publishes) rather than configure it.
    pub discovered_token_url: bool,
    /// The FHIR base path; `{tenant}` is replaced by the simulator's tenant id.
    pub base_path: &'static str,
    pub token_path: &'static str,
    pub client_id: &'static str,
    /// Authenticates with a client secret in HTTP Basic (else a private_key_jwt assertion).
    pub client_secret: bool,
    pub token_ttl_s: u64,
    /// Patient search honours `_lastUpdated` (Epic ignores it and needs identifying parameters).
    pub last_updated: bool,
    /// Patient search needs `_id`, `identifier`, or `family` + `birthdate` (Epic).
    pub identifying_params_required: bool,
    /// Accepts `_sort=_lastUpdated` (and refuses any other `_sort`).
    pub sort: bool,
    /// A search parameter every Patient and Coverage search must carry, with the value the
    /// simulator expects (`{tenant}` replaced): athenahealth's `ah-practice`.
    pub required_param: Option<(&'static str, &'static str)>,
    pub max_count: usize,
    pub next_link: NextLink,
    /// SMART v2 scopes (`system/Patient.rs`) accepted beside v1.
    pub v2_scopes: bool,
    /// System-level `$export` (else Group only).
    pub system_export: bool,
    pub mrn_system: &'static str,
    /// A fixed tenant id (else the simulator draws a UUID from its seed).
    pub tenant: Option<&'static str>,
    pub id_style: IdStyle,
}

const EPIC: Traits = Traits {
    vendor: "epic",
    discovered_token_url: false,
    base_path: "/api/FHIR/R4",
    token_path: "/oauth2/token",
    client_id: "sim-epic-client",
    client_secret: false,
    token_ttl_s: 3600,
    last_updated: false,
    identifying_params_required: true,
    sort: false,
    required_param: None,
    max_count: 1000,
    next_link: NextLink::PageContext,
    v2_scopes: false,
    system_export: false,
    mrn_system: "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14",
    id_style: IdStyle::Opaque,
    tenant: None,
};

const CERNER: Traits = Traits {
    vendor: "cerner",
    discovered_token_url: false,
    base_path: "/r4/{tenant}",
    token_path: "/tenants/{tenant}/protocols/oauth2/profiles/smart-v1/token",
    client_id: "sim-cerner-system-account",
    client_secret: true,
    token_ttl_s: 570,
    last_updated: true,
    identifying_params_required: false,
    sort: false,
    required_param: None,
    max_count: 200,
    next_link: NextLink::PageContext,
    v2_scopes: false,
    system_export: false,
    mrn_system: "urn:oid:2.16.840.1.113883.6.1000",
    id_style: IdStyle::Numeric,
    tenant: None,
};

const GENERIC: Traits = Traits {
    vendor: "generic",
    discovered_token_url: true,
    base_path: "/fhir",
    token_path: "/auth/token",
    client_id: "sim-generic-client",
    client_secret: false,
    token_ttl_s: 300,
    last_updated: true,
    identifying_params_required: false,
    sort: true,
    required_param: None,
    max_count: 1000,
    next_link: NextLink::GetPages,
    v2_scopes: true,
    system_export: true,
    mrn_system: "http://example.org/fhir/mrn",
    id_style: IdStyle::Prefixed("sim-"),
    tenant: None,
};

/// athenahealth (athenaOne) FHIR R4: base `/fhir/r4`, token `/oauth2/v1/token`, a client secret
/// in HTTP Basic (its smart-configuration lists `client_secret_basic` and `private_key_jwt`),
/// v1 and v2 scopes, and every search scoped to one practice (tenant) by
/// `ah-practice=Organization/a-1.Practice-{id}` (fhir.athena.io, "Extension: athenahealth
/// Practice"). The tenant here is the practice id `195900` of athenahealth's preview
/// environment. Group-level export only.
const ATHENA: Traits = Traits {
    vendor: "athena",
    discovered_token_url: true,
    base_path: "/fhir/r4",
    token_path: "/oauth2/v1/token",
    client_id: "sim-athena-client",
    client_secret: true,
    token_ttl_s: 300,
    last_updated: true,
    identifying_params_required: false,
    sort: true,
    required_param: Some(("ah-practice", "Organization/a-1.Practice-{tenant}")),
    max_count: 1000,
    next_link: NextLink::GetPages,
    v2_scopes: true,
    system_export: false,
    // Synthetic: athenahealth documents no public MRN system; patients also carry type MR.
    mrn_system: "urn:fhirgate:sim:athena:mrn",
    id_style: IdStyle::Prefixed("a-195900.E-"),
    tenant: Some("195900"),
};

impl Personality {
    /// Every personality, so tools (the sandbox, the pull bench) list them without naming each:
    /// a new one is added here and in [`Personality::traits`] only.
    pub const ALL: [Personality; 4] = [
        Personality::Epic,
        Personality::Cerner,
        Personality::Generic,
        Personality::Athena,
    ];

    pub fn traits(self) -> &'static Traits {
        match self {
            Personality::Epic => &EPIC,
            Personality::Cerner => &CERNER,
            Personality::Generic => &GENERIC,
            Personality::Athena => &ATHENA,
        }
    }
}
