//! The registry of FHIR interactions. A resource is declared once, with a handler per
//! interaction; the registry derives both the routes (FHIR R4 http.html URL patterns) and the
//! CapabilityStatement from that declaration, so the two cannot drift apart.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::http::{header, Method};
use actix_web::{web, FromRequest, Handler, HttpResponse, Responder, Route};

use actix_web::middleware::from_fn;

use super::resources::Kind;
use crate::gate::middleware::require_scope;
use crate::gate::Permission;
use crate::http::ApiError;

/// The type-level and instance-level interactions of FHIR R4 (CapabilityStatement
/// `rest.resource.interaction.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Interaction {
    Read,
    Vread,
    Update,
    Patch,
    Delete,
    HistoryInstance,
    HistoryType,
    Create,
    SearchType,
}

impl Interaction {
    pub fn code(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::Delete => "delete",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::Create => "create",
            Interaction::SearchType => "search-type",
        }
    }

    /// The SMART permission the interaction needs.
    pub fn permission(self) -> Permission {
        match self {
            Interaction::Read
            | Interaction::Vread
            | Interaction::HistoryInstance
            | Interaction::HistoryType => Permission::Read,
            Interaction::Update | Interaction::Patch => Permission::Update,
            Interaction::Delete => Permission::Delete,
            Interaction::Create => Permission::Create,
            Interaction::SearchType => Permission::Search,
        }
    }

    /// Path suffixes (after `/{type}`) and methods that carry this interaction.
    fn routes(self) -> &'static [(&'static str, Method)] {
        match self {
            Interaction::Read => &[("/{id}", Method::GET)],
            Interaction::Vread => &[("/{id}/_history/{vid}", Method::GET)],
            Interaction::Update => &[("/{id}", Method::PUT)],
            Interaction::Patch => &[("/{id}", Method::PATCH)],
            Interaction::Delete => &[("/{id}", Method::DELETE)],
            Interaction::HistoryInstance => &[("/{id}/_history", Method::GET)],
            Interaction::HistoryType => &[("/_history", Method::GET)],
            Interaction::Create => &[("", Method::POST)],
            // Search by GET, and by POST with a form body so PHI need not travel in URLs.
            Interaction::SearchType => &[("", Method::GET), ("/_search", Method::POST)],
        }
    }
}

/// A search parameter a resource supports (name and FHIR search type, e.g. `token`, `date`).
#[derive(Debug, Clone)]
pub struct SearchParamDef {
    pub name: &'static str,
    pub kind: &'static str,
    pub definition: Option<&'static str>,
    pub documentation: Option<&'static str>,
}

type RouteFactory = Arc<dyn Fn() -> Route + Send + Sync>;

/// One resource type and the handlers of the interactions it supports.
#[derive(Clone)]
pub struct ResourceDef {
    pub(crate) resource_type: &'static str,
    pub(crate) profile: Option<&'static str>,
    pub(crate) interactions: Vec<(Interaction, RouteFactory)>,
    pub(crate) search_params: Vec<SearchParamDef>,
    /// `_include` values the search supports (`Claim:patient`).
    pub(crate) search_includes: Vec<String>,
    pub(crate) versioned: bool,
    /// The [`Kind`] under which the resource store keeps resources of this type, when it does
    /// (bulk export reads every such type).
    pub(crate) kind: Option<&'static Kind>,
}

impl ResourceDef {
    pub fn new(resource_type: &'static str) -> Self {
        Self {
            resource_type,
            profile: None,
            interactions: Vec::new(),
            search_params: Vec::new(),
            search_includes: Vec::new(),
            versioned: false,
            kind: None,
        }
    }

    /// Declares that resources of the type live in the resource store under `kind`.
    pub fn stored_as(mut self, kind: &'static Kind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// Declares the resource versioned with the behaviour of `fhir::resources`: version-aware
    /// updates (`If-Match`), history, update-as-create and conditional create
    /// (`If-None-Exist`); no conditional read, update or delete.
    pub fn versioned(mut self) -> Self {
        self.versioned = true;
        self
    }

    pub fn profile(mut self, url: &'static str) -> Self {
        self.profile = Some(url);
        self
    }

    /// Serves `interaction` with `handler` (any actix handler).
    pub fn interaction<F, Args>(mut self, interaction: Interaction, handler: F) -> Self
    where
        F: Handler<Args> + Send + Sync,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.interactions.push((
            interaction,
            Arc::new(move || web::route().to(handler.clone())),
        ));
        self
    }

    pub fn search_param(mut self, param: SearchParamDef) -> Self {
        self.search_params.push(param);
        self
    }

    pub fn search_include(mut self, include: String) -> Self {
        self.search_includes.push(include);
        self
    }

    pub fn interactions(&self) -> impl Iterator<Item = Interaction> + '_ {
        self.interactions.iter().map(|(i, _)| *i)
    }
}

/// A FHIR operation (`$name`) at the system level (`/$name`), on a type (`/{type}/$name`) or
/// on an instance (`/{type}/{id}/$name`). It is declared in the CapabilityStatement
/// (`rest.operation` or the type's `rest.resource.operation`) and routed like an interaction.
#[derive(Clone)]
pub struct OperationDef {
    pub(crate) name: &'static str,
    pub(crate) definition: &'static str,
    pub(crate) documentation: Option<&'static str>,
    /// The type a type- or instance-level operation belongs to.
    pub(crate) resource_type: Option<&'static str>,
    /// The path under the FHIR base.
    pub(crate) path: String,
    /// Checked on `resource_type` before the handler runs. A system-level operation has no type
    /// to check: its handler checks what it touches.
    pub(crate) permission: Option<Permission>,
    pub(crate) routes: Vec<(Method, RouteFactory)>,
}

impl OperationDef {
    /// `/$name`.
    pub fn system(name: &'static str, definition: &'static str) -> Self {
        Self::at(None, format!("/${name}"), name, definition)
    }

    /// `/{type}/$name`.
    pub fn on_type(
        resource_type: &'static str,
        name: &'static str,
        definition: &'static str,
    ) -> Self {
        Self::at(
            Some(resource_type),
            format!("/{resource_type}/${name}"),
            name,
            definition,
        )
    }

    /// `/{type}/{id}/$name`.
    pub fn on_instance(
        resource_type: &'static str,
        name: &'static str,
        definition: &'static str,
    ) -> Self {
        Self::at(
            Some(resource_type),
            format!("/{resource_type}/{{id}}/${name}"),
            name,
            definition,
        )
    }

    fn at(
        resource_type: Option<&'static str>,
        path: String,
        name: &'static str,
        definition: &'static str,
    ) -> Self {
        Self {
            name,
            definition,
            documentation: None,
            resource_type,
            path,
            permission: None,
            routes: Vec::new(),
        }
    }

    pub fn documentation(mut self, text: &'static str) -> Self {
        self.documentation = Some(text);
        self
    }

    /// Refuses callers without `permission` on the operation's type (403) before the handler.
    pub fn requires(mut self, permission: Permission) -> Self {
        self.permission = Some(permission);
        self
    }

    /// Serves the operation invoked with `method` with `handler`.
    pub fn handler<F, Args>(mut self, method: Method, handler: F) -> Self
    where
        F: Handler<Args> + Send + Sync,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.routes
            .push((method, Arc::new(move || web::route().to(handler.clone()))));
        self
    }
}

/// Everything served under the FHIR base.
#[derive(Clone, Default)]
pub struct FhirApi {
    pub(crate) resources: Vec<ResourceDef>,
    /// System-level interactions (`transaction`, `batch`) and the handler of `POST [base]`
    /// that serves them; each entry is checked against the scopes by the handler.
    pub(crate) system: Option<(Vec<&'static str>, usize, RouteFactory)>,
    pub(crate) operations: Vec<OperationDef>,
    /// Routes serving what an operation started (an asynchronous job's status, its output
    /// files): behind the same gate and audit as the rest, but not interactions of their own,
    /// so not in the CapabilityStatement.
    pub(crate) job_routes: Vec<(String, Method, RouteFactory)>,
}

impl FhirApi {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn resource(mut self, def: ResourceDef) -> Self {
        self.resources.push(def);
        self
    }

    /// Serves the system-level `interactions` (`transaction`, `batch`) with `handler` at
    /// `POST [base]`, accepting bodies of up to `max_body` bytes.
    pub fn system<F, Args>(
        mut self,
        interactions: &[&'static str],
        max_body: usize,
        handler: F,
    ) -> Self
    where
        F: Handler<Args> + Send + Sync,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.system = Some((
            interactions.to_vec(),
            max_body,
            Arc::new(move || web::route().to(handler.clone())),
        ));
        self
    }

    pub fn system_interactions(&self) -> &[&'static str] {
        self.system
            .as_ref()
            .map_or(&[], |(codes, _, _)| codes.as_slice())
    }

    pub fn resources(&self) -> &[ResourceDef] {
        &self.resources
    }

    /// Declares an operation (system, type or instance level).
    pub fn operation(mut self, op: OperationDef) -> Self {
        self.operations.push(op);
        self
    }

    pub fn operations(&self) -> &[OperationDef] {
        &self.operations
    }

    /// Serves `path` (under the base) with `handler` for an operation's asynchronous job: any
    /// authenticated caller reaches the handler, which decides what the caller may see.
    pub fn job_route<F, Args>(mut self, path: &str, method: Method, handler: F) -> Self
    where
        F: Handler<Args> + Send + Sync,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.job_routes.push((
            path.to_owned(),
            method,
            Arc::new(move || web::route().to(handler.clone())),
        ));
        self
    }

    /// The kinds of every type the resource store keeps, in declaration order.
    pub fn stored_kinds(&self) -> impl Iterator<Item = &'static Kind> + '_ {
        self.resources.iter().filter_map(|def| def.kind)
    }

    /// Registers `metadata` and every declared interaction, each behind the scope check of its
    /// permission; each path answers other methods with 405 and an `Allow` header.
    pub fn configure(&self, cfg: &mut web::ServiceConfig) {
        let mut by_path: BTreeMap<String, Vec<(Method, Route)>> = BTreeMap::new();
        by_path
            .entry("/metadata".to_owned())
            .or_default()
            .push((Method::GET, web::route().to(super::capability::metadata)));
        if let Some((_, _, factory)) = &self.system {
            for path in ["", "/"] {
                by_path
                    .entry(path.to_owned())
                    .or_default()
                    .push((Method::POST, factory()));
            }
        }
        for def in &self.resources {
            let resource_type = def.resource_type;
            for (interaction, factory) in &def.interactions {
                let permission = interaction.permission();
                for (suffix, method) in interaction.routes() {
                    let route = factory().wrap(from_fn(move |req, next| {
                        require_scope(resource_type, permission, req, next)
                    }));
                    by_path
                        .entry(format!("/{resource_type}{suffix}"))
                        .or_default()
                        .push((method.clone(), route));
                }
            }
        }
        for op in &self.operations {
            for (method, factory) in &op.routes {
                let route = match (op.resource_type, op.permission) {
                    (Some(resource_type), Some(permission)) => {
                        factory().wrap(from_fn(move |req, next| {
                            require_scope(resource_type, permission, req, next)
                        }))
                    }
                    _ => factory(),
                };
                by_path
                    .entry(op.path.clone())
                    .or_default()
                    .push((method.clone(), route));
            }
        }
        for (path, method, factory) in &self.job_routes {
            by_path
                .entry(path.clone())
                .or_default()
                .push((method.clone(), factory()));
        }
        for (path, routes) in by_path {
            let allow = routes
                .iter()
                .map(|(m, _)| m.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let mut resource = web::resource(path.as_str());
            if let Some((_, max_body, _)) = self.system.as_ref().filter(|_| path.len() <= 1) {
                resource = resource.app_data(web::PayloadConfig::new(*max_body));
            }
            for (method, route) in routes {
                resource = resource.route(route.method(method));
            }
            resource = resource.default_service(web::to(move |req: actix_web::HttpRequest| {
                let allow = allow.clone();
                async move { method_not_allowed(req.method(), &allow) }
            }));
            cfg.service(resource);
        }
    }
}

fn method_not_allowed(method: &Method, allow: &str) -> HttpResponse {
    let mut res = actix_web::ResponseError::error_response(&ApiError::MethodNotAllowed(
        crate::ops::metrics::method_label(method).to_owned(),
    ));
    if let Ok(value) = header::HeaderValue::from_str(allow) {
        res.headers_mut().insert(header::ALLOW, value);
    }
    res
}

#[cfg(test)]
mod tests {
    use actix_web::middleware::from_fn;
    use actix_web::{test, App, HttpMessage, HttpResponse};

    use super::*;
    use crate::domain::ResourceId;
    use crate::gate::{Caller, Role, ScopeSet};

    async fn ok() -> HttpResponse {
        HttpResponse::Ok().finish()
    }

    fn api() -> FhirApi {
        FhirApi::new().resource(
            ResourceDef::new("Patient")
                .interaction(Interaction::Read, ok)
                .interaction(Interaction::Create, ok)
                .interaction(Interaction::SearchType, ok),
        )
    }

    /// Serves the registry as if authenticated with `scopes`.
    async fn call(scopes: &'static str, req: test::TestRequest) -> u16 {
        let app = test::init_service(App::new().configure(|cfg| api().configure(cfg)).wrap(
            from_fn(
                move |req: actix_web::dev::ServiceRequest, next: actix_web::middleware::Next<_>| {
                    req.extensions_mut().insert(Caller {
                        client_id: "c".into(),
                        practice_id: ResourceId::parse("p", "p1").unwrap(),
                        role: Role::ExternalSystem,
                        scopes: ScopeSet::parse(scopes).unwrap(),
                    });
                    next.call(req)
                },
            ),
        ))
        .await;
        test::call_service(&app, req.to_request())
            .await
            .status()
            .as_u16()
    }

    #[actix_web::test]
    async fn each_interaction_is_checked_against_its_own_permission() {
        let read = || test::TestRequest::get().uri("/Patient/1");
        let search_get = || test::TestRequest::get().uri("/Patient");
        let search_post = || test::TestRequest::post().uri("/Patient/_search");
        let create = || test::TestRequest::post().uri("/Patient");

        assert_eq!(call("system/Patient.r", read()).await, 200);
        assert_eq!(call("system/Patient.r", search_get()).await, 403);
        assert_eq!(call("system/Patient.s", search_get()).await, 200);
        assert_eq!(call("system/Patient.s", search_post()).await, 200);
        assert_eq!(call("system/Patient.rs", create()).await, 403);
        assert_eq!(call("system/Patient.c", create()).await, 200);
        assert_eq!(call("system/Coverage.cruds", read()).await, 403);
        assert_eq!(call("system/*.read", read()).await, 200);
    }

    #[actix_web::test]
    async fn operations_check_their_type_permission_and_job_routes_leave_it_to_the_handler() {
        let api = api()
            .operation(
                OperationDef::on_type("Patient", "export", "http://x/patient-export")
                    .requires(Permission::Read)
                    .handler(Method::GET, ok),
            )
            .operation(OperationDef::system("export", "http://x/export").handler(Method::GET, ok))
            .job_route("/$export-status/{id}", Method::GET, ok);
        let app = test::init_service(App::new().configure(|cfg| api.configure(cfg)).wrap(from_fn(
            move |req: actix_web::dev::ServiceRequest, next: actix_web::middleware::Next<_>| {
                req.extensions_mut().insert(Caller {
                    client_id: "c".into(),
                    practice_id: ResourceId::parse("p", "p1").unwrap(),
                    role: Role::ExternalSystem,
                    scopes: ScopeSet::parse("system/Coverage.rs").unwrap(),
                });
                next.call(req)
            },
        )))
        .await;
        let status = |uri: &'static str| {
            let app = &app;
            async move {
                test::call_service(app, test::TestRequest::get().uri(uri).to_request())
                    .await
                    .status()
                    .as_u16()
            }
        };
        assert_eq!(status("/Patient/$export").await, 403);
        assert_eq!(status("/$export").await, 200);
        assert_eq!(status("/$export-status/j1").await, 200);
    }

    #[actix_web::test]
    async fn an_undeclared_method_is_405_with_the_declared_ones_in_allow() {
        let app = test::init_service(App::new().configure(|cfg| api().configure(cfg))).await;
        let res = test::call_service(
            &app,
            test::TestRequest::delete().uri("/Patient/1").to_request(),
        )
        .await;
        assert_eq!(res.status(), 405);
        assert_eq!(res.headers().get(header::ALLOW).unwrap(), "GET");
    }
}
