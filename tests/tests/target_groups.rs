//! ELBv2 target groups (moto): the host joins an `instance` group by instance id and an
//! `ip` group by private IP, with the service's router port, beside a classic ELB on the
//! same service; nothing changes across a restart; it leaves after the drain, and the
//! group's deregistration delay is waited out; a 5xx from AWS never deregisters.
//! Membership is read back from moto with DescribeTargetHealth.

use std::time::Duration;

use warden_tests::harness::*;
use warden_tests::proxy::{Fault, HttpFaultProxy};

const PORT: u16 = 18_700;
const PRIVATE_IP: &str = "10.0.0.5";

fn targets(moto: &Moto, arn: &str) -> Vec<(String, Option<u16>, String)> {
    serde_json::from_str(moto.fixture(&["tg-targets", arn]).trim()).unwrap()
}

fn member(moto: &Moto, arn: &str, id: &str) -> bool {
    targets(moto, arn)
        .iter()
        .any(|(t, p, _)| t == id && *p == Some(PORT))
}

fn config(redis: &Redis, instance: &str) -> String {
    format!(
        "[host]\ninstance_id = \"{instance}\"\nprivate_ip = \"{PRIVATE_IP}\"\n\
         [registrar]\nlocal_redis = \"{}\"\n",
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
async fn instance_and_ip_groups_and_a_classic_elb_follow_the_service_across_a_restart() {
    let redis = Redis::start();
    let moto = Moto::start();
    let instance = moto.fixture(&["ec2-instance"]).trim().to_owned();
    let web_tg = moto
        .fixture(&["tg-setup", "web-tg", "instance", "2"])
        .trim()
        .to_owned();
    let ip_tg = moto
        .fixture(&["tg-setup", "ip-tg", "ip", "2"])
        .trim()
        .to_owned();
    moto.create_elb("web-elb", PORT).await;
    let mut w = Warden::start(&config(&redis, &instance), &moto.env());
    let cs = Containers::new("tg");
    let groups = format!("web-tg,{ip_tg}");
    let port = PORT.to_string();
    let id = cs.run(
        "web",
        &[
            ("warden.service", "tg-web"),
            ("warden.frontend-port", &port),
            ("warden.elb", "web-elb"),
            ("warden.target-group", &groups),
            ("warden.drain", "1"),
        ],
        &[],
    );
    eventually(
        Duration::from_secs(30),
        "the host in both groups and the ELB",
        || {
            let elb = futures_block(moto.elb_members("web-elb"));
            (member(&moto, &web_tg, &instance)
                && member(&moto, &ip_tg, PRIVATE_IP)
                && elb == vec![instance.clone()])
            .then_some(())
        },
    );
    assert_eq!(count(&moto, "elasticloadbalancing:RegisterTargets"), 2);

    // A restart (SIGTERM, start again) re-checks membership and changes nothing.
    let checks = count(&moto, "elasticloadbalancing:DescribeTargetHealth");
    assert_eq!(w.sigterm_and_wait(), Some(0));
    assert!(
        member(&moto, &web_tg, &instance),
        "left the group at shutdown"
    );
    w.restart();
    eventually(Duration::from_secs(30), "membership checked again", || {
        (count(&moto, "elasticloadbalancing:DescribeTargetHealth") >= checks + 2).then_some(())
    });
    assert_eq!(count(&moto, "elasticloadbalancing:RegisterTargets"), 2);
    assert_eq!(count(&moto, "elasticloadbalancing:DeregisterTargets"), 0);
    assert_eq!(
        targets(&moto, &web_tg).len(),
        1,
        "{:?}",
        targets(&moto, &web_tg)
    );

    // The last container goes: out after the drain, then the group's delay is waited out.
    cs.rm(&id);
    eventually(
        Duration::from_secs(30),
        "the host out of both groups and the ELB",
        || {
            let elb = futures_block(moto.elb_members("web-elb"));
            (targets(&moto, &web_tg).is_empty()
                && targets(&moto, &ip_tg).is_empty()
                && elb.is_empty())
            .then_some(())
        },
    );
    let line = wait_log(
        &w,
        "the group's delay said",
        &["drains this host's connections for 2 s", "web-tg"],
    );
    assert!(
        line.contains("deregistered from the target group"),
        "{line}"
    );
    wait_log(
        &w,
        "the delay's end said",
        &["deregistration delay is over", "web-tg"],
    );
}

#[test]
#[cfg_attr(
    warden_e2e_off,
    ignore = "end-to-end tier: needs root, Docker, redis-server, nginx, moto_server; run scripts/test.sh"
)]
fn a_5xx_from_aws_never_deregisters() {
    let redis = Redis::start();
    let moto = Moto::start();
    let instance = moto.fixture(&["ec2-instance"]).trim().to_owned();
    let web_tg = moto
        .fixture(&["tg-setup", "web-tg", "instance", "0"])
        .trim()
        .to_owned();
    let proxy = HttpFaultProxy::start(moto.port);
    let env = Moto::env_for(&proxy.endpoint(), "testing");
    let w = Warden::start(&config(&redis, &instance), &env);
    let cs = Containers::new("tg5xx");
    let port = PORT.to_string();
    let id = cs.run(
        "web",
        &[
            ("warden.service", "tg-web"),
            ("warden.frontend-port", &port),
            ("warden.target-group", "web-tg"),
            ("warden.drain", "0"),
        ],
        &[],
    );
    eventually(Duration::from_secs(30), "the host in the group", || {
        member(&moto, &web_tg, &instance).then_some(())
    });
    // Every AWS request now answers 503.
    proxy.fail_next(1_000_000, "/", Fault::Unavailable);
    cs.rm(&id);
    let before = proxy.passed().iter().filter(|p| p.faulted).count();
    // One call an attempt, tried again after 1, 2, 4 s...: three refused in 30 s.
    eventually(Duration::from_secs(30), "several refused attempts", || {
        (proxy.passed().iter().filter(|p| p.faulted).count() >= before + 3).then_some(())
    });
    wait_log(&w, "the failure said", &["target group", "failing"]);
    assert!(
        member(&moto, &web_tg, &instance),
        "deregistered on an error"
    );
    assert_eq!(count(&moto, "elasticloadbalancing:DeregisterTargets"), 0);
    // AWS back: the pending deregistration happens.
    proxy.fail_next(0, "/", Fault::Unavailable);
    eventually(
        Duration::from_secs(90),
        "deregistered once AWS answers",
        || targets(&moto, &web_tg).is_empty().then_some(()),
    );
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
