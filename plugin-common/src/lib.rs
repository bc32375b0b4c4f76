//! Code shared by warden's own plugins, one copy of each (they were included by path
//! into each plugin before). Not part of the plugin interface: a plugin author outside
//! this repository needs only `warden-plugin-api`.
//!
//! - [`http`] (feature `http`): one HTTP(S) request with a deadline and a size limit
//!   (http-json, prometheus, cloudwatch);
//! - [`redis_client`] (feature `redis`): a Redis client opened as warden opens its own
//!   (redis-metric, redis-services);
//! - [`entry`], [`snapshot`], [`legacy`]: service definitions from JSON, the last good
//!   set of a store read on an interval, the original warden's service files
//!   (file-services, redis-services, dynamodb-services).

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "redis")]
pub mod redis_client;

pub mod entry;
pub mod legacy;
pub mod snapshot;
