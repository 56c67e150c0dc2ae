//! Prefix-RFT adapters: PEFT files in and out ([`peft`]), the versioned store on disk
//! ([`store`]) and the live registry that hands out leases ([`registry`]).

pub mod error;
pub mod peft;
pub mod registry;
pub mod store;
#[doc(hidden)]
pub mod testing;

pub use error::AdapterError;
pub use peft::{AdapterKind, Limits, LoraParams, PeftAdapter, PeftFiles};
pub use registry::{AdapterRegistry, Lease, RegistryConfig, RegistryStats};
pub use store::{AdapterListing, AdapterMeta, AdapterStore, Manifest, NewVersion, Source, Status};
