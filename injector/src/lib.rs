//! The Neutrino sidecar injector: a mutating admission webhook.
//!
//! Planned flow (issue 6): `review` decodes an AdmissionReview and decides whether a
//! pod is in scope; `patch` is a pure function from the pod to a JSON patch adding the
//! proxy and its init container. Nothing is implemented yet beyond this skeleton; the
//! binary says so instead of pretending to run.

/// What the binary reports until the webhook is built.
pub const NOT_YET: &str = "neutrino-injector is a skeleton: the admission webhook arrives with the Kubernetes work \
(see ARCHITECTURE.md); use `neutrino-proxy --config-file` or the control plane's mesh file locally";
