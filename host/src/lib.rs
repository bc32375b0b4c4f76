//! warden: keeps a container host's router in step with its containers, and lets one
//! elected host scale the cluster's ECS tasks from a metric.
//!
//! This library holds everything but argument parsing, so that tests drive the same code
//! the daemon runs. Parts: [`config`] (pure parsing of the TOML config and environment),
//! [`plugins`] (loading `.so` plugins and calling them safely), [`registrar`]
//! (containers → routes in the local Redis → router → ELB), [`logging`].

pub mod aws;
pub mod backoff;
pub mod config;
pub mod daemon;
pub mod grants;
pub mod http;
pub mod identity;
pub mod logging;
pub mod logs;
pub mod manager;
pub mod metrics;
pub mod plugins;
pub mod redis_link;
pub mod redis_util;
pub mod registrar;
pub mod routes;
pub mod status;
pub mod supervisor;
