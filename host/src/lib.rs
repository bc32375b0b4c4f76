//! warden: keeps a container host's router in step with its containers, and lets one
//! elected host scale the cluster's ECS tasks from a metric.
//!
//! The binary is one call into [`cli`], so that tests drive the same code the daemon
//! runs. Parts: [`config`] (pure parsing of the TOML config and environment),
//! [`plugins`] (loading `.so` plugins and calling them safely), [`registrar`]
//! (containers → routes in the local Redis → router → ELB), [`manager`] (the lease and
//! the scaling), [`daemon`] (the composition root: wires them and reloads them),
//! [`cli`] (the one-shot commands), [`logging`].
//!
//! Only what the tests and benchmarks drive is public (`cli`, `config`, `plugins`,
//! `registrar`); every other module is the crate's own, so that dead code shows.

pub(crate) mod aws;
pub(crate) mod backoff;
pub mod cli;
pub mod config;
pub(crate) mod daemon;
pub(crate) mod grants;
pub(crate) mod http;
pub(crate) mod identity;
pub(crate) mod logging;
pub(crate) mod logs;
pub(crate) mod manager;
pub(crate) mod metrics;
pub mod plugins;
pub(crate) mod redis_link;
pub(crate) mod redis_util;
pub mod registrar;
pub(crate) mod routes;
pub(crate) mod status;
pub(crate) mod supervisor;
