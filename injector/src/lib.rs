//! The Neutrino sidecar injector: a mutating admission webhook and the pure core that
//! `neutrino inject` shares with it.
//!
//! The steps, each in its own module:
//!
//! 1. [`config`]: what is injected (images, sidecar mode, control plane, resources, the
//!    mesh's trust anchors), from flags; [`anchors`] checks the anchors file and re-reads
//!    it when it changes.
//! 2. [`overrides`]: a pod's `config.neutrino.io/*` annotations, checked.
//! 3. [`containers`]: the init container, the proxy container and the token volume, as JSON.
//! 4. [`patch`]: the decision (inject, skip with a reason, already injected) and the JSON
//!    Patch (RFC 6902) over one pod: a pure function.
//! 5. [`uninject`]: the exact reverse, read from the status annotation the patch wrote.
//! 6. [`manifest`]: the same patch over the pod templates of workload manifests
//!    (multi-document YAML), for `neutrino inject` / `neutrino uninject`.
//! 7. [`review`]: AdmissionReview v1 in, AdmissionReview response out: a pure function;
//!    with it, as data, the [`event`] to record when a pod is skipped or denied.
//! 8. `serve` and `tls` (feature `server`, the binary): HTTPS around [`review`];
//!    `recorder` sends the Events to the Kubernetes API off the admission path.
//!
//! Only `recorder` talks to the Kubernetes API, and nothing waits for it: the webhook
//! answers from what it is sent.

pub mod anchors;
pub mod config;
pub mod containers;
pub mod event;
pub mod manifest;
pub mod overrides;
pub mod patch;
#[cfg(feature = "server")]
pub mod recorder;
pub mod review;
#[cfg(feature = "server")]
pub mod serve;
#[cfg(feature = "server")]
pub mod tls;
pub mod uninject;

/// The injector's version, written into `neutrino.io/injected`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The proxy container (a native sidecar init container, or the first container in legacy mode).
pub const PROXY_CONTAINER: &str = "neutrino-proxy";
/// The init container that installs the iptables rules (`neutrino-proxy init`).
pub const INIT_CONTAINER: &str = "neutrino-init";
/// The projected service-account token volume, mounted into the proxy.
pub const TOKEN_VOLUME: &str = "neutrino-token";
/// Where the token volume is mounted in the proxy; the token is the file `token` in it.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/neutrino/tokens";

/// Set on every injected pod: the injector version.
pub const ANNOTATION_INJECTED: &str = "neutrino.io/injected";
/// Set on every injected pod: what was added, as JSON (see [`patch::Status`]); uninject reads it.
pub const ANNOTATION_STATUS: &str = "neutrino.io/status";
/// Set on pods that were not injected: why (see [`patch::SkipReason::code`]).
pub const ANNOTATION_SKIPPED: &str = "neutrino.io/inject-skipped";
/// The pod label that opts a pod out: `neutrino.io/inject: disabled` (or `"false"`).
pub const LABEL_INJECT: &str = "neutrino.io/inject";
/// Prefix of the per-pod override annotations (see [`overrides`]).
pub const CONFIG_PREFIX: &str = "config.neutrino.io/";
/// kubectl's default container for `logs`/`exec`; set in legacy mode, where the proxy is first.
pub const ANNOTATION_DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// The UID the proxy runs as and the iptables rules exempt (`neutrino-proxy init --proxy-uid`;
/// `proxy/src/init/mod.rs`, `DEFAULT_PROXY_UID`).
pub const PROXY_UID: u32 = 1337;
/// The proxy's admin port: `/ready`, `/live` (`proxy/src/lib.rs`, `ADMIN_PORT`).
pub const PROXY_ADMIN_PORT: u16 = 15020;
