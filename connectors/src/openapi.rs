//! The HTTP API's OpenAPI 3.1 description, generated from the handlers' `#[utoipa::path]`
//! annotations (each route's path, parameters, body and answers sit on its handler); the
//! runtime adds its admin routes and serves the whole at `/v1/openapi.json`
//! (docs/decisions/0020-openapi.md).

use std::collections::BTreeMap;
use utoipa::openapi::response::{ResponseBuilder, ResponsesBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error answer: a stable code, a message naming the field or object, and the fix.
#[derive(ToSchema)]
#[allow(dead_code)] // Describes the JSON `synapse_error::body` writes; never built in Rust.
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// Stable: `CON002`, `APP012`, … (README, "Error codes").
    code: String,
    /// What failed, naming the field or object.
    message: String,
    /// What the operator or client should do.
    hint: String,
}

/// The error answers every route may give.
pub struct Errors;

impl utoipa::IntoResponses for Errors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                )
                .build()
        };
        ResponsesBuilder::new()
            .response("400", error("a bad parameter or body field, named in the message (`CON002`)"))
            .response("401", error("no token, or not one of api.tokens (`CON004`)"))
            .response("403", error("the token lacks the route's scope or the table (`CON005`)"))
            .response("404", error("no such stream, endpoint, index, node or set (`CON006`)"))
            .response("503", error("busy or not ready yet: retry (the hint says when)"))
            .build()
            .into()
    }
}

/// Adds the bearer-token scheme the routes' `security` names.
pub struct Tokens;

impl Modify for Tokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from `api.tokens`; each route names the scope it needs (stream, endpoints, repair, admin)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The stream and webhook-endpoint routes.
#[derive(OpenApi)]
#[openapi(
    paths(
        crate::api::list_streams,
        crate::api::subscribe,
        crate::api::changes,
        crate::api::snapshot,
        crate::webhook::routes::list,
        crate::webhook::routes::create,
        crate::webhook::routes::show,
        crate::webhook::routes::replace,
        crate::webhook::routes::remove,
        crate::webhook::routes::enable,
        crate::webhook::routes::replay,
        crate::webhook::routes::attempts,
        crate::webhook::routes::dead_letters,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&Tokens)
)]
pub struct ConnectorsApi;
