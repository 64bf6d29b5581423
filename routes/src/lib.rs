//! The ficus route table: the file operators edit to move a route's clients, one share at a
//! time, from the legacy backend to a new service.
//!
//! Pure logic, no I/O beyond reading the file: parsing ([`config`]), validation with every
//! error located ([`load`]), matching ([`matcher`]), sticky bucketing ([`sticky`]), the routing
//! decision ([`table`]) and its explanation ([`explain`]).

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod explain;
pub mod load;
pub mod matcher;
pub mod path;
pub mod ramp;
pub mod request;
pub mod shadow;
pub mod source;
pub mod sticky;
pub mod table;

pub use error::{LoadError, ValidationError};
pub use explain::explain;
pub use load::Format;
pub use request::{RequestView, SimpleRequest};
pub use sticky::{bucket_of, Sticky, BUCKETS};
pub use table::{
    Backend, BackendId, ClientKey, Decision, Entropy, KeySource, Reason, Route, RouteTable,
};
