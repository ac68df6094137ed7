//! Watch: discovery sources. Each source turns the world (a mesh file, or the
//! Kubernetes API) into a whole [`MeshState`] and sends it on. Sources must not
//! translate, version or push anything: that is the index's and serve's job.

pub mod file;
pub mod kube;
pub mod kube_policy;
pub mod kube_translate;
pub mod mesh_file;
mod mesh_policy;

use crate::model::MeshState;

/// What a source reports to the index.
#[derive(Debug)]
pub enum SourceEvent {
    /// A complete, valid view of the mesh.
    Updated(MeshState),
    /// The source could not produce a view; the index keeps the last good one.
    Failed(String),
}

/// The discovery sources the control plane can run. An enum, not a trait object: the
/// set is small and closed, and each variant is a concrete type with a plain `run`.
#[derive(Debug)]
pub enum Source {
    File(file::FileSource),
    Kubernetes(self::kube::KubeSource),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::File(f) => format!("mesh file {}", f.path().display()),
            Source::Kubernetes(_) => "kubernetes API".to_string(),
        }
    }

    /// Runs until the receiver is gone.
    pub async fn run(self, events: tokio::sync::mpsc::Sender<SourceEvent>) {
        match self {
            Source::File(f) => f.run(events).await,
            Source::Kubernetes(k) => k.run(events).await,
        }
    }
}
