//! SMART scopes for backend services (SMART App Launch 2.x, scopes-and-launch-context):
//! v1 `system/Patient.read|write|*` and v2 `system/Patient.cruds` (any ordered subset of c r u d s),
//! with `*` for every resource type. Only the `system/` context applies to backend services.

use std::fmt;

/// One permission letter of SMART v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Permission {
    const fn bit(self) -> u8 {
        match self {
            Permission::Create => 1,
            Permission::Read => 2,
            Permission::Update => 4,
            Permission::Delete => 8,
            Permission::Search => 16,
        }
    }
}

/// A set of permissions, as SMART v2's `cruds` letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Permissions(u8);

impl Permissions {
    pub const ALL: Permissions = Permissions(31);
    /// v1 `read`: read and search.
    pub const V1_READ: Permissions = Permissions(2 | 16);
    /// v1 `write`: create, update, delete.
    pub const V1_WRITE: Permissions = Permissions(1 | 4 | 8);

    pub fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    fn intersect(self, other: Permissions) -> Permissions {
        Permissions(self.0 & other.0)
    }
    fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    /// Parses SMART v2 letters: a non-empty subset of `cruds`, in that order.
    fn parse_v2(letters: &str) -> Option<Permissions> {
        let mut bits = 0u8;
        let mut last = -1i32;
        for c in letters.chars() {
            let (idx, p) = match c {
                'c' => (0, Permission::Create),
                'r' => (1, Permission::Read),
                'u' => (2, Permission::Update),
                'd' => (3, Permission::Delete),
                's' => (4, Permission::Search),
                _ => return None,
            };
            if idx <= last {
                return None;
            }
            last = idx;
            bits |= p.bit();
        }
        (bits != 0).then_some(Permissions(bits))
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (c, p) in [
            ('c', Permission::Create),
            ('r', Permission::Read),
            ('u', Permission::Update),
            ('d', Permission::Delete),
            ('s', Permission::Search),
        ] {
            if self.contains(p) {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// One `system/` scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// A resource type, or `*`.
    pub resource: String,
    pub permissions: Permissions,
    /// The text as written, kept to echo a v1 scope back unchanged when granted whole.
    pub original: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed scope (expected system/<Type|*>.<read|write|*|cruds subset>)")]
pub struct ScopeError;

impl Scope {
    /// Parses one scope. `Ok(None)` for scopes of other contexts (`patient/`, `user/`,
    /// `openid`, `launch`...), which backend services ignore.
    pub fn parse(text: &str) -> Result<Option<Scope>, ScopeError> {
        let Some(rest) = text.strip_prefix("system/") else {
            return Ok(None);
        };
        let (resource, perms) = rest.split_once('.').ok_or(ScopeError)?;
        // Query-style v2 granular scopes (`?category=`) are not supported: refuse, not widen.
        let valid_resource = resource == "*"
            || (!resource.is_empty()
                && resource.len() <= 64
                && resource
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_uppercase())
                && resource.chars().all(|c| c.is_ascii_alphanumeric()));
        if !valid_resource {
            return Err(ScopeError);
        }
        let permissions = match perms {
            "read" => Permissions::V1_READ,
            "write" => Permissions::V1_WRITE,
            "*" => Permissions::ALL,
            v2 => Permissions::parse_v2(v2).ok_or(ScopeError)?,
        };
        Ok(Some(Scope {
            resource: resource.to_owned(),
            permissions,
            original: text.to_owned(),
        }))
    }

    fn render(&self) -> String {
        format!("system/{}.{}", self.resource, self.permissions)
    }
}

/// A set of granted scopes, answering "may this caller do P on type T?".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet(Vec<Scope>);

impl ScopeSet {
    /// Parses a space-separated scope string; scopes of other contexts are dropped.
    pub fn parse(text: &str) -> Result<ScopeSet, ScopeError> {
        let mut scopes = Vec::new();
        for word in text.split_ascii_whitespace() {
            if let Some(scope) = Scope::parse(word)? {
                scopes.push(scope);
            }
        }
        Ok(ScopeSet(scopes))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The permissions granted on `resource` by every scope that covers it.
    fn permissions_on(&self, resource: &str) -> Permissions {
        self.0
            .iter()
            .filter(|s| s.resource == "*" || s.resource == resource)
            .fold(Permissions::default(), |acc, s| acc.union(s.permissions))
    }

    pub fn allows(&self, resource: &str, permission: Permission) -> bool {
        self.permissions_on(resource).contains(permission)
    }

    /// What of `requested` this set allows: each requested scope reduced to the permissions
    /// allowed on its resource type, dropped when nothing is left. A scope granted whole is
    /// echoed as written (so a v1 request reads back as v1).
    pub fn grant(&self, requested: &ScopeSet) -> ScopeSet {
        let mut granted = Vec::new();
        for want in &requested.0 {
            let allowed = if want.resource == "*" {
                // A wildcard request gets what the allowed set grants on every type alike.
                self.0
                    .iter()
                    .filter(|s| s.resource == "*")
                    .fold(Permissions::default(), |acc, s| acc.union(s.permissions))
            } else {
                self.permissions_on(&want.resource)
            };
            let perms = want.permissions.intersect(allowed);
            if perms.is_empty() {
                continue;
            }
            let scope = if perms == want.permissions {
                want.clone()
            } else {
                let mut reduced = Scope {
                    resource: want.resource.clone(),
                    permissions: perms,
                    original: String::new(),
                };
                reduced.original = reduced.render();
                reduced
            };
            granted.push(scope);
        }
        ScopeSet(granted)
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(&s.original)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> ScopeSet {
        ScopeSet::parse(s).unwrap()
    }

    #[test]
    fn a_v1_read_scope_allows_read_and_search_only() {
        let s = set("system/Patient.read");
        assert!(s.allows("Patient", Permission::Read));
        assert!(s.allows("Patient", Permission::Search));
        assert!(!s.allows("Patient", Permission::Create));
        assert!(!s.allows("Coverage", Permission::Read));
    }

    #[test]
    fn a_v2_scope_allows_exactly_its_letters() {
        let s = set("system/Claim.cud");
        assert!(s.allows("Claim", Permission::Create));
        assert!(!s.allows("Claim", Permission::Read));
        assert!(!s.allows("Claim", Permission::Search));
    }

    #[test]
    fn a_wildcard_resource_covers_every_type() {
        let s = set("system/*.write");
        assert!(s.allows("Encounter", Permission::Update));
        assert!(!s.allows("Encounter", Permission::Read));
    }

    #[test]
    fn v2_letters_out_of_order_or_unknown_are_refused() {
        assert!(ScopeSet::parse("system/Patient.sr").is_err());
        assert!(ScopeSet::parse("system/Patient.rx").is_err());
        assert!(ScopeSet::parse("system/Patient.").is_err());
        assert!(ScopeSet::parse("system/patient.read").is_err());
        assert!(ScopeSet::parse("system/Patient.rs?category=x").is_err());
    }

    #[test]
    fn scopes_of_other_contexts_are_ignored() {
        let s = set("openid launch patient/Patient.read system/Patient.rs");
        assert_eq!(s.to_string(), "system/Patient.rs");
    }

    #[test]
    fn the_grant_is_the_intersection_of_requested_and_allowed() {
        let allowed = set("system/Patient.rs system/Claim.cruds");
        let granted = allowed.grant(&set(
            "system/Patient.read system/Claim.rs system/Coverage.read",
        ));
        assert_eq!(granted.to_string(), "system/Patient.read system/Claim.rs");

        let granted = allowed.grant(&set("system/Patient.cruds"));
        assert_eq!(granted.to_string(), "system/Patient.rs");
        assert!(!granted.allows("Patient", Permission::Create));
    }

    #[test]
    fn a_wildcard_request_is_narrowed_to_what_is_allowed_on_every_type() {
        let allowed = set("system/*.rs system/Claim.cruds");
        assert_eq!(allowed.grant(&set("system/*.*")).to_string(), "system/*.rs");
    }
}
