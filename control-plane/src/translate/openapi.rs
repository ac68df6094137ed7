//! Translate step for OpenAPI documents: a service's document into routes (path
//! template, method, operation id, and what each operation costs, from the
//! `x-neutrino-resources`, `x-neutrino-timeout` and `x-neutrino-retryable` extensions at
//! the operation or path level).
//!
//! Pure: bytes in, routes or a typed error out. Parsing is done by the `openapiv3`
//! crate (OpenAPI 3.0; 3.1 documents as far as it accepts them). It must not read files.

use neutrino_proto as pb;
use openapiv3::{OpenAPI, PathItem, ReferenceOr};
use serde_json::Value;
use thiserror::Error;

use crate::quantity;

/// What a request costs when neither its operation nor its path says.
pub const DEFAULT_COST: pb::ResourceVector = pb::ResourceVector { cpu_millis: 100, memory_bytes: 0, gpu: 0 };

#[derive(Debug, Error, PartialEq)]
pub enum SpecError {
    #[error("not valid {format}: {message}")]
    Syntax { format: &'static str, message: String },
    #[error("unsupported OpenAPI version {0:?}: Neutrino reads 3.0 and 3.1 documents")]
    Version(String),
    #[error("not an OpenAPI document the parser accepts ({version}): {message}")]
    Structure { version: String, message: String },
    #[error("{location}: {message}")]
    Extension { location: String, message: String },
    #[error("{location}: $ref {reference:?} cannot be resolved; only local references (#/...) are supported")]
    Reference { location: String, reference: String },
}

/// Routes of one document plus the service-wide default cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Routes {
    pub routes: Vec<pb::Route>,
    pub default_cost: pb::ResourceVector,
}

/// Parses a JSON or YAML OpenAPI document into routes.
pub fn routes(doc: &[u8]) -> Result<Routes, SpecError> {
    let raw: Value = if doc.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        serde_json::from_slice(doc).map_err(|e| SpecError::Syntax { format: "JSON", message: e.to_string() })?
    } else {
        serde_yaml_ng::from_slice(doc).map_err(|e| SpecError::Syntax { format: "YAML", message: e.to_string() })?
    };
    let version = raw.get("openapi").and_then(Value::as_str).unwrap_or_default().to_string();
    if !(version.starts_with("3.0") || version.starts_with("3.1")) {
        return Err(SpecError::Version(version));
    }
    let mut for_parser = without_schemas(raw.clone());
    if let Some(obj) = for_parser.as_object_mut() {
        // 3.1 made `paths` optional (a document may hold only webhooks).
        obj.entry("paths").or_insert_with(|| Value::Object(Default::default()));
    }
    let api: OpenAPI = serde_json::from_value(for_parser)
        .map_err(|e| SpecError::Structure { version: version.clone(), message: e.to_string() })?;
    let base = base_path(&api);
    let default_cost = match api.extensions.get("x-neutrino-resources") {
        Some(v) => cost(&raw, v, "x-neutrino-resources")?,
        None => DEFAULT_COST,
    };
    let mut routes = Vec::new();
    for (path, item) in &api.paths.paths {
        let location = format!("paths.{path}");
        let item: PathItem = match item {
            ReferenceOr::Item(i) => i.clone(),
            ReferenceOr::Reference { reference } => resolve(&raw, reference, &location)?,
        };
        let template = format!("{base}{path}");
        let path_ext = Extensions::read(&raw, &item.extensions, &location)?;
        for (method, op) in item.iter() {
            let op_location = format!("{location}.{method}");
            let op_ext = Extensions::read(&raw, &op.extensions, &op_location)?;
            routes.push(pb::Route {
                path_template: template.clone(),
                method: method.to_ascii_uppercase(),
                operation_id: op
                    .operation_id
                    .clone()
                    .unwrap_or_else(|| format!("{} {path}", method.to_ascii_uppercase())),
                cost: op_ext.cost.or(path_ext.cost),
                timeout_ms: op_ext.timeout_ms.or(path_ext.timeout_ms).unwrap_or(0),
                retryable: op_ext.retryable.or(path_ext.retryable).unwrap_or(false),
            });
        }
    }
    Ok(Routes { routes, default_cost })
}

/// Routing never looks at schemas, and 3.1 schemas (JSON Schema 2020-12: `type` arrays,
/// `const`, ...) are what `openapiv3` cannot read. Dropping them is what lets 3.1
/// documents through, and makes large 3.0 documents cheaper to parse.
fn without_schemas(mut v: Value) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    if k == "schema" || k == "schemas" {
                        *child = Value::Object(Default::default());
                    } else {
                        strip(child);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

/// The path of the first server URL ("http://petstore.swagger.io/v1" -> "/v1"): apps
/// send it in front of every path. Templated server URLs contribute nothing.
fn base_path(api: &OpenAPI) -> String {
    let Some(url) = api.servers.first().map(|s| s.url.as_str()) else { return String::new() };
    let after_scheme = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    let path = if url.contains("://") { after_scheme.find('/').map(|i| &after_scheme[i..]).unwrap_or("") } else { url };
    if path.contains('{') { String::new() } else { path.trim_end_matches('/').to_string() }
}

/// Resolves a local reference ("#/components/...") against the raw document.
fn resolve<T: serde::de::DeserializeOwned>(raw: &Value, reference: &str, location: &str) -> Result<T, SpecError> {
    let unresolved = || SpecError::Reference { location: location.to_string(), reference: reference.to_string() };
    let pointer = reference.strip_prefix('#').ok_or_else(unresolved)?;
    let target = raw.pointer(pointer).ok_or_else(unresolved)?;
    serde_json::from_value(target.clone())
        .map_err(|e| SpecError::Structure { version: String::new(), message: format!("{location}: {reference}: {e}") })
}

#[derive(Debug, Default)]
struct Extensions {
    cost: Option<pb::ResourceVector>,
    timeout_ms: Option<u64>,
    retryable: Option<bool>,
}

impl Extensions {
    fn read(raw: &Value, ext: &indexmap::IndexMap<String, Value>, location: &str) -> Result<Self, SpecError> {
        let bad = |key: &str, message: String| SpecError::Extension { location: format!("{location}.{key}"), message };
        let mut out = Extensions::default();
        if let Some(v) = ext.get("x-neutrino-resources") {
            out.cost = Some(cost(raw, v, &format!("{location}.x-neutrino-resources"))?);
        }
        if let Some(v) = ext.get("x-neutrino-timeout") {
            out.timeout_ms = Some(duration_ms(v).map_err(|m| bad("x-neutrino-timeout", m))?);
        }
        if let Some(v) = ext.get("x-neutrino-retryable") {
            out.retryable =
                Some(v.as_bool().ok_or_else(|| bad("x-neutrino-retryable", format!("{v} is not true or false")))?);
        }
        Ok(out)
    }
}

/// `{cpu: "500m", memory: "1Gi", gpu: 1}`, or a local `$ref` to such an object.
fn cost(raw: &Value, v: &Value, location: &str) -> Result<pb::ResourceVector, SpecError> {
    let bad = |message: String| SpecError::Extension { location: location.to_string(), message };
    let v = match v.get("$ref").and_then(Value::as_str) {
        Some(r) => &resolve::<Value>(raw, r, location)?,
        None => v,
    };
    let Some(obj) = v.as_object() else {
        return Err(bad(format!("{v} is not an object like {{cpu: \"500m\", memory: \"1Gi\", gpu: 1}}")));
    };
    let mut out = pb::ResourceVector::default();
    for (key, val) in obj {
        let text = match val {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => return Err(bad(format!("{key}: {other} is not a quantity"))),
        };
        let parsed = match key.as_str() {
            "cpu" => quantity::cpu_millis(&text).map(|q| out.cpu_millis = q),
            "memory" => quantity::memory_bytes(&text).map(|q| out.memory_bytes = q),
            "gpu" | "nvidia.com/gpu" => quantity::whole_units(&text).map(|q| out.gpu = q),
            _ => return Err(bad(format!("unknown resource {key:?}; use cpu, memory and gpu"))),
        };
        parsed.map_err(|e| bad(format!("{key}: {e}")))?;
    }
    Ok(out)
}

/// "250ms", "2s", "1m", or a number of milliseconds.
fn duration_ms(v: &Value) -> Result<u64, String> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    let s = v.as_str().ok_or_else(|| format!("{v} is not a duration like \"250ms\" or \"2s\""))?.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like \"250ms\" or \"2s\""))?;
    let factor = match unit {
        "ms" | "" => 1,
        "s" => 1000,
        "m" => 60_000,
        _ => return Err(format!("{s:?} has unknown unit {unit:?}; use ms, s or m")),
    };
    Ok(n * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r##"
openapi: 3.0.3
info: {title: orders, version: "1"}
servers: [{url: "http://orders.shop/api/"}]
x-neutrino-resources: {cpu: 50m}
components:
  x-profiles:
    heavy: {cpu: "2", memory: 4Gi, gpu: 1}
paths:
  /orders:
    x-neutrino-timeout: 2s
    get:
      operationId: listOrders
      x-neutrino-retryable: true
      responses: {"200": {description: ok}}
    post:
      operationId: createOrder
      x-neutrino-resources: {cpu: 500m, memory: 1Gi}
      responses: {"201": {description: created}}
  /orders/{id}/render:
    x-neutrino-resources: {$ref: "#/components/x-profiles/heavy"}
    put:
      operationId: renderOrder
      x-neutrino-timeout: 30000
      responses: {"200": {description: ok}}
"##;

    fn route<'a>(r: &'a Routes, op: &str) -> &'a pb::Route {
        r.routes.iter().find(|x| x.operation_id == op).expect(op)
    }

    #[test]
    fn reads_routes_extensions_and_inheritance() {
        let r = routes(DOC.as_bytes()).expect("valid");
        assert_eq!(r.default_cost, pb::ResourceVector { cpu_millis: 50, memory_bytes: 0, gpu: 0 });
        let list = route(&r, "listOrders");
        assert_eq!((list.path_template.as_str(), list.method.as_str()), ("/api/orders", "GET"));
        assert_eq!((list.timeout_ms, list.retryable, list.cost), (2000, true, None));
        let create = route(&r, "createOrder");
        assert_eq!(create.cost, Some(pb::ResourceVector { cpu_millis: 500, memory_bytes: 1 << 30, gpu: 0 }));
        assert!(!create.retryable);
        let render = route(&r, "renderOrder");
        assert_eq!(render.cost, Some(pb::ResourceVector { cpu_millis: 2000, memory_bytes: 4 << 30, gpu: 1 }));
        assert_eq!(render.timeout_ms, 30_000);
    }

    #[test]
    fn bad_extensions_name_where_and_why() {
        let bad = DOC.replace("cpu: 500m, memory: 1Gi", "cpu: lots");
        let e = routes(bad.as_bytes()).expect_err("bad cpu").to_string();
        assert!(e.starts_with("paths./orders.post.x-neutrino-resources: cpu: invalid quantity \"lots\""), "{e}");
        let bad = DOC.replace("x-neutrino-timeout: 2s", "x-neutrino-timeout: soon");
        assert!(routes(bad.as_bytes()).expect_err("bad timeout").to_string().contains("x-neutrino-timeout"));
        let bad = DOC.replace("#/components/x-profiles/heavy", "#/components/x-profiles/missing");
        assert!(matches!(routes(bad.as_bytes()), Err(SpecError::Reference { .. })));
    }

    #[test]
    fn rejects_what_is_not_openapi_3() {
        assert!(matches!(routes(b"swagger: '2.0'\n"), Err(SpecError::Version(_))));
        assert!(matches!(routes(b"{not json"), Err(SpecError::Syntax { format: "JSON", .. })));
        assert!(matches!(routes(b"openapi: 3.0.0\npaths: 7\n"), Err(SpecError::Structure { .. })));
    }

    fn shared(name: &str) -> Vec<u8> {
        let path = format!("{}/../../shared/testdata/openapi/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (the shared test data sits beside the repo)"))
    }

    #[test]
    fn parses_the_shared_real_world_documents() {
        // (file, operations) as counted in ../shared/testdata/README.md.
        for (file, ops) in [
            ("petstore.yaml", 3),
            ("petstore-expanded.yaml", 4),
            ("ory-kratos-v26.2.0.json", 56),
            ("twilio_api_v2010.json", 197),
            ("adyen-BalancePlatformService-v2.yaml", 91),
            ("kubernetes-v1.35-api__v1_openapi.json", 248),
            ("webhook-example-3.1.yaml", 0),
        ] {
            let r = routes(&shared(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(r.routes.len(), ops, "{file}");
            assert!(r.routes.iter().all(|r| r.path_template.starts_with('/')), "{file}");
        }
        let pets = routes(&shared("petstore.yaml")).expect("petstore");
        assert_eq!(route(&pets, "showPetById").path_template, "/v1/pets/{petId}");
        let expanded = routes(&shared("petstore-expanded.yaml")).expect("expanded");
        assert_eq!(route(&expanded, "find pet by id").method, "GET");
    }
}
