//! Shared pieces of the packet tests, end-to-end tests and benchmarks.
pub mod apiserver;
pub mod cluster;
pub mod fixture;
pub mod netns;
pub mod packets;
pub mod packets6;
pub mod pinned;
pub mod two_nodes;
