//! The index's memory of OpenAPI routes: documents parsed once per content (parsing a
//! 2 MB document is the most expensive thing the index does), and each service's last
//! good routes, kept when its document later fails to parse or read.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::model::MeshState;
use crate::translate::openapi::{self, Routes};

#[derive(Debug, Default)]
pub struct SpecRoutes {
    /// origin -> (content hash, parse result).
    parsed: HashMap<String, (u64, Result<Arc<Routes>, String>)>,
    last_good: HashMap<String, Arc<Routes>>,
}

/// Routes per service, and the services whose document is broken (with why).
#[derive(Debug, Default)]
pub struct Resolved {
    pub routes: BTreeMap<String, Arc<Routes>>,
    pub errors: BTreeMap<String, String>,
}

impl SpecRoutes {
    pub fn resolve(&mut self, mesh: &MeshState) -> Resolved {
        let mut out = Resolved::default();
        for (key, svc) in &mesh.services {
            let Some(origin) = &svc.openapi else {
                self.last_good.remove(key);
                continue;
            };
            let result = match mesh.specs.get(origin) {
                None => Err(format!("OpenAPI document {origin} was not read")),
                Some(Err(why)) => Err(why.clone()),
                Some(Ok(bytes)) => {
                    let hash = xxhash_rust::xxh3::xxh3_64(bytes);
                    match self.parsed.get(origin) {
                        Some((h, r)) if *h == hash => r.clone(),
                        _ => {
                            let r = openapi::routes(bytes)
                                .map(Arc::new)
                                .map_err(|e| format!("OpenAPI document {origin}: {e}"));
                            self.parsed.insert(origin.clone(), (hash, r.clone()));
                            r
                        }
                    }
                }
            };
            match result {
                Ok(routes) => {
                    self.last_good.insert(key.clone(), Arc::clone(&routes));
                    out.routes.insert(key.clone(), routes);
                }
                Err(why) => {
                    if let Some(good) = self.last_good.get(key) {
                        out.routes.insert(key.clone(), Arc::clone(good));
                    }
                    out.errors.insert(key.clone(), why);
                }
            }
        }
        // Forget documents and services that are gone.
        self.parsed.retain(|origin, _| mesh.specs.contains_key(origin));
        self.last_good.retain(|key, _| mesh.services.contains_key(key));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::mesh_file;
    use std::path::Path;

    const DOC: &str = "openapi: 3.0.0\ninfo: {title: t, version: '1'}\npaths:\n  /a:\n    get: {operationId: getA, responses: {'200': {description: ok}}}\n";

    fn mesh(doc: Result<&str, &str>) -> MeshState {
        let text =
            "services:\n- name: a\n  ports: [{port: 80}]\n  openapi: /specs/a.yaml\n- name: b\n  ports: [{port: 81}]\n";
        let mut m = mesh_file::parse(Path::new("/m.yaml"), text.as_bytes()).expect("valid");
        m.specs.insert("/specs/a.yaml".into(), doc.map(|d| Arc::from(d.as_bytes())).map_err(str::to_string));
        m
    }

    #[test]
    fn a_broken_document_keeps_the_last_good_routes_and_says_why() {
        let mut specs = SpecRoutes::default();
        let good = specs.resolve(&mesh(Ok(DOC)));
        assert_eq!(good.routes["default/a"].routes[0].operation_id, "getA");
        assert!(good.errors.is_empty());
        assert!(!good.routes.contains_key("default/b"), "no document, no routes");

        let broken = specs.resolve(&mesh(Ok("openapi: 3.0.0\npaths: [")));
        assert_eq!(broken.routes["default/a"], good.routes["default/a"], "last good kept");
        assert!(broken.errors["default/a"].starts_with("OpenAPI document /specs/a.yaml: not valid YAML"));

        let unreadable = specs.resolve(&mesh(Err("reading OpenAPI document /specs/a.yaml: gone")));
        assert_eq!(unreadable.routes["default/a"], good.routes["default/a"]);
        assert!(unreadable.errors["default/a"].contains("gone"));
    }

    #[test]
    fn a_document_is_parsed_once_per_content() {
        let mut specs = SpecRoutes::default();
        let a = specs.resolve(&mesh(Ok(DOC)));
        let b = specs.resolve(&mesh(Ok(DOC)));
        assert!(Arc::ptr_eq(&a.routes["default/a"], &b.routes["default/a"]));
    }
}
