//! The CRD types (`nodetune.dev/v1alpha1`) and the vocabulary shared by the engine and the reports.
//! No I/O here.
mod vocab;

pub use vocab::{KeyState, Scope};
