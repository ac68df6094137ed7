//! The `neutrino.mesh.v1` API shared by the control plane and the proxy.
//!
//! Generated types plus the few facts both ends must agree on: type URLs, the wildcard,
//! and how a resource's version is derived from its content. It must not hold logic of
//! either end.

#![allow(missing_debug_implementations, clippy::all)]

pub mod v1 {
    tonic::include_proto!("neutrino.mesh.v1");
}

pub use v1::*;

/// Subscribing to this name subscribes to every resource of a type.
pub const WILDCARD: &str = "*";

pub mod spiffe;

/// Type URLs, one per resource type.
pub mod type_url {
    pub const SERVICE: &str = "type.neutrino.io/neutrino.mesh.v1.Service";
    pub const ENDPOINTS: &str = "type.neutrino.io/neutrino.mesh.v1.Endpoints";
    pub const CAPACITY: &str = "type.neutrino.io/neutrino.mesh.v1.Capacity";
    pub const TRUST_BUNDLE: &str = "type.neutrino.io/neutrino.mesh.v1.TrustBundle";
    pub const POLICY: &str = "type.neutrino.io/neutrino.mesh.v1.Policy";

    /// The types a proxy subscribes to, config lanes first.
    pub const ALL: [&str; 5] = [SERVICE, ENDPOINTS, POLICY, TRUST_BUNDLE, CAPACITY];

    /// Short name for logs and metrics labels.
    pub fn short(type_url: &str) -> &str {
        type_url.rsplit('.').next().unwrap_or(type_url)
    }
}

/// google.rpc.Code INVALID_ARGUMENT, used in NACKs for validation failures.
pub const CODE_INVALID_ARGUMENT: i32 = 3;

impl resource::Body {
    /// The type URL this body belongs under.
    pub fn type_url(&self) -> &'static str {
        match self {
            resource::Body::Service(_) => type_url::SERVICE,
            resource::Body::Endpoints(_) => type_url::ENDPOINTS,
            resource::Body::Capacity(_) => type_url::CAPACITY,
            resource::Body::TrustBundle(_) => type_url::TRUST_BUNDLE,
            resource::Body::Policy(_) => type_url::POLICY,
        }
    }
}

impl Resource {
    /// Builds a resource whose version is the hash of its encoded body.
    ///
    /// prost encodes fields in field-number order and our maps are BTreeMaps, so equal
    /// content always gives equal bytes, across processes and restarts: that is what
    /// lets a reconnecting proxy skip resources it already holds.
    pub fn with_content_version(name: String, body: resource::Body) -> Self {
        use prost::Message;
        let mut r = Resource { name, version: String::new(), body: Some(body) };
        let hash = xxhash_rust::xxh3::xxh3_64(&r.encode_to_vec());
        r.version = format!("{hash:016x}");
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(port: u32) -> resource::Body {
        resource::Body::Endpoints(Endpoints {
            service: "default/orders".into(),
            endpoints: vec![Endpoint {
                address: "10.0.0.1".into(),
                port,
                labels: [("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())].into_iter().collect(),
                ..Default::default()
            }],
        })
    }

    #[test]
    fn version_is_stable_for_equal_content_and_changes_with_it() {
        let a = Resource::with_content_version("default/orders".into(), endpoints(80));
        let b = Resource::with_content_version("default/orders".into(), endpoints(80));
        let c = Resource::with_content_version("default/orders".into(), endpoints(81));
        assert_eq!(a.version, b.version);
        assert_ne!(a.version, c.version);
        assert_eq!(a.version.len(), 16);
    }

    #[test]
    fn type_url_short_names() {
        assert_eq!(type_url::short(type_url::ENDPOINTS), "Endpoints");
        assert_eq!(endpoints(1).type_url(), type_url::ENDPOINTS);
    }
}
