//! warden: keeps a container host's router in step with its containers, and lets one
//! elected host scale the cluster's ECS tasks from a metric.
//!
//! The binary is one call into [`cli`], so that tests drive the same code the daemon
//! runs. Parts: [`config`] (pure parsing of the TOML config and environment),
//! [`plugins`] (loading `.so` plugins and calling them safely), [`registrar`]
//! (containers → routes in the local Redis → router → ELB), [`manager`] (the lease and
//! the scaling), [`daemon`] (the composition root: wires them and reloads them),
//! [`cli`] (the one-shot commands), [`logging`].

pub mod aws;
pub mod backoff;
pub mod cli;
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
