//! The CapabilityStatement (`GET /fhir/r4/metadata`), generated from the [`FhirApi`] registry at
//! start-up and serialised once.

use std::str::FromStr;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use fhir_sdk::r4b::codes::{
    CapabilityStatementKind, ConditionalDeleteStatus, ConditionalReadStatus, FHIRVersion,
    PublicationStatus, ResourceType, ResourceVersionPolicy, RestfulCapabilityMode, SearchParamType,
};
use fhir_sdk::r4b::resources::{
    CapabilityStatement, CapabilityStatementImplementation, CapabilityStatementRest,
    CapabilityStatementRestInteraction, CapabilityStatementRestResource,
    CapabilityStatementRestResourceInteraction, CapabilityStatementRestResourceOperation,
    CapabilityStatementRestResourceSearchParam, CapabilityStatementSoftware,
};
use fhir_sdk::{DateTime, Instant};

use super::registry::OperationDef;
use super::{FhirApi, FHIR_BASE};
use crate::http::{fhir_json, ApiError};

/// The statement, built once; served as is.
pub struct Capability {
    pub statement: CapabilityStatement,
}

/// Why a registry cannot be described (a programming error caught at start-up).
#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error("`{0}` is not a FHIR resource type")]
    UnknownResourceType(String),
    #[error("`{0}` is not a FHIR search parameter type")]
    UnknownSearchType(String),
    #[error("capability statement: {0}")]
    Build(String),
    #[error("operation `{0}` is declared on `{1}`, which is not registered")]
    OperationWithoutResource(&'static str, &'static str),
}

/// `rest.operation` / `rest.resource.operation` entries of `ops`.
fn operations<'a>(
    ops: impl Iterator<Item = &'a OperationDef>,
) -> Result<Vec<Option<CapabilityStatementRestResourceOperation>>, CapabilityError> {
    ops.map(|op| {
        let mut b = CapabilityStatementRestResourceOperation::builder()
            .name(op.name.to_owned())
            .definition(op.definition.to_owned());
        if let Some(d) = op.documentation {
            b = b.documentation(d.to_owned());
        }
        b.build()
            .map(Some)
            .map_err(|e| CapabilityError::Build(e.to_string()))
    })
    .collect()
}

impl Capability {
    pub fn build(api: &FhirApi, base_url: &str) -> Result<Self, CapabilityError> {
        let build_err = |e: fhir_sdk::BuilderError| CapabilityError::Build(e.to_string());
        for op in &api.operations {
            if let Some(ty) = op.resource_type {
                if !api.resources.iter().any(|r| r.resource_type == ty) {
                    return Err(CapabilityError::OperationWithoutResource(op.name, ty));
                }
            }
        }
        let mut resources = Vec::with_capacity(api.resources.len());
        for def in &api.resources {
            // fhir-sdk maps unknown codes to `_Custom` rather than failing: refuse those.
            let ty = match ResourceType::from_str(def.resource_type) {
                Ok(ResourceType::_Custom(_)) | Err(_) => {
                    return Err(CapabilityError::UnknownResourceType(
                        def.resource_type.into(),
                    ))
                }
                Ok(ty) => ty,
            };
            let mut interactions: Vec<_> = def.interactions().collect();
            interactions.sort();
            interactions.dedup();
            let interaction = interactions
                .into_iter()
                .map(|i| {
                    CapabilityStatementRestResourceInteraction::builder()
                        .code(i.code().to_owned())
                        .build()
                        .map(Some)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(build_err)?;
            let mut search_param = Vec::with_capacity(def.search_params.len());
            for p in &def.search_params {
                let kind = SearchParamType::from_str(p.kind)
                    .map_err(|_| CapabilityError::UnknownSearchType(p.kind.into()))?;
                let mut b = CapabilityStatementRestResourceSearchParam::builder()
                    .name(p.name.to_owned())
                    .r#type(kind);
                if let Some(d) = p.definition {
                    b = b.definition(d.to_owned());
                }
                if let Some(d) = p.documentation {
                    b = b.documentation(d.to_owned());
                }
                search_param.push(Some(b.build().map_err(build_err)?));
            }
            let operation = operations(
                api.operations
                    .iter()
                    .filter(|op| op.resource_type == Some(def.resource_type)),
            )?;
            let mut b = CapabilityStatementRestResource::builder()
                .r#type(ty)
                .interaction(interaction)
                .search_param(search_param)
                .operation(operation);
            if let Some(profile) = def.profile {
                b = b.profile(profile.to_owned());
            }
            if !def.search_includes.is_empty() {
                b = b.search_include(
                    def.search_includes
                        .iter()
                        .map(|i| Some(i.clone()))
                        .collect(),
                );
            }
            if def.versioned {
                b = b
                    .versioning(ResourceVersionPolicy::VersionedUpdate)
                    .read_history(true)
                    .update_create(true)
                    .conditional_create(true)
                    .conditional_read(ConditionalReadStatus::NotSupported)
                    .conditional_update(false)
                    .conditional_delete(ConditionalDeleteStatus::NotSupported);
            }
            resources.push(Some(b.build().map_err(build_err)?));
        }

        let system_interactions = api
            .system_interactions()
            .iter()
            .map(|code| {
                CapabilityStatementRestInteraction::builder()
                    .code((*code).to_owned())
                    .build()
                    .map(Some)
                    .map_err(build_err)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rest = CapabilityStatementRest::builder()
            .mode(RestfulCapabilityMode::Server)
            .documentation("FHIR R4 API of the fhirgate gateway".to_owned())
            .resource(resources)
            .interaction(system_interactions)
            .operation(operations(
                api.operations
                    .iter()
                    .filter(|op| op.resource_type.is_none()),
            )?)
            .build()
            .map_err(build_err)?;
        let version = env!("CARGO_PKG_VERSION");
        let statement = CapabilityStatement::builder()
            .url(format!("{base_url}{FHIR_BASE}/metadata"))
            .version(version.to_owned())
            .name("FhirgateCapabilityStatement".to_owned())
            .title("fhirgate FHIR R4 gateway".to_owned())
            .status(PublicationStatus::Active)
            .date(DateTime::DateTime(Instant(now_seconds())))
            .kind(CapabilityStatementKind::Instance)
            .software(
                CapabilityStatementSoftware::builder()
                    .name("fhirgate".to_owned())
                    .version(version.to_owned())
                    .build()
                    .map_err(build_err)?,
            )
            .implementation(
                CapabilityStatementImplementation::builder()
                    .description("fhirgate FHIR R4 integration gateway".to_owned())
                    .url(format!("{base_url}{FHIR_BASE}"))
                    .build()
                    .map_err(build_err)?,
            )
            .fhir_version(FHIRVersion::N401)
            .format(vec![
                Some("json".to_owned()),
                Some("application/fhir+json".to_owned()),
            ])
            .rest(vec![Some(rest)])
            .build()
            .map_err(build_err)?;
        Ok(Self { statement })
    }
}

fn now_seconds() -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// `GET /fhir/r4/metadata`.
pub async fn metadata(
    req: HttpRequest,
    capability: web::Data<Capability>,
) -> Result<HttpResponse, ApiError> {
    fhir_json(&req, StatusCode::OK, &capability.statement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::{Interaction, OperationDef, ResourceDef, SearchParamDef};

    async fn stub() -> HttpResponse {
        HttpResponse::Ok().finish()
    }

    #[test]
    fn an_empty_registry_declares_no_resources() {
        let cap = Capability::build(&FhirApi::new(), "http://x").unwrap();
        let json = serde_json::to_value(&cap.statement).unwrap();
        assert_eq!(json["fhirVersion"], "4.0.1");
        assert_eq!(json["kind"], "instance");
        assert!(json["rest"][0].get("resource").is_none());
    }

    #[test]
    fn a_registered_resource_is_declared_with_its_interactions_and_search_params() {
        let api = FhirApi::new().resource(
            ResourceDef::new("Patient")
                .interaction(Interaction::SearchType, stub)
                .interaction(Interaction::Read, stub)
                .search_param(SearchParamDef {
                    name: "identifier",
                    kind: "token",
                    definition: None,
                    documentation: None,
                }),
        );
        let cap = Capability::build(&api, "http://x").unwrap();
        let json = serde_json::to_value(&cap.statement).unwrap();
        let resource = &json["rest"][0]["resource"][0];
        assert_eq!(resource["type"], "Patient");
        let codes: Vec<_> = resource["interaction"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["code"].as_str().unwrap())
            .collect();
        assert_eq!(codes, ["read", "search-type"]);
        assert_eq!(resource["searchParam"][0]["name"], "identifier");
        assert_eq!(resource["searchParam"][0]["type"], "token");
    }

    #[test]
    fn operations_are_declared_at_the_system_level_and_on_their_types() {
        let api = FhirApi::new()
            .resource(ResourceDef::new("Patient").interaction(Interaction::Read, stub))
            .resource(ResourceDef::new("Group").interaction(Interaction::Read, stub))
            .operation(OperationDef::system("export", "http://example.org/export"))
            .operation(OperationDef::on_type(
                "Patient",
                "export",
                "http://example.org/patient-export",
            ))
            .operation(OperationDef::on_instance(
                "Group",
                "export",
                "http://example.org/group-export",
            ));
        let cap = Capability::build(&api, "http://x").unwrap();
        let json = serde_json::to_value(&cap.statement).unwrap();
        let rest = &json["rest"][0];
        assert_eq!(rest["operation"][0]["name"], "export");
        assert_eq!(
            rest["operation"][0]["definition"],
            "http://example.org/export"
        );
        assert_eq!(rest["operation"].as_array().unwrap().len(), 1);
        assert_eq!(
            rest["resource"][0]["operation"][0]["definition"],
            "http://example.org/patient-export"
        );
        assert_eq!(
            rest["resource"][1]["operation"][0]["definition"],
            "http://example.org/group-export"
        );

        let orphan = FhirApi::new().operation(OperationDef::on_type("Patient", "x", "http://x"));
        assert!(matches!(
            Capability::build(&orphan, "http://x"),
            Err(CapabilityError::OperationWithoutResource("x", "Patient"))
        ));
    }

    #[test]
    fn an_unknown_resource_type_is_refused_at_start() {
        let api = FhirApi::new()
            .resource(ResourceDef::new("Patientt").interaction(Interaction::Read, stub));
        assert!(matches!(
            Capability::build(&api, "http://x"),
            Err(CapabilityError::UnknownResourceType(_))
        ));
    }
}
