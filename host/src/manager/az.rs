//! Availability Zone states from EC2, refreshed every 10 s by a task of its own so that a
//! slow EC2 API never delays an election tick. An AZ is unavailable only on positive
//! knowledge: an EC2 error, or an AZ that EC2 does not list, counts as available.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::logs::Repeated;

#[derive(Clone, Default)]
pub(crate) struct AzCache(Arc<RwLock<BTreeMap<String, String>>>);

impl AzCache {
    /// Starts the refresher (none without an EC2 client: every AZ counts as available);
    /// it is stopped when the returned task is dropped.
    pub(crate) fn start(
        ec2: Option<Arc<warden_aws_query::Ec2>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> (AzCache, Option<crate::supervisor::Owned>) {
        let cache = AzCache::default();
        let Some(ec2) = ec2 else {
            return (cache, None);
        };
        let c = cache.clone();
        let task = tokio::spawn(async move {
            let mut errors = Repeated::new("AZ check: EC2 DescribeAvailabilityZones");
            loop {
                match ec2.describe_availability_zones().await {
                    Ok(zones) => {
                        errors.cleared();
                        c.set(zones.into_iter().map(|z| (z.name, z.state)).collect());
                    }
                    Err(e) => errors.failed(&e.to_string()),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
        (cache, Some(crate::supervisor::Owned(task)))
    }

    pub(crate) fn set(&self, states: BTreeMap<String, String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = states;
    }

    pub(crate) fn available(&self, az: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(az)
            .is_none_or(|s| s == "available")
    }
}
