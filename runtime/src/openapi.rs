//! `GET /v1/openapi.json`: the HTTP API's OpenAPI 3.1 description, generated from the
//! handlers' `#[utoipa::path]` annotations — the admin routes here, the stream and endpoint
//! routes from `synapse_connectors::openapi` (docs/decisions/0020-openapi.md). Served without
//! a token: it describes the routes, holds no data.

use std::sync::OnceLock;
use synapse_connectors::openapi::ConnectorsApi;
use utoipa::OpenApi;

/// The routes `synapse run` adds.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "SynapseDB",
        description = "Change streams, webhook endpoints, vector indexes and the admin plane of a SynapseDB process. \
                       Every route but this document needs `Authorization: Bearer <token>` with the scope it names; \
                       errors are `{\"error\": {\"code\", \"message\", \"hint\"}}`."
    ),
    paths(
        crate::admin::topology,
        crate::admin::components,
        crate::admin::resume,
        crate::admin::audit_log,
        crate::conflicts::list,
        crate::positions::list,
        crate::positions::wait,
        crate::repair::check_route,
        crate::repair::fix_route,
        crate::resharding::status,
        crate::resharding::step,
        crate::mesh_membership::status,
        crate::mesh_membership::request_join,
        crate::mesh_membership::request_leave,
        crate::vector_indexes::show,
        crate::vector_indexes::search,
        document_route,
    ),
    components(schemas(crate::repair::RepairRequest)),
    tags(
        (name = "streams", description = "Change events as JSON lines or Server-Sent Events, resumable by cursor"),
        (name = "endpoints", description = "Signed webhook endpoints"),
        (name = "indexes", description = "Vector indexes kept in sync with a table"),
        (name = "positions", description = "Reads at a cut: where captures and appliers are"),
        (name = "components", description = "What runs, its state, errors and fixes"),
        (name = "mesh", description = "Multi-region mesh membership and conflicts"),
        (name = "shards", description = "Shard sets and their online moves"),
        (name = "repair", description = "Merkle anti-entropy checks and fixes"),
    )
)]
struct AdminApi;

/// The whole document, made once.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = AdminApi::openapi();
        doc.merge(ConnectorsApi::openapi());
        doc.to_pretty_json().unwrap_or_default()
    })
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "components", security(()),
    responses((status = 200, description = "the OpenAPI 3.1 document", body = Object)))]
pub(crate) async fn document_route() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], document())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Every `.route("…", method(…))` in the sources of the API listener's routers is an
    /// operation of the document (a new route without its annotation fails here). The ops
    /// listener (`/metrics`, `/livez`, `/readyz`) and the sample webhook receiver are other
    /// servers.
    #[test]
    fn every_route_is_in_the_document() {
        let doc: Value = serde_json::from_str(document()).unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let files = [
            "runtime/src/admin.rs",
            "runtime/src/repair.rs",
            "connectors/src/api.rs",
            "connectors/src/webhook/routes.rs",
        ];
        let mut routes = 0;
        for f in files {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            // Each `.route(` call's arguments, up to its closing parenthesis.
            for chunk in text.split(".route(").skip(1) {
                let mut depth = 1;
                let end = chunk
                    .char_indices()
                    .find(|(_, c)| {
                        depth += match c {
                            '(' => 1,
                            ')' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .map_or(chunk.len(), |(i, _)| i);
                let chunk = &chunk[..end];
                let Some(path) = chunk.trim_start().strip_prefix('"').and_then(|p| p.split('"').next()) else {
                    continue;
                };
                for method in ["get", "post", "put", "delete", "patch"] {
                    let called = chunk.contains(&format!(" {method}("))
                        || chunk.contains(&format!(".{method}("))
                        || chunk.contains(&format!("::{method}("));
                    if called {
                        routes += 1;
                        assert!(
                            doc["paths"][path][method].is_object(),
                            "{method} {path} ({f}) is routed but not in /v1/openapi.json: annotate its handler with #[utoipa::path] and list it in the document"
                        );
                    }
                }
            }
        }
        assert!(routes >= 30, "found {routes} routes: the scan no longer reads the routers");
    }

    /// Every operation but the document itself names its token scope and its answers.
    #[test]
    fn operations_name_their_scope_and_answers() {
        let doc: Value = serde_json::from_str(document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["components"]["securitySchemes"]["token"].is_object());
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                assert!(op["responses"]["200"].is_object() || op["responses"]["201"].is_object(), "{method} {path}");
                assert!(op["tags"].is_array(), "{method} {path}: no tag");
                if path != "/v1/openapi.json" {
                    let scope = &op["security"][0]["token"][0];
                    assert!(scope.is_string(), "{method} {path}: no token scope");
                    assert!(op["responses"]["401"].is_object(), "{method} {path}: its error answers");
                }
            }
        }
    }
}
